import { describe, expect, it } from 'vitest';
import { addSample, heldUntil, perMinute, type Sample } from './rate';

const S = 1000;

describe('perMinute', () => {
	it('is the rise over the last minute', () => {
		const samples: Sample[] = [
			{ t: 0, count: 10 },
			{ t: 30 * S, count: 25 },
			{ t: 60 * S, count: 40 }
		];
		expect(perMinute(samples, 60 * S)).toBe(30);
	});

	it('measures a series younger than the window over its own age', () => {
		const samples = [
			{ t: 0, count: 0 },
			{ t: 10 * S, count: 5 }
		];
		expect(perMinute(samples, 15 * S)).toBe(20); // 5 in 15 s
	});

	it('decays to 0 once the count stops rising for a window', () => {
		let samples: Sample[] = [];
		samples = addSample(samples, 0, 0);
		samples = addSample(samples, 10 * S, 6);
		expect(perMinute(samples, 10 * S)).toBe(36);
		expect(perMinute(samples, 40 * S)).toBe(9); // 6 in the 40 s since the start
		expect(perMinute(samples, 71 * S)).toBe(0); // the window holds no rise any more
	});

	it('does not know from fewer than two samples', () => {
		expect(perMinute([], 0)).toBeNull();
		expect(perMinute([{ t: 0, count: 3 }], 5 * S)).toBeNull();
	});
});

describe('addSample', () => {
	it('keeps the window and one sample before it as the base', () => {
		let samples: Sample[] = [];
		for (let i = 0; i <= 10; i++) samples = addSample(samples, i * 20 * S, i);
		// at 200 s the window starts at 140 s: 140 s is the base, then 160, 180, 200
		expect(samples.map((s) => s.t / S)).toEqual([140, 160, 180, 200]);
		expect(perMinute(samples, 200 * S)).toBe(3);
	});

	it('starts afresh when the count falls (a consumer made anew)', () => {
		let samples = addSample([], 0, 100);
		samples = addSample(samples, 10 * S, 120);
		samples = addSample(samples, 20 * S, 4);
		expect(samples).toEqual([{ t: 20 * S, count: 4 }]);
		expect(perMinute(samples, 20 * S)).toBeNull();
	});
});

describe('heldUntil', () => {
	it('knows a live count that did not move is a rate of 0', () => {
		const opened = [{ t: 0, count: 0 }];
		expect(perMinute(opened, 30 * S)).toBeNull();
		expect(perMinute(heldUntil(opened, 30 * S), 30 * S)).toBe(0);
		expect(heldUntil(opened, 0)).toBe(opened);
	});
});
