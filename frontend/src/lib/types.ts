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
