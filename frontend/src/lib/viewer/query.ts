/**
 * The gallery's list, carried in the viewer's query string as the gallery writes it
 * (/images/{id}?tag=fox&order=asc, see $lib/gallery/filters), so ←/→ walk the same list in
 * the same order and Esc goes back to it.
 */
import { getJson } from '$lib/api';
import { listQuery, type Filters } from '$lib/gallery/filters';
import type { ImageDoc } from '$lib/types';
import type { Neighbours } from './doc';

const SIMILAR_LIMIT = 100; // as many as the gallery shows of the images like one

/** The viewer of ``id`` within the list (``search``: the gallery's query string). */
export function viewerHref(id: string, search: string): string {
	return `/images/${encodeURIComponent(id)}${search ? `?${search}` : ''}`;
}

/** The gallery showing the list. */
export function galleryHref(search: string): string {
	return search ? `/?${search}` : '/';
}

/** The images before and after ``id`` in the gallery's list: by keyset from the server, or,
 * for the images like one (a ranking, not a sorted list), by place in that ranking. */
export async function neighboursOf(id: string, filters: Filters, signal?: AbortSignal): Promise<Neighbours> {
	if (!filters.similar) return getJson<Neighbours>(`/api/images/${encodeURIComponent(id)}/neighbours`, listQuery(filters), signal);
	const ranking = await getJson<{ items: ImageDoc[] }>(
		`/api/images/${encodeURIComponent(filters.similar)}/similar`,
		{
			limit: SIMILAR_LIMIT,
			tag: filters.tag || undefined,
			status: filters.status || undefined,
			approval: filters.approval || undefined
		},
		signal
	);
	const at = ranking.items.findIndex((item) => item.id === id);
	if (at < 0) return { previous: null, next: null };
	return { previous: ranking.items[at - 1] ?? null, next: ranking.items[at + 1] ?? null };
}
