import { describe, expect, it } from 'vitest';
import { sizeFits, sizePresets, snap } from './presets';

const LIMITS = { min_side: 64, max_side: 2048, max_pixels: 2048 * 2048 };

describe('sizePresets', () => {
	it("starts with the model's default and keeps every side on its multiple", () => {
		const presets = sizePresets({ width: 1024, height: 1024 }, 64, LIMITS);
		expect(presets[0]).toEqual({ label: 'Default 1024×1024', width: 1024, height: 1024 });
		for (const p of presets) {
			expect(p.width % 64).toBe(0);
			expect(p.height % 64).toBe(0);
		}
		const wide = presets.find((p) => p.label.startsWith('16:9'));
		expect(wide).toBeDefined();
		expect(wide!.width).toBeGreaterThan(wide!.height);
		// about the default's pixel count
		expect(Math.abs(wide!.width * wide!.height - 1024 * 1024) / (1024 * 1024)).toBeLessThan(0.1);
	});

	it('lists each size once (1:1 is the default here)', () => {
		const presets = sizePresets({ width: 512, height: 512 }, 8, LIMITS);
		const sizes = presets.map((p) => `${p.width}x${p.height}`);
		expect(new Set(sizes).size).toBe(sizes.length);
		expect(presets.some((p) => p.label.startsWith('1:1'))).toBe(false);
	});

	it('stays within the limits: a tiny model gets no size under min_side, a huge one none over max_pixels', () => {
		const tiny = sizePresets({ width: 64, height: 64 }, 8, LIMITS);
		expect(tiny.every((p) => p.width >= 64 && p.height >= 64)).toBe(true);
		const limits = { min_side: 64, max_side: 1024, max_pixels: 1024 * 768 };
		const big = sizePresets({ width: 1024, height: 1024 }, 8, limits);
		expect(big.every((p) => sizeFits(p.width, p.height, 8, limits))).toBe(true);
		expect(big.some((p) => p.width === 1024 && p.height === 1024)).toBe(false); // over max_pixels
		expect(big.length).toBeGreaterThan(3);
	});
});

describe('snap and sizeFits', () => {
	it('rounds to the multiple within the bounds', () => {
		expect(snap(1000, 64, 64, 2048)).toBe(1024);
		expect(snap(10, 8, 64, 2048)).toBe(64);
		expect(snap(5000, 8, 64, 2048)).toBe(2048);
	});
	it('refuses what the gateway refuses', () => {
		expect(sizeFits(1000, 1024, 8, LIMITS)).toBe(true);
		expect(sizeFits(1000, 1024, 64, LIMITS)).toBe(false);
		expect(sizeFits(56, 64, 8, LIMITS)).toBe(false);
		expect(sizeFits(2048, 2056, 8, LIMITS)).toBe(false);
	});
});

describe('small sizes keep their ratio', () => {
	it('grows a ratio to the smallest side rather than distort it', () => {
		const presets = sizePresets({ width: 64, height: 64 }, 8, LIMITS);
		for (const p of presets.slice(1)) {
			const [across, down] = p.label.split(' ')[0].split(':').map(Number);
			expect(Math.abs(p.width / p.height - across / down) / (across / down)).toBeLessThan(0.08);
		}
		expect(presets.find((p) => p.label.startsWith('16:9'))).toMatchObject({ width: 112, height: 64 });
	});
});
