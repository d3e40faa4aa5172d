/**
 * The app's one live connection: a single EventSource on GET /api/events (the session
 * cookie authenticates it), shared by every page. The browser reconnects by itself and
 * sends Last-Event-ID, and the server resumes after it, so nothing is lost in between.
 *
 * An EventSource hears only the event names it listens for, so they are listed here.
 */

export interface LiveEvent {
	type: string;
	/** the stream sequence; null for step progress (ephemeral, never replayed) */
	id: string | null;
	data: Record<string, unknown>;
}

const STAGES = ['ingest', 'caption', 'generate', 'notify', 'webhooks', 's3events'];
export const EVENT_TYPES = [
	'uploaded',
	'ingested',
	'captioned',
	'recaption',
	'requested',
	'generated',
	'approved',
	'rejected',
	'deleted',
	'webhook_disabled',
	'progress',
	...STAGES.map((stage) => `failed.${stage}`),
	...STAGES.map((stage) => `cancelled.${stage}`)
];

type Listener = (event: LiveEvent) => void;

class Live {
	/** connecting, open, or closed (signed out / dropped) */
	state = $state<'connecting' | 'open' | 'closed'>('closed');
	private source: EventSource | null = null;
	private listeners = new Set<Listener>();

	/** Hear every event; returns the function that stops it. */
	subscribe(listener: Listener): () => void {
		this.listeners.add(listener);
		return () => this.listeners.delete(listener);
	}

	start(): void {
		if (this.source !== null || typeof EventSource === 'undefined') return;
		const source = new EventSource('/api/events');
		this.source = source;
		this.state = 'connecting';
		source.onopen = () => (this.state = 'open');
		source.onerror = () => {
			// CLOSED: the server refused (signed out) or dropped us for good; otherwise the
			// browser is already reconnecting with Last-Event-ID.
			this.state = source.readyState === EventSource.CLOSED ? 'closed' : 'connecting';
			if (source.readyState === EventSource.CLOSED) this.source = null;
		};
		for (const type of EVENT_TYPES) {
			source.addEventListener(type, (message) => this.deliver(type, message as MessageEvent));
		}
		// The server's own "error" frame (a slow client dropped): start afresh from where we are.
		source.addEventListener('error', (message) => {
			if (message instanceof MessageEvent) {
				this.stop();
				setTimeout(() => this.start(), 1000);
			}
		});
	}

	stop(): void {
		this.source?.close();
		this.source = null;
		this.state = 'closed';
	}

	private deliver(type: string, message: MessageEvent): void {
		let data: Record<string, unknown> = {};
		try {
			data = JSON.parse(String(message.data)) as Record<string, unknown>;
		} catch {
			return;
		}
		const event: LiveEvent = { type, id: message.lastEventId || null, data };
		for (const listener of this.listeners) listener(event);
	}
}

export const live = new Live();
