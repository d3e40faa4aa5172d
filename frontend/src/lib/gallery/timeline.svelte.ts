/**
 * The gallery's data: the months of the list and their counts (GET /api/images/timeline),
 * then only the pages in view (GET /api/images by each month's bounds and page cursors, and
 * the timeline's as_of), a bounded number of them kept. Every page is bounded by the upload
 * time the timeline counted up to (as_of): sorted by the date taken, an image uploaded since
 * may belong to any month, and would shift its pages. Live events update the images it holds
 * and add new ones (uploaded after as_of) in a "New" bucket on top, whatever the sort, so
 * that the months counted at load time never shift.
 *
 * Live events cost little however many arrive: an event about an image no loaded page
 * holds is ignored (its page shows it fresh when it loads); the others are gathered for a
 * moment, once per image, and fetched a few at a time. Only an upload or a generation adds
 * to "New", which holds at most NEW_CAP; past that the page offers to reload instead.
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
	/** the upload time it counted up to (the server's clock): every page is asked with it */
	as_of: string;
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
	/** why the page did not load (the server's words) */
	failed?: string;
}

/** A live event waiting for its image's document to be fetched. */
interface Heard {
	type: string;
	time: string;
	/** an upload or a generation: the image may go to "New" */
	adds: boolean;
	attempt: number;
}

export const PAGE_SIZE = 200;
const KEEP_PAGES = 48; // 9,600 documents at most
const LIVE_TOPICS = new Set(['uploaded', 'generated', 'ingested', 'captioned', 'approved', 'rejected']);
const MAX_FETCHES = 4;
/** "New" shows this many images at most; more arrivals are counted and offered as a reload. */
export const NEW_CAP = 100;
/** Live events are gathered this long, then their images fetched once each... */
export const LIVE_WINDOW_MS = 150;
/** ...this many at a time. */
export const LIVE_FETCHES = 4;
const LIVE_RETRIES = 4; // an event ran ahead of the catalogue (notify projects it)

/** Whether a live event of ``type`` may add its image to "New": only one that makes an image
 * (any other event is about an image that existed already, perhaps in a month not loaded). */
export function mayAdd(type: string): boolean {
	return type === 'uploaded' || type === 'generated';
}

export class Gallery {
	state = $state<'idle' | 'loading' | 'ready' | 'error'>('idle');
	error = $state('');
	buckets = $state.raw<Bucket[]>([]);
	/** bumped whenever a page or an image changes, for the grid to redraw */
	revision = $state(0);
	total = $state(0);
	/** new images that arrived after "New" filled up: shown by loading the list anew */
	more = $state(0);

	private filters: Filters | null = null;
	private pages = new Map<string, PageEntry>();
	private clock = 0;
	private controller: AbortController | null = null;
	private waiting: (() => void)[] = [];
	private running = 0;
	private heard = new Map<string, Heard>(); // id -> the event to fetch it for
	private gathering: ReturnType<typeof setTimeout> | null = null;
	private liveRunning = 0;
	private adding = new Set<string>(); // ids on their way to "New" (fetching)
	private arrived = new Set<string>(); // ids past NEW_CAP
	/** the timeline's as_of: the pages hold the images created at or before it, "New" the rest */
	private asOf = '';
	private newSince = Infinity;

	get ready(): boolean {
		return this.state === 'ready';
	}

