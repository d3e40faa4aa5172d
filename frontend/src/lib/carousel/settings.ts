/**
 * The carousel's settings, from its URL alone, so a kiosk is configured by its address:
 * ?kiosk&interval=10&shuffle=1&seed=7&order=asc&sort=created&overlay=caption. A value that
 * is not one the gateway takes falls back to its default.
 */

export type Overlay = 'date' | 'caption' | 'none';

export interface CarouselSettings {
	kiosk: boolean;
	/** seconds each image stays up */
	interval: number;
	shuffle: boolean;
	/** the shuffle's seed: the same seed, the same order */
	seed: number;
	sort: 'taken' | 'created';
	order: 'desc' | 'asc';
	overlay: Overlay;
}

export const MAX_INTERVAL = 86_400;
export const MAX_SEED = 2 ** 31 - 1;

function flag(value: string | null): boolean {
	return value !== null && !['0', 'false', 'no', 'off'].includes(value.toLowerCase());
}

function whole(value: string | null, low: number, high: number): number | null {
	if (value === null || !/^\d+$/.test(value.trim())) return null;
	const number = Number(value);
	return number >= low && number <= high ? number : null;
}

/** The settings in ``params``; ``drawSeed`` picks a seed when shuffling without one. */
export function parseSettings(params: URLSearchParams, drawSeed: () => number): CarouselSettings {
	const shuffle = flag(params.get('shuffle'));
	const sort = params.get('sort');
	const order = params.get('order');
	const overlay = params.get('overlay');
	return {
		// any ?kiosk (kiosk=0 too): the layout drops the header on the same rule
		kiosk: params.has('kiosk'),
		interval: whole(params.get('interval'), 1, MAX_INTERVAL) ?? 10,
		shuffle,
		seed: whole(params.get('seed'), 0, MAX_SEED) ?? (shuffle ? drawSeed() % (MAX_SEED + 1) : 0),
		sort: sort === 'created' ? 'created' : 'taken',
		order: order === 'asc' ? 'asc' : 'desc',
		overlay: overlay === 'caption' || overlay === 'none' ? overlay : 'date'
	};
}

/** The query GET /api/carousel takes for these settings. */
export function apiQuery(settings: CarouselSettings): Record<string, string | number | boolean> {
	return {
		interval: settings.interval,
		shuffle: settings.shuffle,
		seed: settings.seed,
		sort: settings.sort,
		order: settings.order,
		overlay: settings.overlay
	};
}

/** The page's own query for these settings (what a kiosk URL carries). */
export function pageQuery(settings: CarouselSettings, kiosk = settings.kiosk): string {
	const params = new URLSearchParams();
	if (kiosk) params.set('kiosk', '');
	params.set('interval', String(settings.interval));
	if (settings.shuffle) {
		params.set('shuffle', '1');
		params.set('seed', String(settings.seed));
	}
	if (settings.sort !== 'taken') params.set('sort', settings.sort);
	if (settings.order !== 'desc') params.set('order', settings.order);
	params.set('overlay', settings.overlay);
	return params.toString().replace(/^kiosk=(&|$)/, 'kiosk$1');
}
