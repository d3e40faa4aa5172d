/** The API's documents, as the app reads them (see GET /api/openapi.json). */

export interface Decision {
	decision: 'approved' | 'rejected';
	by: string;
	reason: string | null;
	time: string;
	event: string;
}

export interface ImageDoc {
	id: string;
	status: 'uploaded' | 'ingested' | 'captioned' | 'failed' | string;
	kind: 'upload' | 'generated' | string;
	name: string | null;
	created: string;
	updated: string;
	taken: string | null;
	stages: Record<string, string>;
	tags: string[];
	approval: 'none' | 'pending' | 'approved' | 'rejected';
	hold: string[];
	decision: Decision | null;
	ingest?: Record<string, unknown> | null;
	caption?: Record<string, unknown> | null;
	failure?: { stage?: string; reason?: string } | null;
	[member: string]: unknown;
}

export interface ImagePage {
	items: ImageDoc[];
	next_cursor: string | null;
}

/** GET /api/models: the generation catalogue (the generate form and the status page). */
export interface ModelDefaults {
	width: number;
	height: number;
	steps: number;
	guidance: number;
	scheduler: string | null;
}

/** A worker holding a model (its VRAM lease). */
export interface ModelHolder {
	host: string;
	pid: number;
	worker: string;
	instance: string;
	device: string;
	mb: number;
	since: string | null;
}

export interface CatalogueModel {
	name: string;
	source: string;
	revision: string;
	variant: string | null;
	quantization: string;
	vram_mb: number;
	description: string;
	licence: string;
	added: boolean;
	defaults: ModelDefaults;
	default: boolean;
	cpu_default: boolean;
	/** true: a tiny random stand-in; null: not known yet */
	demo: boolean | null;
	holders: ModelHolder[];
	workers: { worker: string; state: string; demo: boolean; progress: number | null }[];
}

export interface ModelCatalogue {
	profile: string;
	default_model: string;
	cpu_model: string;
	schedulers: string[];
	models: CatalogueModel[];
}
