import { describe, expect, it } from 'vitest';
import { admits, readFilters } from './filters';

const photo = {
	status: 'ready',
	approval: 'none',
	tags: ['dog'],
	created: '2026-11-28T10:00:00.000Z', // uploaded today...
	taken: '2025-01-10T12:00:00.000Z' // ...taken last year
};

describe('the filters a live image is checked against', () => {
	it('bound the sort key by the dates: the date taken when sorted by it', () => {
		const january = 'from=2025-01-01&to=2025-01-31';
		expect(admits(readFilters(new URLSearchParams(`${january}&sort=taken`)), photo)).toBe(true);
		expect(admits(readFilters(new URLSearchParams(january)), photo)).toBe(false);
		expect(admits(readFilters(new URLSearchParams('to=2025-01-09&sort=taken')), photo)).toBe(false);
		expect(admits(readFilters(new URLSearchParams('from=2025-01-11&sort=taken')), photo)).toBe(false);
		expect(admits(readFilters(new URLSearchParams('from=2026-11-28&to=2026-11-28')), photo)).toBe(true);
		// Without a date taken, its upload time is its date.
		const undated = { ...photo, taken: null };
		expect(admits(readFilters(new URLSearchParams('from=2026-11-28&sort=taken')), undated)).toBe(true);
	});

	it('leave words and similar images to the server, and check the rest', () => {
		expect(admits(readFilters(new URLSearchParams('q=dog')), photo)).toBe(false);
		expect(admits(readFilters(new URLSearchParams('tag=dog&status=ready')), photo)).toBe(true);
		expect(admits(readFilters(new URLSearchParams('tag=cat')), photo)).toBe(false);
		expect(admits(readFilters(new URLSearchParams('approval=pending')), photo)).toBe(false);
	});
});
