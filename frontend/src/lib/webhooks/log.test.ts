import { describe, expect, it } from 'vitest';
import { appendOlder, mergeNewest } from './log';
import type { DeliveryAttempt } from './types';

function attempt(id: number, state = 'delivered'): DeliveryAttempt {
	return {
		id,
		webhook_id: `msg_${id}`,
		event_id: `e${id}`,
		event_type: 'uploaded',
		attempt: 1,
		status_code: 200,
		latency_ms: 3,
		error: null,
		delivered: true,
		message_state: state,
		at: '2026-11-28T18:00:00Z'
	};
}

/** Attempts ``from`` down to ``to`` (newest first, as the server lists them). */
function range(from: number, to: number): DeliveryAttempt[] {
	return Array.from({ length: from - to + 1 }, (_, i) => attempt(from - i));
}

describe('the delivery log read again', () => {
	it('keeps the older pages and their cursor, and puts new attempts on top', () => {
		// two pages loaded: 100..51 then 50..1; 0 is not there yet (cursor 1)
		const loaded = { items: range(100, 1), nextBefore: 1 };
		const newest = { items: [attempt(102), attempt(101), ...range(100, 53)], next_before: 53 };
		const merged = mergeNewest(loaded, newest);
		expect(merged.items.map((a) => a.id)).toEqual(range(102, 1).map((a) => a.id));
		expect(merged.nextBefore).toBe(1);
	});

	it('takes the newest state of attempts it already has', () => {
		const loaded = { items: [attempt(2, 'pending'), attempt(1)], nextBefore: null };
		const merged = mergeNewest(loaded, { items: [attempt(2, 'failed'), attempt(1)], next_before: null });
		expect(merged.items.map((a) => a.message_state)).toEqual(['failed', 'delivered']);
		expect(merged.nextBefore).toBeNull();
	});

	it('starts again from the page when more came than a page holds (no gap)', () => {
		const loaded = { items: range(10, 1), nextBefore: null };
		const merged = mergeNewest(loaded, { items: range(70, 21), next_before: 21 });
		expect(merged.items.map((a) => a.id)).toEqual(range(70, 21).map((a) => a.id));
		expect(merged.nextBefore).toBe(21);
	});

	it('takes the first page as it is', () => {
		expect(mergeNewest(null, { items: range(3, 1), next_before: null }).items).toHaveLength(3);
	});

	it('lists an attempt once when an older page overlaps', () => {
		expect(appendOlder(range(5, 3), range(3, 1)).map((a) => a.id)).toEqual([5, 4, 3, 2, 1]);
	});
});
