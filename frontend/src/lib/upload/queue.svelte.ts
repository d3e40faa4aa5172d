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

/** The running totals over all rows, kept as rows change (never recounted: a folder may
 * hold thousands of files, and each progress tick changes one row). */
export interface Totals {
	/** bytes sent of all files not cancelled */
	loaded: number;
	size: number;
	files: number;
	sent: number;
	failed: number;
	/** queued or being sent */
	active: number;
	/** done with (see finished) */
	done: number;
}

const NO_TOTALS: Totals = { loaded: 0, size: 0, files: 0, sent: 0, failed: 0, active: 0, done: 0 };
const TOTAL_KEYS = Object.keys(NO_TOTALS) as (keyof Totals)[];

/** What one row adds to the totals. */
export function share(item: UploadItem): Totals {
	const active = item.state === 'queued' || item.state === 'sending';
	const done = finished(item) ? 1 : 0;
	if (item.state === 'cancelled') return { ...NO_TOTALS, done };
	return {
		loaded: active ? item.loaded : item.size,
		size: item.size,
		files: 1,
		sent: active || item.state === 'failed' ? 0 : 1,
		failed: item.state === 'failed' ? 1 : 0,
		active: active ? 1 : 0,
		done
	};
}

/** Whether a row is done with (nothing more will change it by itself). */
export function finished(item: UploadItem): boolean {
	return FINISHED.includes(item.state) || (item.state === 'processing' && item.caption !== null);
}

export class UploadQueue {
	items = $state<UploadItem[]>([]);
	private totals = $state<Totals>({ ...NO_TOTALS });
	private nextKey = 1;
	private running = 0;
	private aborts = new Map<number, AbortController>();
	private seen = new Map<string, LiveEvent[]>();
	/** rows waiting their turn, in order (from ``head`` on); a cancelled one is skipped */
	private waiting: UploadItem[] = [];
	private head = 0;
	/** the rows of each image, for its events */
	private byImage = new Map<string, UploadItem[]>();

	constructor(
		private readonly transport: Transport,
		private readonly fetchDoc: FetchDoc,
		readonly limit = 4
	) {}

	/** How many files are being sent right now. */
	get inFlight(): number {
		return this.running;
	}

	/** The totals over all rows, for the total bar. */
	get total(): Readonly<Totals> {
		return this.totals;
	}

	add(files: Picked[]): void {
		const added: UploadItem[] = files.map(({ file, path }) => ({
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
		}));
		const from = this.items.length;
		this.items.push(...added);
		// the reactive rows (the array's proxies), not the plain objects pushed
		const rows = this.items.slice(from);
		for (const item of rows) this.count(item, 1);
		this.waiting.push(...rows);
		this.pump();
	}

	cancel(key: number): void {
		const item = this.find(key);
		if (!item) return;
		if (item.state === 'queued') this.update(item, { state: 'cancelled' });
		this.aborts.get(key)?.abort();
	}

	retry(key: number): void {
		const item = this.find(key);
		if (!item || (item.state !== 'failed' && item.state !== 'cancelled') || item.imageId) return;
		this.update(item, { state: 'queued', loaded: 0, error: null, note: null });
		this.waiting.push(item);
		this.pump();
	}

	/** Forget the rows that are done with. */
	clearFinished(): void {
		const [done, kept] = [[] as UploadItem[], [] as UploadItem[]];
		for (const item of this.items) (finished(item) ? done : kept).push(item);
		for (const item of done) {
			this.count(item, -1);
			if (item.imageId) this.byImage.delete(item.imageId);
		}
		this.items = kept;
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
		for (const item of this.byImage.get(imageId) ?? []) this.update(item, apply(item, event));
	}

	private find(key: number): UploadItem | undefined {
		return this.items.find((item) => item.key === key);
	}

	/** Change a row, keeping the totals. */
	private update(item: UploadItem, change: Partial<UploadItem>): void {
		this.count(item, -1);
		Object.assign(item, change);
		this.count(item, 1);
	}

	private count(item: UploadItem, sign: 1 | -1): void {
		const part = share(item);
		for (const key of TOTAL_KEYS) if (part[key]) this.totals[key] += sign * part[key];
	}

	private nextWaiting(): UploadItem | null {
		while (this.head < this.waiting.length) {
			const item = this.waiting[this.head++];
			if (item.state === 'queued') return item;
		}
		this.waiting = [];
		this.head = 0;
		return null;
	}

	private pump(): void {
		while (this.running < this.limit) {
			const next = this.nextWaiting();
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
		this.update(item, { state: 'sending' });
		try {
			const result = await this.transport(item.file, (loaded) => this.update(item, { loaded }), abort.signal);
			this.update(item, {
				loaded: item.size,
				imageId: result.id,
				note: result.note ?? null,
				state: result.duplicate ? 'duplicate' : 'processing'
			});
			this.byImage.set(result.id, [...(this.byImage.get(result.id) ?? []), item]);
			for (const event of this.seen.get(result.id) ?? []) this.update(item, apply(item, event));
			await this.readDoc(item, result.id);
		} catch (error) {
			if (error instanceof DOMException && error.name === 'AbortError') {
				this.update(item, { state: 'cancelled' });
			} else {
				this.update(item, { state: 'failed', error: error instanceof Error ? error.message : String(error) });
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
		if (doc.ingest) this.update(item, { ingested: true });
		const caption = doc.caption as { caption?: string; demo?: boolean } | null | undefined;
		if (caption?.caption && item.caption === null) {
			this.update(item, {
				caption: caption.caption,
				demo: Boolean(caption.demo),
				...(item.state === 'processing' ? { state: 'ready' as const } : {})
			});
		}
		if (doc.status === 'failed' && item.state === 'processing' && doc.failure) {
			this.update(item, {
				state: 'failed',
				error: String(doc.failure.reason ?? `${doc.failure.stage ?? 'a stage'} failed`)
			});
		}
	}
}

/** What one event about the row's image changes in it. */
function apply(item: UploadItem, event: LiveEvent): Partial<UploadItem> {
	const data = (event.data.data ?? {}) as Record<string, unknown>;
	if (event.type === 'ingested') return { ingested: true };
	if (event.type === 'captioned') {
		const ready = item.state === 'processing' || item.state === 'failed' || item.state === 'ready';
		return {
			ingested: true,
			caption: typeof data.caption === 'string' ? data.caption : '',
			demo: Boolean(data.demo),
			...(ready ? { state: 'ready' as const, error: null } : {})
		};
	}
	if (event.type.startsWith('failed.') && item.state === 'processing') {
		return { state: 'failed', error: typeof data.reason === 'string' ? data.reason : `${event.type.slice(7)} failed` };
	}
	if (event.type === 'deleted') return { state: 'failed', error: 'the image was deleted' };
	return {};
}
