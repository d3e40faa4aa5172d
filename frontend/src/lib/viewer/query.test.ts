import { afterEach, describe, expect, it, vi } from 'vitest';
import { readFilters } from '$lib/gallery/filters';
import { galleryHref, neighboursOf, viewerHref } from './query';

function answering(body: unknown) {
	const fetch = vi.fn(async () => new Response(JSON.stringify(body), { headers: { 'Content-Type': 'application/json' } }));
	vi.stubGlobal('fetch', fetch);
	return fetch;
}

afterEach(() => vi.unstubAllGlobals());

describe('the gallery list in the viewer', () => {
	it("keeps the gallery's query string both ways", () => {
		expect(viewerHref('abc', 'tag=fox&order=asc')).toBe('/images/abc?tag=fox&order=asc');
		expect(viewerHref('abc', '')).toBe('/images/abc');
		expect(galleryHref('tag=fox')).toBe('/?tag=fox');
		expect(galleryHref('')).toBe('/');
	});

	it("asks the server for the neighbours with the list's own API parameters", async () => {
		const fetch = answering({ previous: null, next: { id: 'n' } });
		const filters = readFilters(new URLSearchParams('tag=fox&from=2026-01-01&to=2026-01-31&order=asc'));
		const found = await neighboursOf('abc', filters);
		expect(found.next?.id).toBe('n');
		const url = new URL(String((fetch.mock.calls[0] as unknown[])[0]), 'http://x');
		expect(url.pathname).toBe('/api/images/abc/neighbours');
		expect(Object.fromEntries(url.searchParams)).toEqual({
			tag: 'fox',
			since: '2026-01-01T00:00:00Z',
			until: '2026-02-01T00:00:00.000Z',
			order: 'asc'
		});
	});

	it('walks the images like one by their place in the ranking', async () => {
		answering({ items: [{ id: 'a' }, { id: 'b' }, { id: 'c' }] });
		const filters = readFilters(new URLSearchParams('similar=seed'));
		const around = await neighboursOf('b', filters);
		expect([around.previous?.id, around.next?.id]).toEqual(['a', 'c']);
		const first = await neighboursOf('a', filters);
		expect([first.previous, first.next?.id]).toEqual([null, 'b']);
		expect(await neighboursOf('elsewhere', filters)).toEqual({ previous: null, next: null });
	});
});
