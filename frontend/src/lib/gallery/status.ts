/** What a tile says about an image: its stage, whether it waits for a decision, demo output. */
import type { ImageDoc } from '$lib/types';

export interface Badge {
	label: string;
	tone: 'busy' | 'danger' | 'warn' | 'muted';
}

export function badges(doc: ImageDoc): Badge[] {
	const found: Badge[] = [];
	if (doc.status === 'uploaded') found.push({ label: 'ingesting', tone: 'busy' });
	else if (doc.status === 'ingested') found.push({ label: 'captioning', tone: 'busy' });
	else if (doc.status === 'failed') found.push({ label: 'failed', tone: 'danger' });
	if (doc.approval === 'pending') found.push({ label: 'pending approval', tone: 'warn' });
	else if (doc.approval === 'rejected') found.push({ label: 'rejected', tone: 'danger' });
	if (doc.caption && (doc.caption as { demo?: unknown }).demo === true) {
		found.push({ label: 'demo model', tone: 'muted' });
	}
	return found;
}

/** The smallest thumbnail at or over 256 px that ingest made (else the largest), or null. */
export function thumbnailUrl(doc: ImageDoc, want = 256): string | null {
	if (doc.approval === 'rejected') return null; // its renditions are deleted
	const renditions = (doc.ingest as { renditions?: Record<string, unknown> } | null | undefined)
		?.renditions;
	if (!renditions) return null;
	const sizes = Object.keys(renditions)
		.filter((name) => name.startsWith('thumb-'))
		.map((name) => Number(name.slice(6)))
		.filter((px) => Number.isFinite(px))
		.sort((a, b) => a - b);
	if (sizes.length === 0) return null;
	const px = sizes.find((size) => size >= want) ?? sizes[sizes.length - 1];
	return `/api/images/${encodeURIComponent(doc.id)}/thumbnail?px=${px}`;
}

export function describe(doc: ImageDoc): string {
	const caption = (doc.caption as { caption?: unknown } | null | undefined)?.caption;
	return typeof caption === 'string' && caption ? caption : (doc.name ?? 'image');
}
