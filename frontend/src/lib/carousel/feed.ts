/**
 * Reading the carousel's images: every page of GET /api/carousel (up to a bound), and again
 * only when its ETag says the set changed (If-None-Match answered 304 costs no page).
 */
import { ApiError, request, withQuery } from '$lib/api';
import type { Slide } from './slides';

export const PAGE = 500;
export const MAX_SLIDES = 5000;

interface CarouselPage {
	items: Slide[];
	total: number;
	next_cursor: string | null;
}

export interface Feed {
	slides: Slide[];
	total: number;
	etag: string | null;
}

/** The slides for ``query``; null when ``etag`` is still current. */
export async function readFeed(
	query: Record<string, string | number | boolean>,
	etag: string | null
): Promise<Feed | null> {
	const slides: Slide[] = [];
	let cursor: string | null = null;
	let total = 0;
	let tag: string | null = null;
	do {
		const headers: Record<string, string> = cursor === null && etag ? { 'If-None-Match': etag } : {};
		let response: Response;
		try {
			response = await request(withQuery('/api/carousel', { ...query, limit: PAGE, cursor }), { headers });
		} catch (e) {
			if (e instanceof ApiError && e.status === 304) return null;
			throw e;
		}
		if (cursor === null) tag = response.headers.get('ETag');
		const page = (await response.json()) as CarouselPage;
		slides.push(...page.items);
		total = page.total;
		cursor = page.next_cursor;
	} while (cursor !== null && slides.length < MAX_SLIDES);
	return { slides, total, etag: tag };
}
