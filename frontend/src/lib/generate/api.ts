/** The generation API's documents, as the generate page reads them. */

export type { CatalogueModel, ModelCatalogue, ModelDefaults } from '$lib/types';

/** GET /api/generate/limits: what the gateway checks a request against. */
export interface GenerateLimits {
	modes: string[];
	image_modes: string[];
	default_strength: Record<string, number>;
	schedulers: string[];
	min_side: number;
	max_side: number;
	max_pixels: number;
	max_steps: number;
	max_n: number;
	max_seed: number;
	max_prompt_chars: number;
	side_multiple: Record<string, number>;
}

/** What POST /api/generations takes; a field left out takes the model's default. */
export interface GenerationRequest {
	prompt?: string;
	negative_prompt?: string;
	mode?: string;
	image?: string;
	strength?: number;
	model?: string;
	width?: number;
	height?: number;
	steps?: number;
	guidance?: number;
	seed?: number;
	n?: number;
	scheduler?: string;
}

export interface GenerationOutput {
	index: number;
	image_id: string | null;
	seed: number | null;
	model: string | null;
	demo?: boolean;
	timings: Record<string, number> | null;
}

export interface GenerationProgress {
	step: number;
	total: number;
	message?: string | null;
	preview?: string | null;
}

export type JobStatus = 'queued' | 'running' | 'done' | 'failed' | 'cancelled';

export interface GenerationDoc {
	id: string;
	status: JobStatus;
	created: string;
	updated: string;
	finished_at: string | null;
	model: string | null;
	n: number | null;
	request: Record<string, unknown> | null;
	parameters?: Record<string, unknown> | null;
	outputs: GenerationOutput[];
	error: string | null;
	timings: Record<string, number> | null;
	progress?: GenerationProgress | null;
}

export interface GenerationPage {
	items: GenerationDoc[];
	next_cursor: string | null;
}

export interface GenerationQueued {
	id: string;
	status: JobStatus;
	request: Record<string, unknown>;
}

export const FINISHED: ReadonlySet<string> = new Set(['done', 'failed', 'cancelled']);

/** Where a catalogue image opens: the viewer. */
export function imageHref(id: string): string {
	return `/images/${encodeURIComponent(id)}`;
}

export function thumbnailSrc(id: string, px = 256): string {
	return `/api/images/${encodeURIComponent(id)}/thumbnail?px=${px}`;
}
