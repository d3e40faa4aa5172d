import { signedOut } from './api';

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

const RETRY_MS = [1000, 2000, 5000, 10000, 30000]; // after the stream was refused or lost

class Live {
	/** connecting, open, or closed (signed out / dropped) */
	state = $state<'connecting' | 'open' | 'closed'>('closed');
	private source: EventSource | null = null;
	private listeners = new Set<Listener>();
	/** the newest stored event's id: where a new stream resumes */
	private lastId: string | null = null;
	private retries = 0;
	private timer: ReturnType<typeof setTimeout> | null = null;
	private wanted = false;

	/** Hear every event; returns the function that stops it. */
	subscribe(listener: Listener): () => void {
		this.listeners.add(listener);
		return () => this.listeners.delete(listener);
	}

	start(): void {
		this.wanted = true;
		if (this.source !== null || typeof EventSource === 'undefined') return;
		this.clearTimer();
		// A new EventSource resumes where the last one stopped (the browser's own
		// reconnects send Last-Event-ID by themselves).
		const url = this.lastId ? `/api/events?last_event_id=${encodeURIComponent(this.lastId)}` : '/api/events';
		const source = new EventSource(url);
		this.source = source;
		this.state = 'connecting';
		source.onopen = () => {
			this.state = 'open';
			this.retries = 0;
		};
		source.onerror = () => {
			if (source.readyState !== EventSource.CLOSED) {
				this.state = 'connecting'; // the browser reconnects with Last-Event-ID
				return;
			}
			// Refused (an error status: signed out, a proxy's 502, the gateway's 503): the
			// browser gives up, so we try again while still signed in.
			this.source = null;
			this.state = 'closed';
			this.retryLater();
		};
		for (const type of EVENT_TYPES) {
			source.addEventListener(type, (message) => this.deliver(type, message as MessageEvent));
		}
	}

	stop(): void {
		this.wanted = false;
		this.retries = 0;
		this.clearTimer();
		this.source?.close();
		this.source = null;
		this.state = 'closed';
	}

	private retryLater(): void {
		if (!this.wanted || this.timer !== null) return;
		const wait = RETRY_MS[Math.min(this.retries, RETRY_MS.length - 1)];
		this.retries += 1;
		this.timer = setTimeout(() => {
			this.timer = null;
			// Still signed in? A 401 makes every page show the sign-in form instead.
			fetch('/api/session', { credentials: 'same-origin' })
				.then((response) => {
					if (response.status === 401) {
						signedOut();
						return;
					}
					this.start();
				})
				.catch(() => this.retryLater());
		}, wait);
	}

	private clearTimer(): void {
		if (this.timer !== null) clearTimeout(this.timer);
		this.timer = null;
	}

	private deliver(type: string, message: MessageEvent): void {
		let data: Record<string, unknown> = {};
		try {
			data = JSON.parse(String(message.data)) as Record<string, unknown>;
		} catch {
			return;
		}
		// A progress event carries no id of its own (the browser repeats the last one).
		const id = type === 'progress' ? null : message.lastEventId || null;
		if (id !== null) this.lastId = id;
		const event: LiveEvent = { type, id, data };
		for (const listener of this.listeners) listener(event);
	}
}

export const live = new Live();
