/**
 * The upload queue: files wait their turn, at most ``limit`` are sent at once, and each
 * row follows its image live after the upload (thumbnail once ingested, caption once
 * captioned) from the app's event stream, never by polling.
 *
 * Events may come before the upload's answer names the image (a fast stack), and the
 * image may have been processed long ago (a duplicate): so the queue keeps the latest
 * events of recent images, and reads each image's document once when its id is known.
 */
import type { LiveEvent } from '$lib/live.svelte';
import type { ImageDoc } from '$lib/types';
import type { Picked } from './files';
import type { Transport } from './transport';

export type UploadState =
	| 'queued'
	| 'sending'
	| 'processing' // accepted: ingest and caption are working on it
	| 'ready' // captioned
	| 'duplicate' // the same bytes were uploaded before
	| 'failed' // refused by the server, or a stage failed
	| 'cancelled';

export interface UploadItem {
	key: number;
	file: File;
	path: string;
	size: number;
	loaded: number;
	state: UploadState;
	/** the server's own words when it refused the file, or why a stage failed */
	error: string | null;
	imageId: string | null;
	/** ingested: its thumbnail can be shown */
	ingested: boolean;
	caption: string | null;
	/** the caption came from a demo model */
	demo: boolean;
	note: string | null;
}

export type FetchDoc = (imageId: string) => Promise<ImageDoc>;

const REMEMBERED = 500; // images whose latest events are kept for rows that learn their id late
const FINISHED: UploadState[] = ['ready', 'duplicate', 'failed', 'cancelled'];

/** Whether a row is done with (nothing more will change it by itself). */
export function finished(item: UploadItem): boolean {
	return FINISHED.includes(item.state) || (item.state === 'processing' && item.caption !== null);
}

export class UploadQueue {
	items = $state<UploadItem[]>([]);
	private nextKey = 1;
	private running = 0;
	private aborts = new Map<number, AbortController>();
	private seen = new Map<string, LiveEvent[]>();

	constructor(
		private readonly transport: Transport,
		private readonly fetchDoc: FetchDoc,
		readonly limit = 4
	) {}

	/** How many files are being sent right now. */
	get inFlight(): number {
		return this.items.filter((item) => item.state === 'sending').length;
	}

	/** Bytes sent of all files not cancelled, for the total bar. */
	get total(): { loaded: number; size: number; files: number; sent: number; failed: number } {
		let loaded = 0;
		let size = 0;
		let sent = 0;
		let failed = 0;
		const counted = this.items.filter((item) => item.state !== 'cancelled');
		for (const item of counted) {
			size += item.size;
			loaded += item.state === 'queued' || item.state === 'sending' ? item.loaded : item.size;
			if (item.state === 'failed') failed += 1;
			else if (item.state !== 'queued' && item.state !== 'sending') sent += 1;
		}
		return { loaded, size, files: counted.length, sent, failed };
	}

	add(files: Picked[]): void {
		for (const { file, path } of files) {
			this.items.push({
				key: this.nextKey++,
				file,
				path,
				size: file.size,
				loaded: 0,
				state: 'queued',
				error: null,
				imageId: null,
				ingested: false,
				caption: null,
				demo: false,
				note: null
			});
		}
		this.pump();
	}

	cancel(key: number): void {
		const item = this.find(key);
		if (!item) return;
		if (item.state === 'queued') item.state = 'cancelled';
		this.aborts.get(key)?.abort();
	}

	retry(key: number): void {
		const item = this.find(key);
		if (!item || (item.state !== 'failed' && item.state !== 'cancelled') || item.imageId) return;
		Object.assign(item, { state: 'queued', loaded: 0, error: null, note: null });
		this.pump();
	}

	/** Forget the rows that are done with. */
	clearFinished(): void {
		this.items = this.items.filter((item) => !finished(item));
	}

	/** An event from the live stream: rows of its image follow it. */
	hear(event: LiveEvent): void {
		const imageId = event.data.image_id;
		if (typeof imageId !== 'string') return;
		const kept = this.seen.get(imageId) ?? [];
		kept.push(event);
		this.seen.delete(imageId); // re-inserted: the map keeps the most recent images last
		this.seen.set(imageId, kept.slice(-8));
		if (this.seen.size > REMEMBERED) this.seen.delete(this.seen.keys().next().value as string);
		for (const item of this.items) if (item.imageId === imageId) apply(item, event);
	}

	private find(key: number): UploadItem | undefined {
		return this.items.find((item) => item.key === key);
	}

	private pump(): void {
		while (this.running < this.limit) {
			const next = this.items.find((item) => item.state === 'queued');
			if (!next) return;
			this.running += 1;
			void this.send(next).finally(() => {
				this.running -= 1;
				this.pump();
			});
		}
	}

	private async send(item: UploadItem): Promise<void> {
		const abort = new AbortController();
		this.aborts.set(item.key, abort);
		item.state = 'sending';
		try {
			const result = await this.transport(item.file, (loaded) => (item.loaded = loaded), abort.signal);
			item.loaded = item.size;
			item.imageId = result.id;
			item.note = result.note ?? null;
			item.state = result.duplicate ? 'duplicate' : 'processing';
			for (const event of this.seen.get(result.id) ?? []) apply(item, event);
			await this.readDoc(item, result.id);
		} catch (error) {
			if (error instanceof DOMException && error.name === 'AbortError') {
				item.state = 'cancelled';
			} else {
				item.state = 'failed';
				item.error = error instanceof Error ? error.message : String(error);
			}
		} finally {
			this.aborts.delete(item.key);
		}
	}

	/** What the catalogue has already (a duplicate's caption, events from before we listened). */
	private async readDoc(item: UploadItem, imageId: string): Promise<void> {
		let doc: ImageDoc;
		try {
			doc = await this.fetchDoc(imageId);
		} catch {
			return; // not in the catalogue yet (or unreadable now): its events will come
		}
		if (doc.ingest) item.ingested = true;
		const caption = doc.caption as { caption?: string; demo?: boolean } | null | undefined;
		if (caption?.caption && item.caption === null) {
			item.caption = caption.caption;
			item.demo = Boolean(caption.demo);
			if (item.state === 'processing') item.state = 'ready';
		}
		if (doc.status === 'failed' && item.state === 'processing' && doc.failure) {
			item.state = 'failed';
			item.error = String(doc.failure.reason ?? `${doc.failure.stage ?? 'a stage'} failed`);
		}
	}
}

/** Fold one event about the row's image into it. */
function apply(item: UploadItem, event: LiveEvent): void {
	const data = (event.data.data ?? {}) as Record<string, unknown>;
	if (event.type === 'ingested') {
		item.ingested = true;
	} else if (event.type === 'captioned') {
		item.ingested = true;
		item.caption = typeof data.caption === 'string' ? data.caption : '';
		item.demo = Boolean(data.demo);
		if (item.state === 'processing' || item.state === 'failed') item.state = 'ready';
		if (item.state === 'ready') item.error = null;
	} else if (event.type.startsWith('failed.') && item.state === 'processing') {
		item.state = 'failed';
		item.error = typeof data.reason === 'string' ? data.reason : `${event.type.slice(7)} failed`;
	} else if (event.type === 'deleted') {
		item.state = 'failed';
		item.error = 'the image was deleted';
	}
}
