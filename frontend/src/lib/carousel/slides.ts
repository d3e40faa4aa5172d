/**
 * The slideshow's order: what the gateway lists (sorted, or shuffled by seed), with images
 * that arrive while it runs (a new approval) shown next, and the slide on screen kept on
 * screen when the list changes.
 */

export interface Slide {
	id: string;
	display: string;
	thumbnail: string;
	width: number | null;
	height: number | null;
	blurhash: string | null;
	date: string;
	caption: string | null;
	overlay: string | null;
}

export interface Show {
	slides: Slide[];
	/** the slide on screen */
	index: number;
}

/** ``fresh`` (the gateway's new list) replacing ``show``'s: the slide on screen stays at
 * the new index of its image, and images new to the show come right after it. A slide on
 * screen that left the list gives its place to the next one. */
export function merge(show: Show, fresh: Slide[]): Show {
	if (show.slides.length === 0) return { slides: fresh, index: 0 };
	const known = new Set(show.slides.map((s) => s.id));
	const current = show.slides[show.index]?.id;
	const added = fresh.filter((s) => !known.has(s.id));
	const kept = fresh.filter((s) => known.has(s.id));
	if (kept.length === 0) return { slides: [...added], index: 0 };
	let at = kept.findIndex((s) => s.id === current);
	if (at < 0) {
		// the slide on screen went: the next one it had that is still listed takes its place
		const after = show.slides.slice(show.index + 1).find((s) => kept.some((k) => k.id === s.id));
		const place = after ? kept.findIndex((s) => s.id === after.id) : 0;
		return { slides: [...kept.slice(0, place), ...added, ...kept.slice(place)], index: place };
	}
	return { slides: [...kept.slice(0, at + 1), ...added, ...kept.slice(at + 1)], index: at };
}

export function step(show: Show, by: number): Show {
	const count = show.slides.length;
	if (count === 0) return show;
	return { ...show, index: (((show.index + by) % count) + count) % count };
}
