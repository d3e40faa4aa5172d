import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { ImageDoc } from '$lib/types';
import { readFilters } from './filters';
import { Gallery, LIVE_FETCHES, LIVE_WINDOW_MS, NEW_CAP, PAGE_SIZE, mayAdd } from './timeline.svelte';

// The timeline the gateway answers: November 2026 (3 images, its newest at 10:00) and a
// huge January 2025, counted when the page loaded (the images uploaded until AS_OF).
const AS_OF = '2026-11-28T10:00:00.500000Z';
const NOVEMBER = {
	month: '2026-11',
	count: 3,
	since: '2026-11-01T00:00:00.000000Z',
	until: '2026-11-28T10:00:00.000001Z',
	cursors: []
};
const JANUARY = {
	month: '2025-01',
	count: 5000,
	since: '2025-01-01T00:00:00.000000Z',
	until: '2025-01-31T12:00:00.000001Z',
	cursors: Array.from({ length: 24 }, (_, k) => `cursor-${k + 1}`)
};

function doc(id: string, created: string, more: Partial<ImageDoc> = {}): ImageDoc {
	return {
		id,
		status: 'ready',
		kind: 'upload',
		name: `${id}.jpg`,
		created,
		updated: created,
		taken: null,
		stages: {},
		tags: [],
		approval: 'none',
		hold: [],
		decision: null,
		...more
	};
}

const json = (body: unknown, status = 200): Response =>
	new Response(JSON.stringify(body), {
		status,
		headers: { 'Content-Type': status < 400 ? 'application/json' : 'application/problem+json' }
	});

/** The gateway, in process: the timeline, pages of the months, and single images. */
class FakeGateway {
	docs = new Map<string, ImageDoc>();
	urls: string[] = [];
	inFlight = 0;
	mostInFlight = 0;
	pageStatus = 200;

	fetch = async (input: RequestInfo | URL): Promise<Response> => {
		const url = new URL(String(input), 'http://gallery.test');
		this.urls.push(url.pathname + url.search);
		this.inFlight++;
		this.mostInFlight = Math.max(this.mostInFlight, this.inFlight);
		await Promise.resolve();
		this.inFlight--;
		if (url.pathname === '/api/images/timeline') {
			return json({ total: 5003, as_of: AS_OF, limit: PAGE_SIZE, buckets: [NOVEMBER, JANUARY] });
		}
		if (url.pathname === '/api/images') {
			if (this.pageStatus !== 200) {
				return json({ title: 'Service Unavailable', status: 503, detail: 'the database is down' }, 503);
			}
			return json({ items: [], next_cursor: null });
		}
		const id = decodeURIComponent(url.pathname.split('/').pop() ?? '');
		const found = this.docs.get(id);
		return found ? json(found) : json({ title: 'Not Found', status: 404, detail: 'no such image' }, 404);
	};

	/** How many times the image ``id`` was fetched. */
	fetched(id: string): number {
		return this.urls.filter((u) => u === `/api/images/${id}`).length;
	}
}

let gateway: FakeGateway;

beforeEach(() => {
	vi.useFakeTimers();
	gateway = new FakeGateway();
	vi.stubGlobal('fetch', gateway.fetch);
});

afterEach(() => {
	vi.unstubAllGlobals();
	vi.useRealTimers();
});

async function loaded(query = ''): Promise<Gallery> {
	const gallery = new Gallery();
	await gallery.load(readFilters(new URLSearchParams(query)));
	expect(gallery.state).toBe('ready');
	return gallery;
}

/** Let the gathered events be fetched, retries included. */
async function settle(): Promise<void> {
	await vi.advanceTimersByTimeAsync(10_000);
}

