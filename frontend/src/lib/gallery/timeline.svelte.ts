/**
 * The gallery's data: the months of the list and their counts (GET /api/images/timeline),
 * then only the pages in view (GET /api/images by each month's bounds and page cursors), a
 * bounded number of them kept. Live events update the images it holds and add new ones in
 * a "New" bucket on top, so that the months counted at load time never shift.
 */
import { ApiError, getJson, type Query } from '$lib/api';
import type { ImageDoc, ImagePage } from '$lib/types';
import { admits, listQuery, type Filters } from './filters';

export interface MonthInfo {
	month: string;
	count: number;
	since: string;
	until: string;
	cursors: string[];
}

interface TimelineAnswer {
	total: number;
	limit: number;
	buckets: MonthInfo[];
}

interface SimilarAnswer {
	items: ImageDoc[];
}

export interface Bucket {
	key: string;
	label: string;
	count: number;
	/** a month's pages come from the server; the others hold their items */
	month?: MonthInfo;
	items?: ImageDoc[];
}

interface PageEntry {
	docs: ImageDoc[] | null;
	controller: AbortController | null;
	used: number;
	failed?: boolean;
}

export const PAGE_SIZE = 200;
const KEEP_PAGES = 48; // 9,600 documents at most
const LIVE_TOPICS = new Set(['uploaded', 'generated', 'ingested', 'captioned', 'approved', 'rejected']);
const MAX_FETCHES = 4;
const GONE_RETRIES = 6; // a live image the catalogue has not projected yet

export class Gallery {
	state = $state<'idle' | 'loading' | 'ready' | 'error'>('idle');
	error = $state('');
	buckets = $state.raw<Bucket[]>([]);
	/** bumped whenever a page or an image changes, for the grid to redraw */
	revision = $state(0);
	total = $state(0);

	private filters: Filters | null = null;
	private pages = new Map<string, PageEntry>();
	private clock = 0;
	private controller: AbortController | null = null;
	private waiting: (() => void)[] = [];
	private running = 0;
	private refreshing = new Map<string, boolean>(); // id -> heard again meanwhile

	get ready(): boolean {
		return this.state === 'ready';
	}

	/** The list (or the similar images) for ``filters``, from the start. */
	async load(filters: Filters): Promise<void> {
		this.controller?.abort();
		for (const entry of this.pages.values()) entry.controller?.abort();
		this.pages.clear();
		const controller = new AbortController();
		this.controller = controller;
		this.filters = filters;
		this.state = 'loading';
		this.error = '';
		try {
			if (filters.similar) {
				const answer = await getJson<SimilarAnswer>(
					`/api/images/${encodeURIComponent(filters.similar)}/similar`,
					{ limit: 100, tag: filters.tag || undefined, status: filters.status || undefined, approval: filters.approval || undefined },
					controller.signal
				);
				this.buckets = [{ key: 'similar', label: 'Similar images', count: answer.items.length, items: answer.items }];
			} else {
				const answer = await getJson<TimelineAnswer>(
					'/api/images/timeline',
					{ ...listQuery(filters), limit: PAGE_SIZE },
					controller.signal
				);
				this.buckets = [
					{ key: 'new', label: 'New', count: 0, items: [] },
					...answer.buckets.map((month) => ({ key: month.month, label: monthLabel(month.month), count: month.count, month }))
				];
			}
			this.total = this.buckets.reduce((n, b) => n + b.count, 0);
			this.state = 'ready';
			this.revision++;
		} catch (error) {
			if (controller.signal.aborted) return;
			this.error = error instanceof Error ? error.message : String(error);
			this.state = 'error';
		}
	}

	/** The document at ``index`` of bucket ``b``, if its page is loaded. */
	docAt(b: number, index: number): ImageDoc | null {
		const bucket = this.buckets[b];
		if (!bucket) return null;
		if (bucket.items) return bucket.items[index] ?? null;
		const entry = this.pages.get(pageKey(b, Math.floor(index / PAGE_SIZE)));
		if (!entry?.docs) return null;
		entry.used = ++this.clock;
		return entry.docs[index % PAGE_SIZE] ?? null;
	}

