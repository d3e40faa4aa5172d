/** Typed reads of the parts of an image document the viewer shows. */
import type { LiveEvent } from '$lib/live.svelte';
import type { ImageDoc } from '$lib/types';

export interface Caption {
	caption: string | null;
	detailed: string | null;
	source: 'model' | 'manual';
	prompt: string | null;
	request: string | null;
	tags: { tag: string; score: number }[];
	nsfw: number | null;
	demo: boolean;
}

export interface Exif {
	camera?: string;
	lens?: string;
	taken_at?: string;
	exposure_s?: number;
	f_number?: number;
	iso?: number;
	focal_length_mm?: number;
	software?: string;
	had_gps?: boolean;
}

export interface Lineage {
	image_id: string;
	job_id: string | null;
	mode: string | null;
	parent_id: string | null;
	parent: ImageDoc | null;
	children: ImageDoc[];
	siblings: ImageDoc[];
}

export interface Neighbours {
	previous: ImageDoc | null;
	next: ImageDoc | null;
}

export function captionOf(doc: ImageDoc): Caption | null {
	const caption = doc.caption as Partial<Caption> | null | undefined;
	if (!caption) return null;
	return {
		caption: caption.caption ?? null,
		detailed: caption.detailed ?? null,
		source: caption.source === 'manual' ? 'manual' : 'model',
		prompt: caption.prompt ?? null,
		request: caption.request ?? null,
		tags: Array.isArray(caption.tags) ? caption.tags : [],
		nsfw: typeof caption.nsfw === 'number' ? caption.nsfw : null,
		demo: Boolean(caption.demo)
	};
}

export function exifOf(doc: ImageDoc): Exif {
	const exif = (doc.ingest as { exif?: Exif } | null | undefined)?.exif;
	return exif ?? {};
}

/** The EXIF summary as label/value rows, in a fixed order, the empty ones left out. */
export function exifRows(exif: Exif): [string, string][] {
	const rows: [string, string | undefined][] = [
		['Camera', exif.camera],
		['Lens', exif.lens],
		['Taken', exif.taken_at ? new Date(exif.taken_at).toLocaleString() : undefined],
		['Exposure', exif.exposure_s ? exposure(exif.exposure_s) : undefined],
		['Aperture', exif.f_number ? `f/${exif.f_number}` : undefined],
		['ISO', exif.iso ? String(exif.iso) : undefined],
		['Focal length', exif.focal_length_mm ? `${exif.focal_length_mm} mm` : undefined],
		['Software', exif.software],
		['GPS', exif.had_gps ? 'had a position (not kept in the renditions)' : undefined]
	];
	return rows.filter((row): row is [string, string] => row[1] !== undefined);
}

function exposure(seconds: number): string {
	return seconds >= 1 ? `${seconds} s` : `1/${Math.round(1 / seconds)} s`;
}

/** The document with an event about it folded in, from what the event itself carries
 * (the catalogue may not have projected it yet); null when the event changes nothing shown. */
export function withEvent(doc: ImageDoc, event: LiveEvent): ImageDoc | null {
	const data = (event.data.data ?? {}) as Record<string, unknown>;
	const time = String(event.data.time ?? new Date().toISOString());
	const stages = { ...doc.stages, [event.type]: time };
	switch (event.type) {
		case 'ingested':
			return { ...doc, ingest: data, stages, status: doc.stages.captioned ? doc.status : 'ingested' };
		case 'captioned': {
			const tags = Array.isArray(data.tags) ? (data.tags as { tag: string }[]).map((t) => t.tag) : doc.tags;
			return { ...doc, caption: data, tags, stages, status: 'ready', failure: null };
		}
		case 'approved':
		case 'rejected':
			return {
				...doc,
				approval: event.type,
				decision: {
					decision: event.type,
					by: String(data.by ?? ''),
					reason: typeof data.reason === 'string' ? data.reason : null,
					time,
					event: String(event.data.id ?? '')
				}
			};
		default:
			if (event.type.startsWith('failed.')) return { ...doc, status: 'failed', failure: data };
			return null;
	}
}
