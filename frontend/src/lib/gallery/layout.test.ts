import { describe, expect, it } from 'vitest';
import { bucketAt, geometry, move, pagesOf, place, slot, visible } from './layout';

describe('geometry', () => {
	it('fills the width with square tiles near the target size, at least two columns', () => {
		const g = geometry(1000, 180, 4, 40);
		expect(g.columns).toBe(5); // (1000 + 4) / 184 = 5.4
		expect(g.tile * 5 + 4 * 4).toBeCloseTo(1000);
		expect(geometry(200, 180).columns).toBe(2);
	});
});

describe('place and visible', () => {
	const g = { columns: 4, tile: 96, gap: 4, header: 40 }; // rows are 100 px
	const counts = [10, 100_000, 3]; // 3 rows, 25,000 rows, 1 row
	const placed = place(counts, g);

	it('lays out months from counts alone', () => {
		expect(placed.tops).toEqual([0, 340, 340 + 40 + 2_500_000]);
		expect(placed.height).toBe(340 + 2_500_040 + 140);
		expect(bucketAt(placed, 0)).toBe(0);
		expect(bucketAt(placed, 339)).toBe(0);
		expect(bucketAt(placed, 340)).toBe(1);
		expect(bucketAt(placed, 10_000_000)).toBe(2);
	});

	it('maps a scroll offset in the middle of a huge month to its rows only', () => {
		const top = 340 + 40 + 1_250_000; // row 12,500 of the big month
		const spans = visible(counts, placed, g, top, top + 800);
		expect(spans).toEqual([{ bucket: 1, first: 50_000, last: 50_032 }]);
		expect(pagesOf(spans[0], 200)).toEqual([250]);
	});

	it('spans month boundaries and clips partial rows', () => {
		const spans = visible(counts, placed, g, 150, 450);
		// rows 1-2 of the first month (items 4..9), then the big month's first row
		expect(spans).toEqual([
			{ bucket: 0, first: 4, last: 10 },
			{ bucket: 1, first: 0, last: 4 }
		]);
		const end = visible(counts, placed, g, placed.height - 100, placed.height + 500);
		expect(end).toEqual([{ bucket: 2, first: 0, last: 3 }]);
		expect(visible(counts, placed, g, -500, 0)).toEqual([]);
		// an empty bucket takes no room
		expect(place([0, 3], g).tops).toEqual([0, 0]);
		expect(visible([0, 3], place([0, 3], g), g, 0, 500)).toEqual([{ bucket: 1, first: 0, last: 3 }]);
	});

	it('bounds what is in view by the window, whatever the count', () => {
		const spans = visible(counts, placed, g, 1_000_000, 1_000_000 + 2000);
		const items = spans.reduce((n, s) => n + s.last - s.first, 0);
		expect(items).toBeLessThanOrEqual((2000 / 100 + 1) * 4);
	});

	it('places items by row and column under their heading', () => {
		expect(slot(placed, g, 0, 5)).toEqual({ bucket: 0, index: 5, x: 100, y: 140 });
		expect(slot(placed, g, 2, 2)).toMatchObject({ x: 200, y: placed.tops[2] + 40 });
	});

	it('pages a span by page size', () => {
		expect(pagesOf({ bucket: 0, first: 190, last: 410 }, 200)).toEqual([0, 1, 2]);
		expect(pagesOf({ bucket: 0, first: 5, last: 5 }, 200)).toEqual([]);
	});
});

describe('move', () => {
	const g = { columns: 4, tile: 96, gap: 4, header: 40 };
	const counts = [6, 0, 9];
	it('moves across rows and months, skipping empty ones', () => {
		expect(move(counts, g, { bucket: 0, index: 1 }, 'down')).toEqual({ bucket: 0, index: 5 });
		expect(move(counts, g, { bucket: 0, index: 3 }, 'down')).toEqual({ bucket: 0, index: 5 });
		expect(move(counts, g, { bucket: 0, index: 5 }, 'down')).toEqual({ bucket: 2, index: 1 });
		expect(move(counts, g, { bucket: 2, index: 2 }, 'up')).toEqual({ bucket: 0, index: 5 });
		expect(move(counts, g, { bucket: 2, index: 0 }, 'up')).toEqual({ bucket: 0, index: 4 });
		expect(move(counts, g, { bucket: 0, index: 5 }, 'right')).toEqual({ bucket: 2, index: 0 });
		expect(move(counts, g, { bucket: 2, index: 0 }, 'left')).toEqual({ bucket: 0, index: 5 });
		expect(move(counts, g, { bucket: 2, index: 8 }, 'right')).toEqual({ bucket: 2, index: 8 });
		expect(move(counts, g, { bucket: 2, index: 4 }, 'home')).toEqual({ bucket: 0, index: 0 });
		expect(move(counts, g, { bucket: 0, index: 4 }, 'end')).toEqual({ bucket: 2, index: 8 });
	});
});