	/** Load the pages in view (``wanted``: bucket and page), cancel those scrolled away. */
	want(wanted: { bucket: number; page: number }[]): void {
		const keys = new Set(wanted.map((w) => pageKey(w.bucket, w.page)));
		for (const [key, entry] of this.pages) {
			if (entry.docs === null && !keys.has(key)) {
				entry.controller?.abort();
				this.pages.delete(key);
			}
		}
		for (const { bucket, page } of wanted) {
			const key = pageKey(bucket, page);
			const entry = this.pages.get(key);
			if (entry) {
				entry.used = ++this.clock;
				continue;
			}
			const month = this.buckets[bucket]?.month;
			if (month) void this.fetchPage(key, month, page);
		}
		this.evict(keys);
	}

	/** Whether a page in view failed to load (the grid offers to try again). */
	get failedPages(): number {
		void this.revision;
		let failed = 0;
		for (const entry of this.pages.values()) if (entry.failed) failed++;
		return failed;
	}

	retry(): void {
		for (const [key, entry] of this.pages) if (entry.failed) this.pages.delete(key);
		this.revision++;
	}

	/** A live event: refresh, add or drop the image it is about. */
	hear(type: string, data: Record<string, unknown>): void {
		const id = typeof data.image_id === 'string' ? data.image_id : null;
		if (!id || this.state !== 'ready') return;
		if (type === 'deleted') {
			this.drop(id);
			return;
		}
		if (LIVE_TOPICS.has(type) || type.startsWith('failed.')) {
			const time = typeof data.time === 'string' ? data.time : '';
			void this.refresh(id, type === 'rejected', (doc) => reflects(doc, type, time));
		}
	}

	/** Put a changed document in place (or drop it). */
	replace(doc: ImageDoc): void {
		if (this.locate(doc.id, (docs, index) => (docs[index] = doc))) this.revision++;
	}

	drop(id: string): void {
		const fresh = this.buckets[0];
		if (fresh?.key === 'new' && fresh.items?.some((d) => d.id === id)) {
			fresh.items = fresh.items.filter((d) => d.id !== id);
			this.recount(0, fresh.items.length);
			return;
		}
		// A month keeps its layout: the place stays empty until the next load.
		if (this.locate(id, (docs, index) => docs.splice(index, 1, { ...docs[index], gone: true }))) {
			this.revision++;
		}
	}

