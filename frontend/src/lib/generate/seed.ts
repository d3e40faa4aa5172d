/** The seed dice: a seed like the one the gateway draws for a request without one. */

export const SEED_RANGE = 2 ** 32;

/** 32 random bits, from the browser's cryptographic source. */
function randomUint32(): number {
	return crypto.getRandomValues(new Uint32Array(1))[0];
}

/** A random seed in [0, 2^32); ``source`` gives 32 random bits (any number is folded in). */
export function rollSeed(source: () => number = randomUint32): number {
	const value = Math.floor(Math.abs(source()));
	return value % SEED_RANGE;
}

/** A seed field's text as a seed: a whole number in [0, max], else null (the server draws). */
export function parseSeed(text: string, max: number): number | null {
	const trimmed = text.trim();
	if (!/^\d+$/.test(trimmed)) return null;
	const value = Number(trimmed);
	return Number.isSafeInteger(value) && value <= max ? value : null;
}
