/**
 * The gallery's geometry, from counts alone: square tiles in columns that fill the width,
 * each month a heading then its rows, one tall spacer for all of them. Everything here is
 * pure arithmetic, so the scroll height is known before a single image has loaded, and a
 * scroll offset maps straight to the months, rows and items in view.
 */

export interface Geometry {
	columns: number;
	/** a tile's side, px */
	tile: number;
	gap: number;
	/** the month heading's height, px */
	header: number;
}

export interface Placed {
	/** top of each bucket (its heading), px from the grid's top */
	tops: number[];
	/** the grid's whole height */
	height: number;
}

/** One item in view: which bucket and item, and where. */
export interface Slot {
	bucket: number;
	index: number;
	x: number;
	y: number;
}

export interface Span {
	bucket: number;
	/** items [first, last) of the bucket */
	first: number;
	last: number;
}

export const GAP = 4;
export const HEADER = 40;

/** Columns and tile size for a width: tiles near ``target`` px, never fewer than two. */
export function geometry(width: number, target = 180, gap = GAP, header = HEADER): Geometry {
	const usable = Math.max(width, 1);
	const columns = Math.max(2, Math.floor((usable + gap) / (target + gap)));
	const tile = Math.max(1, (usable - gap * (columns - 1)) / columns);
	return { columns, tile, gap, header };
}

export function rowsOf(count: number, g: Geometry): number {
	return Math.ceil(count / g.columns);
}

/** A bucket's height: its heading and its rows (with a gap under each); none when empty. */
export function bucketHeight(count: number, g: Geometry): number {
	return count === 0 ? 0 : g.header + rowsOf(count, g) * (g.tile + g.gap);
}

/** Every bucket's top, and the whole height, from the counts. */
export function place(counts: readonly number[], g: Geometry): Placed {
	const tops: number[] = [];
	let y = 0;
	for (const count of counts) {
		tops.push(y);
		y += bucketHeight(count, g);
	}
	return { tops, height: y };
}

/** The last bucket whose top is at or above ``y`` (binary search; 0 if none). */
export function bucketAt(placed: Placed, y: number): number {
	let low = 0;
	let high = placed.tops.length - 1;
	while (low < high) {
		const mid = (low + high + 1) >> 1;
		if (placed.tops[mid] <= y) low = mid;
		else high = mid - 1;
	}
	return Math.max(0, low);
}

/**
 * The items that overlap [top, bottom) (px from the grid's top), bucket by bucket, whole
 * rows at a time. The caller widens the window by its margin.
 */
export function visible(
	counts: readonly number[],
	placed: Placed,
	g: Geometry,
	top: number,
	bottom: number
): Span[] {
	const spans: Span[] = [];
	if (counts.length === 0 || bottom <= 0 || top >= placed.height) return spans;
	const row = g.tile + g.gap;
	for (let b = bucketAt(placed, Math.max(0, top)); b < counts.length; b++) {
		const start = placed.tops[b] + g.header; // first row's top
		if (placed.tops[b] >= bottom) break;
		const rows = rowsOf(counts[b], g);
		const firstRow = Math.max(0, Math.floor((top - start) / row));
		const lastRow = Math.min(rows, Math.ceil((bottom - start) / row));
		if (lastRow > firstRow) {
			spans.push({
				bucket: b,
				first: firstRow * g.columns,
				last: Math.min(counts[b], lastRow * g.columns)
			});
		}
	}
	return spans;
}

/** Where item ``index`` of bucket ``bucket`` sits. */
export function slot(placed: Placed, g: Geometry, bucket: number, index: number): Slot {
	const row = Math.floor(index / g.columns);
	const column = index % g.columns;
	return {
		bucket,
		index,
		x: column * (g.tile + g.gap),
		y: placed.tops[bucket] + g.header + row * (g.tile + g.gap)
	};
}

/** The pages (of ``pageSize`` items) a span needs. */
export function pagesOf(span: Span, pageSize: number): number[] {
	const pages: number[] = [];
	if (span.last <= span.first) return pages;
	for (let p = Math.floor(span.first / pageSize); p <= Math.floor((span.last - 1) / pageSize); p++) {
		pages.push(p);
	}
	return pages;
}

/**
 * Keyboard movement between tiles: ``step`` is -1/+1 (left/right, across buckets) or
 * -columns/+columns (up/down: the same column of the row above or below, into the next
 * bucket's first or the previous bucket's last row).
 */
export function move(
	counts: readonly number[],
	g: Geometry,
	at: { bucket: number; index: number },
	key: 'left' | 'right' | 'up' | 'down' | 'home' | 'end'
): { bucket: number; index: number } {
	const { bucket, index } = at;
	const last = counts.length - 1;
	const nonEmpty = (from: number, dir: 1 | -1): number => {
		for (let b = from; b >= 0 && b <= last; b += dir) if (counts[b] > 0) return b;
		return -1;
	};
	if (key === 'home') {
		const b = nonEmpty(0, 1);
		return b < 0 ? at : { bucket: b, index: 0 };
	}
	if (key === 'end') {
		const b = nonEmpty(last, -1);
		return b < 0 ? at : { bucket: b, index: counts[b] - 1 };
	}
	if (key === 'right') {
		if (index + 1 < counts[bucket]) return { bucket, index: index + 1 };
		const b = nonEmpty(bucket + 1, 1);
		return b < 0 ? at : { bucket: b, index: 0 };
	}
	if (key === 'left') {
		if (index > 0) return { bucket, index: index - 1 };
		const b = nonEmpty(bucket - 1, -1);
		return b < 0 ? at : { bucket: b, index: counts[b] - 1 };
	}
	const column = index % g.columns;
	if (key === 'down') {
		if (index + g.columns < counts[bucket]) return { bucket, index: index + g.columns };
		// the next row exists, but is short: its last item
		if (rowsOf(counts[bucket], g) > Math.floor(index / g.columns) + 1) {
			return { bucket, index: counts[bucket] - 1 };
		}
		const b = nonEmpty(bucket + 1, 1);
		return b < 0 ? at : { bucket: b, index: Math.min(column, counts[b] - 1) };
	}
	if (index - g.columns >= 0) return { bucket, index: index - g.columns };
	const b = nonEmpty(bucket - 1, -1);
	if (b < 0) return at;
	const lastRow = rowsOf(counts[b], g) - 1;
	return { bucket: b, index: Math.min(lastRow * g.columns + column, counts[b] - 1) };
}
