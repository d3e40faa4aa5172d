import { describe, expect, it } from 'vitest';
import { merge, step, type Slide } from './slides';
import { apiQuery, pageQuery, parseSettings } from './settings';

const slide = (id: string): Slide => ({
	id,
	display: `/api/images/${id}/display`,
	thumbnail: `/api/images/${id}/thumbnail`,
	width: 10,
	height: 10,
	blurhash: null,
	date: '2026-01-01T00:00:00Z',
	caption: null,
	overlay: null
});
const ids = (slides: Slide[]): string[] => slides.map((s) => s.id);

describe('the slideshow order', () => {
	it('starts at the first slide and wraps both ways', () => {
		let show = merge({ slides: [], index: 0 }, ['a', 'b', 'c'].map(slide));
		expect(show.index).toBe(0);
		show = step(show, -1);
		expect(show.index).toBe(2);
		show = step(show, 1);
		expect(show.index).toBe(0);
		expect(step({ slides: [], index: 0 }, 1).index).toBe(0);
	});

	it('shows a new approval next, keeping the slide on screen', () => {
		const show = { slides: ['a', 'b', 'c'].map(slide), index: 1 }; // on b
		const fresh = ['new', 'a', 'b', 'c'].map(slide); // newest first: the new one sorts first
		const merged = merge(show, fresh);
		expect(ids(merged.slides)).toEqual(['a', 'b', 'new', 'c']);
		expect(merged.slides[merged.index].id).toBe('b');
		expect(step(merged, 1).slides[step(merged, 1).index].id).toBe('new');
	});

	it('gives the place of a slide that left to the next one', () => {
		const show = { slides: ['a', 'b', 'c'].map(slide), index: 1 }; // on b, b is rejected
		const merged = merge(show, ['a', 'c'].map(slide));
		expect(merged.slides[merged.index].id).toBe('c');
		const last = merge({ slides: ['a', 'b'].map(slide), index: 1 }, ['a'].map(slide));
		expect(last.slides[last.index].id).toBe('a');
		const replaced = merge({ slides: ['a'].map(slide), index: 0 }, ['z'].map(slide));
		expect(ids(replaced.slides)).toEqual(['z']);
	});
});

describe('the kiosk URL', () => {
	it('reads its settings, falling back to the defaults', () => {
		const settings = parseSettings(new URLSearchParams('kiosk&interval=3&shuffle=1&overlay=caption&order=asc'), () => 99);
		expect(settings).toEqual({ kiosk: true, interval: 3, shuffle: true, seed: 99, sort: 'taken', order: 'asc', overlay: 'caption' });
		const fallback = parseSettings(new URLSearchParams('interval=0&overlay=x&seed=-4&sort=nope'), () => 5);
		expect(fallback).toEqual({ kiosk: false, interval: 10, shuffle: false, seed: 0, sort: 'taken', order: 'desc', overlay: 'date' });
		expect(parseSettings(new URLSearchParams('shuffle=1&seed=7'), () => 5).seed).toBe(7);
		// the layout hides the header for any ?kiosk: the carousel is a kiosk on the same rule
		expect(parseSettings(new URLSearchParams('kiosk=0'), () => 5).kiosk).toBe(true);
	});

	it('writes them back, and asks the gateway for the same', () => {
		const settings = parseSettings(new URLSearchParams('kiosk&interval=3&shuffle=1&seed=7'), () => 0);
		expect(pageQuery(settings)).toBe('kiosk&interval=3&shuffle=1&seed=7&overlay=date');
		expect(pageQuery(settings, false)).toBe('interval=3&shuffle=1&seed=7&overlay=date');
		expect(apiQuery(settings)).toEqual({ interval: 3, shuffle: true, seed: 7, sort: 'taken', order: 'desc', overlay: 'date' });
	});
});
