/** The limits of the gallery's bulk actions: the server takes at most 500 ids a request. */

/** POST /api/approvals and POST /api/images/zip take this many ids at most. */
export const MAX_IDS = 500;

/** ``ids`` in runs of at most ``size``, in order. */
export function chunks<T>(ids: readonly T[], size = MAX_IDS): T[][] {
	const out: T[][] = [];
	for (let start = 0; start < ids.length; start += size) out.push(ids.slice(start, start + size));
	return out;
}

/** Why ``count`` selected images cannot go in one zip, or '' when they can. */
export function zipRefusal(count: number): string {
	return count > MAX_IDS
		? `A zip holds at most ${MAX_IDS} images: ${count.toLocaleString('en')} are selected.`
		: '';
}
