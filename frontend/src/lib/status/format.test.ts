import { describe, expect, it } from 'vitest';
import { formatAgo, formatBytes, formatMb, formatMs, formatRate, formatSeconds, plural } from './format';

describe('formatting', () => {
	it('writes rates per minute, whole from 10 up', () => {
		expect(formatRate(null)).toBe('—');
		expect(formatRate(0)).toBe('0/min');
		expect(formatRate(2.345)).toBe('2.3/min');
		expect(formatRate(1234.4)).toBe('1,234/min');
		expect(formatRate(-0.0001)).toBe('0/min');
	});

	it('writes sizes and durations', () => {
		expect(formatMb(512)).toBe('512 MB');
		expect(formatMb(24576)).toBe('24.0 GB');
		expect(formatBytes(512)).toBe('512 B');
		expect(formatBytes(1536)).toBe('1.5 KB');
		expect(formatSeconds(0.25)).toBe('250 ms');
		expect(formatSeconds(90)).toBe('2 min');
		expect(formatSeconds(null)).toBe('—');
		expect(formatMs(85.4)).toBe('85 ms');
		expect(formatMs(1234)).toBe('1.2 s');
	});

	it('says how long ago', () => {
		const now = Date.parse('2026-11-28T12:00:00Z');
		expect(formatAgo('2026-11-28T11:59:59.5Z', now)).toBe('just now');
		expect(formatAgo('2026-11-28T11:59:48Z', now)).toBe('12 s ago');
		expect(formatAgo('2026-11-28T11:00:00Z', now)).toBe('1 h ago');
		expect(formatAgo('not a time', now)).toBe('—');
		expect(formatAgo(null, now)).toBe('—');
		expect(formatAgo('2026-11-28T12:00:20Z', now)).toBe('just now'); // clocks apart a little
		expect(formatAgo('2026-11-28T12:05:00Z', now)).toBe('in 5 min');
	});

	it('counts things', () => {
		expect(plural(1, 'image')).toBe('1 image');
		expect(plural(2500, 'image')).toBe('2,500 images');
	});
});
