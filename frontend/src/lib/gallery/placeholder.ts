/**
 * BlurHash placeholders (ingest stores one per image in ``ingest.blurhash``), decoded once
 * into a tiny canvas and kept as a data: URL, so a tile paints its colours at once while
 * its thumbnail loads. A bounded cache: scrolling 100,000 tiles keeps the newest few
 * thousand.
 */
import { decode, isBlurhashValid } from 'blurhash';

const SIZE = 16; // px: the browser scales it up smoothly
const KEEP = 3000;
const cache = new Map<string, string>();

export function placeholderUrl(hash: unknown): string | null {
	if (typeof hash !== 'string' || hash.length < 6) return null;
	const known = cache.get(hash);
	if (known !== undefined) return known;
	if (typeof document === 'undefined' || !isBlurhashValid(hash).result) return null;
	const canvas = document.createElement('canvas');
	canvas.width = SIZE;
	canvas.height = SIZE;
	const context = canvas.getContext('2d');
	if (!context) return null;
	const pixels = decode(hash, SIZE, SIZE);
	const image = context.createImageData(SIZE, SIZE);
	image.data.set(pixels);
	context.putImageData(image, 0, 0);
	const url = canvas.toDataURL();
	if (cache.size >= KEEP) cache.delete(cache.keys().next().value as string);
	cache.set(hash, url);
	return url;
}