	/** Fetch the image's document anew; an event heard meanwhile fetches it once more. */
	private async refresh(
		id: string,
		mayVanish: boolean,
		current: (doc: ImageDoc) => boolean = () => true
	): Promise<void> {
		if (this.refreshing.has(id)) {
			this.refreshing.set(id, true);
			return;
		}
		this.refreshing.set(id, false);
		const filters = this.filters;
		try {
			for (let attempt = 0; attempt < GONE_RETRIES; attempt++) {
				try {
					const doc = await getJson<ImageDoc>(`/api/images/${encodeURIComponent(id)}`);
					if (filters !== this.filters) return;
					if (!this.locate(id, (docs, index) => (docs[index] = doc))) this.add(doc);
					this.revision++;
					if (current(doc)) return;
				} catch (error) {
					if (!(error instanceof ApiError) || error.status !== 404) return;
					if (mayVanish) {
						this.drop(id); // hidden from this key now
						return;
					}
				}
				// The event ran ahead of the catalogue (notify projects it): ask again soon.
				await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** attempt));
			}
		} finally {
			const again = this.refreshing.get(id);
			this.refreshing.delete(id);
			if (again) void this.refresh(id, false);
		}
	}

	private add(doc: ImageDoc): void {
		const filters = this.filters;
		const fresh = this.buckets[0];
		if (!filters || fresh?.key !== 'new' || !fresh.items) return;
		// New images sort first only newest-first by upload time.
		if (filters.order !== 'desc' || filters.sort !== 'created' || !admits(filters, doc)) return;
		fresh.items = [doc, ...fresh.items];
		this.recount(0, fresh.items.length);
	}

	private recount(b: number, count: number): void {
		this.buckets = this.buckets.map((bucket, n) => (n === b ? { ...bucket, count } : bucket));
		this.total = this.buckets.reduce((n, bucket) => n + bucket.count, 0);
		this.revision++;
	}

	/** Find ``id`` among the held documents and call ``found`` on its array and index. */
	private locate(id: string, found: (docs: ImageDoc[], index: number) => void): boolean {
		for (const bucket of this.buckets) {
			const index = bucket.items?.findIndex((d) => d.id === id) ?? -1;
			if (index >= 0 && bucket.items) {
				found(bucket.items, index);
				return true;
			}
		}
		for (const entry of this.pages.values()) {
			const index = entry.docs?.findIndex((d) => d.id === id) ?? -1;
			if (index >= 0 && entry.docs) {
				found(entry.docs, index);
				return true;
			}
		}
		return false;
	}

	private async fetchPage(key: string, month: MonthInfo, page: number): Promise<void> {
		const filters = this.filters;
		if (!filters) return;
		const controller = new AbortController();
		const entry: PageEntry = { docs: null, controller, used: ++this.clock };
		this.pages.set(key, entry);
		await this.slot();
		try {
			if (controller.signal.aborted) return;
			const query: Query = {
				...listQuery(filters),
				since: month.since,
				until: month.until,
				cursor: page > 0 ? month.cursors[page - 1] : undefined,
				limit: PAGE_SIZE
			};
			const answer = await getJson<ImagePage>('/api/images', query, controller.signal);
			if (this.pages.get(key) !== entry) return;
			entry.docs = answer.items;
			entry.controller = null;
			this.revision++;
		} catch {
			if (controller.signal.aborted || this.pages.get(key) !== entry) return;
			entry.failed = true;
			entry.controller = null;
			this.revision++;
		} finally {
			this.release();
		}
	}

	/** At most MAX_FETCHES pages in flight: a fast scroll queues, then cancels, the rest. */
	private slot(): Promise<void> {
		if (this.running < MAX_FETCHES) {
			this.running++;
			return Promise.resolve();
		}
		return new Promise((resolve) => this.waiting.push(() => resolve()));
	}

	private release(): void {
		const next = this.waiting.shift();
		if (next) next();
		else this.running--;
	}

	private evict(keep: Set<string>): void {
		if (this.pages.size <= KEEP_PAGES) return;
		const loaded = [...this.pages.entries()]
			.filter(([key, entry]) => entry.docs !== null && !keep.has(key))
			.sort((a, b) => a[1].used - b[1].used);
		for (const [key] of loaded.slice(0, this.pages.size - KEEP_PAGES)) this.pages.delete(key);
	}
}

/** Whether ``doc`` shows the event ``type`` of ``time`` yet. */
function reflects(doc: ImageDoc, type: string, time: string): boolean {
	if (type === 'approved' || type === 'rejected') return doc.approval === type;
	if (type.startsWith('failed.')) return doc.failure != null || doc.status === 'failed';
	const stage = doc.stages[type];
	return stage !== undefined && (!time || Date.parse(stage) >= Date.parse(time) - 1);
}

function pageKey(bucket: number, page: number): string {
	return `${bucket}:${page}`;
}

function monthLabel(month: string): string {
	const [year, number] = month.split('-').map(Number);
	return new Date(Date.UTC(year, number - 1, 1)).toLocaleDateString(undefined, {
		month: 'long',
		year: 'numeric',
		timeZone: 'UTC'
	});
}