describe('live events in the gallery', () => {
	it('adds to "New" only for an upload or a generation', () => {
		expect(mayAdd('uploaded')).toBe(true);
		expect(mayAdd('generated')).toBe(true);
		for (const type of ['approved', 'rejected', 'captioned', 'ingested', 'failed.caption']) {
			expect(mayAdd(type)).toBe(false);
		}
	});

	it('leaves an old image whose page is not loaded where it is counted', async () => {
		const gallery = await loaded();
		gateway.docs.set('january', doc('january', '2025-01-15T08:00:00.000Z', { approval: 'approved' }));

		gallery.hear('approved', { image_id: 'january' });
		gallery.hear('captioned', { image_id: 'january' });
		gallery.hear('failed.caption', { image_id: 'january' });
		await settle();

		expect(gateway.fetched('january')).toBe(0); // its page shows it as it is when it loads
		expect(gallery.buckets.map((b) => [b.key, b.count])).toEqual([
			['new', 0],
			['2026-11', 3],
			['2025-01', 5000]
		]);
		expect(gallery.total).toBe(5003);
	});

	it('does not take an upload heard again (after a reconnect) for a new image', async () => {
		const gallery = await loaded();
		gateway.docs.set('old', doc('old', '2026-11-28T09:00:00.000Z'));
		gateway.docs.set('new', doc('new', '2026-11-28T10:05:00.000Z'));

		gallery.hear('uploaded', { image_id: 'old' });
		gallery.hear('uploaded', { image_id: 'new' });
		await settle();

		expect(gallery.buckets[0].items?.map((d) => d.id)).toEqual(['new']);
		expect(gallery.total).toBe(5004);
	});

	it('fetches a burst of events a few at a time, once per image, and caps "New"', async () => {
		const gallery = await loaded();
		const arrivals = 1000;
		for (let n = 0; n < arrivals; n++) {
			const id = `new-${n}`;
			gateway.docs.set(id, doc(id, `2026-11-28T11:00:00.${String(n).padStart(3, '0')}Z`, { stages: { uploaded: '2026-11-28T11:00:00.000Z' } }));
			gallery.hear('uploaded', { image_id: id });
			gallery.hear('ingested', { image_id: id }); // the same image again, in the same moment
		}
		expect(gateway.urls.filter((u) => u.startsWith('/api/images/new-'))).toHaveLength(0); // gathered first
		await vi.advanceTimersByTimeAsync(LIVE_WINDOW_MS);
		await settle();

		const fetches = gateway.urls.filter((u) => u.startsWith('/api/images/new-'));
		expect(fetches.length).toBe(NEW_CAP); // past the cap, arrivals are counted, not fetched
		expect(new Set(fetches).size).toBe(fetches.length);
		expect(gateway.mostInFlight).toBeLessThanOrEqual(LIVE_FETCHES);
		expect(gallery.buckets[0].count).toBe(NEW_CAP);
		expect(gallery.more).toBe(arrivals - NEW_CAP);
		expect(gallery.total).toBe(5003 + NEW_CAP);
	});

	it('sorted by the date taken, puts an image uploaded after as_of in "New", not in its month', async () => {
		const gallery = await loaded('sort=taken');
		const taken = '2025-01-10T12:00:00.000Z'; // January's, a month counted at load
		gateway.docs.set('counted', doc('counted', '2026-11-28T10:00:00.500Z', { taken }));
		gateway.docs.set('later', doc('later', '2026-11-28T10:00:00.501Z', { taken }));

		gallery.hear('uploaded', { image_id: 'counted' }); // heard again: its month holds it
		gallery.hear('uploaded', { image_id: 'later' });
		await settle();

		expect(gallery.buckets.map((b) => [b.key, b.count])).toEqual([
			['new', 1],
			['2026-11', 3],
			['2025-01', 5000]
		]);
		expect(gallery.buckets[0].items?.map((d) => d.id)).toEqual(['later']);
		expect(gallery.total).toBe(5004);
	});

	it('fetches a decided image once when its decision shows', async () => {
		const gallery = await loaded();
		gateway.docs.set('fresh', doc('fresh', '2026-11-28T10:05:00.000Z'));
		gallery.hear('uploaded', { image_id: 'fresh' });
		await settle();
		gateway.docs.set('fresh', doc('fresh', '2026-11-28T10:05:00.000Z', { approval: 'rejected' }));
		const before = gateway.fetched('fresh');

		gallery.hear('rejected', { image_id: 'fresh' });
		await settle();

		expect(gateway.fetched('fresh') - before).toBe(1);
		expect(gallery.buckets[0].items?.[0].approval).toBe('rejected');
	});
});

describe('pages of a month', () => {
	it('bounds every page by the timeline: page 0 by its until, the others by their cursor too', async () => {
		const gallery = await loaded();
		gallery.want([
			{ bucket: 2, page: 0 },
			{ bucket: 2, page: 3 }
		]);
		await settle();
		const pages = gateway.urls.filter((u) => u.startsWith('/api/images?')).map((u) => new URLSearchParams(u.split('?')[1]));
		expect(pages.map((p) => [p.get('until'), p.get('cursor')])).toEqual([
			[JANUARY.until, null],
			[JANUARY.until, 'cursor-3']
		]);
	});

	it('asks every page, whatever the sort, for the images the timeline counted (its as_of)', async () => {
		for (const query of ['', 'sort=taken', 'sort=taken&order=asc&tag=dog']) {
			gateway.urls = [];
			const gallery = await loaded(query);
			gallery.want([
				{ bucket: 1, page: 0 },
				{ bucket: 2, page: 0 },
				{ bucket: 2, page: 5 }
			]);
			await settle();
			const pages = gateway.urls.filter((u) => u.startsWith('/api/images?')).map((u) => new URLSearchParams(u.split('?')[1]));
			expect(pages.map((p) => p.get('as_of'))).toEqual([AS_OF, AS_OF, AS_OF]);
			expect(pages[0].get('sort')).toBe(new URLSearchParams(query).get('sort'));
		}
	});

	it('says why a page could not be loaded, in the server\'s words', async () => {
		const gallery = await loaded();
		gateway.pageStatus = 503;
		gallery.want([{ bucket: 1, page: 0 }]);
		await settle();
		expect(gallery.failedPages).toBe(1);
		expect(gallery.pageError).toBe('the database is down');
	});
});