	/** The list (or the similar images) for ``filters``, from the start. */
	async load(filters: Filters): Promise<void> {
		this.controller?.abort();
		for (const entry of this.pages.values()) entry.controller?.abort();
		this.pages.clear();
		this.heard.clear();
		this.adding.clear();
		this.arrived.clear();
		this.more = 0;
		this.asOf = '';
		this.newSince = Infinity;
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
				this.asOf = answer.as_of;
				this.newSince = Date.parse(answer.as_of);
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

	/** Why a page failed to load, in the server's words ('' when none did). */
	get pageError(): string {
		void this.revision;
		for (const entry of this.pages.values()) if (entry.failed) return entry.failed;
		return '';
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
		if (!LIVE_TOPICS.has(type) && !type.startsWith('failed.')) return;
		const adds = mayAdd(type) && this.takesNew();
		const held = this.locate(id, () => {});
		if (!held && !adds) return; // not on screen: its page shows it as it is when it loads
		if (!held && !this.adding.has(id)) {
			if (this.newFull()) {
				this.arrived.add(id); // counted, not fetched: a reload shows it
				this.more = this.arrived.size;
				return;
			}
			this.adding.add(id);
		}
		const time = typeof data.time === 'string' ? data.time : '';
		this.gather(id, { type, time, adds, attempt: 0 });
	}

	/** Put a changed document in place (or drop it). */
	replace(doc: ImageDoc): void {
		if (this.locate(doc.id, (docs, index) => (docs[index] = doc))) this.revision++;
	}

	drop(id: string): void {
		this.heard.delete(id);
		this.adding.delete(id);
		if (this.arrived.delete(id)) this.more = this.arrived.size;
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

	/** Whether new images go to "New" at all: in the list, not among similar images. */
	private takesNew(): boolean {
		return this.buckets[0]?.key === 'new';
	}

	/** Whether "New" is full, counting the images on their way there. */
	private newFull(): boolean {
		return (this.buckets[0]?.items?.length ?? 0) + this.adding.size >= NEW_CAP;
	}

	/** Fetch ``id`` soon, once however many events about it arrive meanwhile. */
	private gather(id: string, heard: Heard): void {
		const before = this.heard.get(id);
		this.heard.set(id, before ? { ...heard, adds: heard.adds || before.adds, attempt: Math.min(heard.attempt, before.attempt) } : heard);
		this.gathering ??= setTimeout(() => {
			this.gathering = null;
			this.fetchHeard();
		}, LIVE_WINDOW_MS);
	}

	/** Fetch the gathered images, LIVE_FETCHES at a time. */
	private fetchHeard(): void {
		while (this.liveRunning < LIVE_FETCHES && this.heard.size > 0) {
			const [id, heard] = this.heard.entries().next().value as [string, Heard];
			this.heard.delete(id);
			this.liveRunning++;
			void this.refresh(id, heard).finally(() => {
				this.liveRunning--;
				this.fetchHeard();
			});
		}
	}

	/** The image's document anew, put in place (or in "New"); again later if it does not
	 * show the event yet. */
	private async refresh(id: string, heard: Heard): Promise<void> {
		if (!(await this.fetchOnce(id, heard))) this.adding.delete(id);
	}

	/** One try of :meth:`refresh`; whether it will try again. */
	private async fetchOnce(id: string, heard: Heard): Promise<boolean> {
		const filters = this.filters;
		try {
			const doc = await getJson<ImageDoc>(`/api/images/${encodeURIComponent(id)}`);
			if (filters !== this.filters) return false;
			if (this.locate(id, (docs, index) => (docs[index] = doc))) this.revision++;
			else if (!heard.adds || !this.add(doc)) return false;
			if (reflects(doc, heard.type, heard.time)) return false;
		} catch (error) {
			if (filters !== this.filters || !(error instanceof ApiError) || error.status !== 404) return false;
			if (heard.type === 'rejected') {
				this.drop(id); // hidden from this key now
				return false;
			}
		}
		if (heard.attempt + 1 >= LIVE_RETRIES) return false;
		// The event ran ahead of the catalogue: ask again soon.
		await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** heard.attempt));
		if (filters !== this.filters) return false;
		this.gather(id, { ...heard, attempt: heard.attempt + 1 });
		return true;
	}

	/** Put a new image in "New" (if the filters take it); whether it went there. */
	private add(doc: ImageDoc): boolean {
		const filters = this.filters;
		const fresh = this.buckets[0];
		if (!filters || fresh?.key !== 'new' || !fresh.items || !this.takesNew() || !admits(filters, doc)) return false;
		// Created at or before as_of (an event heard again after a reconnect, say): its
		// month counted it.
		if (Date.parse(doc.created) <= this.newSince) return false;
		if (fresh.items.length >= NEW_CAP) {
			this.arrived.add(doc.id);
			this.more = this.arrived.size;
			return false;
		}
		fresh.items = [doc, ...fresh.items];
		this.adding.delete(doc.id);
		this.recount(0, fresh.items.length);
		return true;
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
		const asOf = this.asOf;
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
				as_of: asOf || undefined,
				limit: PAGE_SIZE
			};
			const answer = await getJson<ImagePage>('/api/images', query, controller.signal);
			if (this.pages.get(key) !== entry) return;
			entry.docs = answer.items;
			entry.controller = null;
			this.revision++;
		} catch (error) {
			if (controller.signal.aborted || this.pages.get(key) !== entry) return;
			entry.failed = error instanceof Error ? error.message : String(error);
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
