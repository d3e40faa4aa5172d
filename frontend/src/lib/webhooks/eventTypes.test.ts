import { describe, expect, it } from 'vitest';
import { describeTypes, fromFilter, toFilter } from './eventTypes';

describe('event-type filter', () => {
	it('is null for all events', () => {
		expect(fromFilter({ all: true, chosen: ['captioned'], more: 'x' })).toBeNull();
		expect(toFilter(null)).toEqual({ all: true, chosen: [], more: '' });
	});

	it('joins the chosen types and the others, each once, sorted', () => {
		expect(fromFilter({ all: false, chosen: ['captioned', 'failed.*'], more: 'failed.caption,  captioned approved' })).toEqual([
			'approved',
			'captioned',
			'failed.*',
			'failed.caption'
		]);
		expect(fromFilter({ all: false, chosen: [], more: ' ' })).toEqual([]);
	});

	it('splits an endpoint’s types into known ones and the rest, and back', () => {
		const filter = toFilter(['captioned', 'failed.caption']);
		expect(filter).toEqual({ all: false, chosen: ['captioned'], more: 'failed.caption' });
		expect(fromFilter(filter)).toEqual(['captioned', 'failed.caption']);
		expect(describeTypes(null)).toBe('all events');
		expect(describeTypes(['a', 'b'])).toBe('a, b');
	});
});
