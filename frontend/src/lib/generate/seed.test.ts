import { describe, expect, it } from 'vitest';
import { parseSeed, rollSeed, SEED_RANGE } from './seed';

describe('rollSeed', () => {
	it('gives a whole number in [0, 2^32) from the browser source', () => {
		for (let i = 0; i < 50; i++) {
			const seed = rollSeed();
			expect(Number.isInteger(seed)).toBe(true);
			expect(seed).toBeGreaterThanOrEqual(0);
			expect(seed).toBeLessThan(SEED_RANGE);
		}
		expect(new Set(Array.from({ length: 20 }, () => rollSeed())).size).toBeGreaterThan(1);
	});
	it('folds any source into the range', () => {
		expect(rollSeed(() => 7)).toBe(7);
		expect(rollSeed(() => SEED_RANGE + 3)).toBe(3);
		expect(rollSeed(() => -5.5)).toBe(5);
	});
});

describe('parseSeed', () => {
	it('takes whole numbers up to the maximum, else null (the server draws)', () => {
		expect(parseSeed(' 42 ', 100)).toBe(42);
		expect(parseSeed('', 100)).toBeNull();
		expect(parseSeed('4.2', 100)).toBeNull();
		expect(parseSeed('-1', 100)).toBeNull();
		expect(parseSeed('101', 100)).toBeNull();
	});
});
