/**
 * Size presets for a model: its own default size, then common aspect ratios at about the
 * same number of pixels, each side a multiple of the model's side_multiple and within the
 * gateway's limits (so a preset is never refused).
 */

export interface SizeLimits {
	min_side: number;
	max_side: number;
	max_pixels: number;
}

export interface SizePreset {
	label: string;
	width: number;
	height: number;
}

export const RATIOS: ReadonlyArray<[number, number]> = [
	[1, 1],
	[4, 3],
	[3, 4],
	[3, 2],
	[2, 3],
	[16, 9],
	[9, 16]
];

/** ``value`` rounded to the nearest multiple of ``multiple``, kept within [low, high]. */
export function snap(value: number, multiple: number, low: number, high: number): number {
	const lowest = Math.ceil(low / multiple) * multiple;
	const highest = Math.floor(high / multiple) * multiple;
	const rounded = Math.round(value / multiple) * multiple;
	return Math.min(highest, Math.max(lowest, rounded));
}

/** Whether a size is one the gateway takes for a model with this side multiple. */
export function sizeFits(width: number, height: number, multiple: number, limits: SizeLimits): boolean {
	return (
		Number.isInteger(width) &&
		Number.isInteger(height) &&
		width % multiple === 0 &&
		height % multiple === 0 &&
		width >= limits.min_side &&
		height >= limits.min_side &&
		width <= limits.max_side &&
		height <= limits.max_side &&
		width * height <= limits.max_pixels
	);
}

export function sizePresets(
	defaults: { width: number; height: number },
	multiple: number,
	limits: SizeLimits
): SizePreset[] {
	const found: SizePreset[] = [];
	const seen = new Set<string>();
	const add = (label: string, width: number, height: number): void => {
		const key = `${width}x${height}`;
		if (seen.has(key) || !sizeFits(width, height, multiple, limits)) return;
		seen.add(key);
		found.push({ label, width, height });
	};
	add(`Default ${defaults.width}×${defaults.height}`, defaults.width, defaults.height);
	const area = Math.min(defaults.width * defaults.height, limits.max_pixels);
	for (const [across, down] of RATIOS) {
		let w = Math.sqrt((area * across) / down);
		let h = (w * down) / across;
		// small models: grow until the short side is allowed; big ones: shrink to the limits
		const grow = Math.max(1, limits.min_side / Math.min(w, h));
		w *= grow;
		h *= grow;
		const shrink = Math.min(1, limits.max_side / Math.max(w, h), Math.sqrt(limits.max_pixels / (w * h)));
		w *= shrink;
		h *= shrink;
		let width = Math.round(w / multiple) * multiple;
		let height = Math.round(h / multiple) * multiple;
		if (!sizeFits(width, height, multiple, limits)) {
			width = Math.floor(w / multiple) * multiple;
			height = Math.floor(h / multiple) * multiple;
		}
		// a multiple too coarse for the ratio at this size: leave the ratio out
		if (Math.abs(width / height - across / down) > 0.08 * (across / down)) continue;
		add(`${across}:${down} ${width}×${height}`, width, height);
	}
	return found;
}
