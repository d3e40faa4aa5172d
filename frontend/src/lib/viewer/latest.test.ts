import { describe, expect, it } from 'vitest';
import { Latest } from './latest';

describe('the newest request only', () => {
	it('aborts the one before when another starts, and the last one on stop', () => {
		const latest = new Latest();
		const first = latest.start(); // image a's lineage, after a live event
		const second = latest.start(); // the viewer moved to image b
		expect(first.aborted).toBe(true);
		expect(second.aborted).toBe(false);
		latest.stop(); // the viewer left b
		expect(second.aborted).toBe(true);
	});
});
