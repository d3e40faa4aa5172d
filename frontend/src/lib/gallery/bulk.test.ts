import { describe, expect, it } from 'vitest';
import { chunks, MAX_IDS, zipRefusal } from './bulk';

describe('bulk limits', () => {
	it('splits a selection into requests the server takes', () => {
		const ids = Array.from({ length: 1201 }, (_, n) => `i${n}`);
		const runs = chunks(ids);
		expect(runs.map((run) => run.length)).toEqual([MAX_IDS, MAX_IDS, 201]);
		expect(runs.flat()).toEqual(ids);
		expect(chunks([])).toEqual([]);
	});

	it('refuses a zip of more than 500 images, saying how many are selected', () => {
		expect(zipRefusal(500)).toBe('');
		expect(zipRefusal(9600)).toBe('A zip holds at most 500 images: 9,600 are selected.');
	});
});
