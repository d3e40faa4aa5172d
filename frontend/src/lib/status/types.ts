/** The system documents the status dashboard reads (bus/gateway/system.py, deadletters.py,
 * models_api.py, search.py, openai_api.py), as the app reads them. */

export type { CatalogueModel, ModelCatalogue, ModelHolder } from '$lib/types';

export interface FunctionLag {
	function: string;
	/** false: no consumer yet (no worker has started) */
	deployed: boolean;
	pending?: number | null;
	ack_pending?: number | null;
	redelivered?: number | null;
	waiting_pulls?: number | null;
	/** messages acknowledged so far, when the gateway reports it (a monotonic count) */
	acked?: number | null;
}

export interface ModelOnWorker {
	host: string;
	pid: number;
	worker: string;
	function: string;
	source: string;
	revision: string | null;
	demo: boolean;
	state: 'cached' | 'downloading' | 'ready' | 'failed';
	bytes_done: number;
	bytes_total: number | null;
	progress: number | null;
	error: string | null;
	updated: string;
}

export interface TaskModels {
	task: string;
	configured: string;
	ready: boolean;
	workers: ModelOnWorker[];
}

export interface SystemStatus {
	namespace: string;
	profile: string;
	functions: FunctionLag[];
	stream: { name: string; messages: number; bytes: number };
	dead_letters: number;
	store: { url: string; bucket: string };
	models: TaskModels[];
}

export interface LeaseHolder {
	host: string;
	pid: number;
	worker: string;
	instance: string;
}

export interface Lease {
	id: string;
	holder: LeaseHolder;
	model: string;
	mb: number;
	age_s: number | null;
	expires_in_s: number;
}

export interface Device {
	key: string;
	host: string;
	device: string;
	mode: string;
	capacity_mb: number;
	reserve_mb: number;
	used_mb: number;
	free_mb: number;
	leases: Lease[];
	queue: Lease[];
}

export interface DeadLetter {
	stage: string;
	reason: string;
	dlq_seq: number;
	kind?: string;
	time?: string;
	stream_seq?: number | null;
	deliveries?: number | null;
	subject?: string | null;
	event_id?: string | null;
	image_id?: string | null;
	job_id?: string | null;
	[member: string]: unknown;
}

export interface Retried {
	dlq_seq: number;
	stage: string;
	event_id: string;
	subject: string;
	stream_seq: number;
}

export interface BulkRetried {
	stage: string;
	retried: number;
	skipped: { dlq_seq: number; reason: string }[];
	remaining: number;
}

export interface OpenAIModelList {
	object: 'list';
	data: { id: string; object: 'model'; created: number; owned_by: string }[];
}

export interface EmbeddingCoverage {
	captioned: number;
	models: { kind: string; model: string; dim: number; images: number; complete: boolean }[];
}

/** A failure as the dashboard lists it: from a live failed.<stage> event or a dead letter. */
export interface Failure {
	/** stage and stream sequence: the same failure from either source has the same key */
	key: string;
	stage: string;
	kind: string;
	reason: string;
	time: string;
	image_id: string | null;
	job_id: string | null;
	/** its dead letter, while there is one to retry */
	dlq_seq: number | null;
}
