/**
 * A generation job as the page shows it, kept current by the live events: step progress
 * (with the preview when the server sends one), each output as it lands (``generated``),
 * its thumbnail once the output is ingested, and the end (``failed.generate``,
 * ``cancelled.generate``). Pure: each function gives a new job, or null when the event is
 * not about it.
 */
import type { LiveEvent } from '$lib/live.svelte';
import type { GenerationDoc, JobStatus } from './api';
import { FINISHED } from './api';

export interface OutputView {
	index: number;
	image_id: string;
	/** true once ingested (it has a thumbnail); null: not known (from the job list) */
	ready: boolean | null;
}

export interface JobView {
	id: string;
	status: JobStatus;
	model: string | null;
	n: number;
	created: string;
	request: Record<string, unknown>;
	/** the job as it ran, each default filled in (once known), else the request */
	parameters: Record<string, unknown>;
	outputs: OutputView[];
	step: number | null;
	total: number | null;
	/** what the worker is doing before the steps ("loading <model>"); '' while stepping */
	message: string;
	preview: string | null;
	error: string | null;
	timings: Record<string, number> | null;
}

export function fromDoc(doc: GenerationDoc): JobView {
	const request = doc.request ?? {};
	return {
		id: doc.id,
		status: doc.status,
		model: doc.model ?? (typeof request.model === 'string' ? request.model : null),
		n: doc.n ?? (typeof request.n === 'number' ? request.n : 1),
		created: doc.created,
		request,
		parameters: doc.parameters ?? request,
		outputs: doc.outputs
			.filter((o) => o.image_id)
			.map((o) => ({ index: o.index, image_id: String(o.image_id), ready: null }))
			.sort((a, b) => a.index - b.index),
		step: doc.progress?.step ?? null,
		total: doc.progress?.total ?? null,
		message: doc.progress?.message ?? '',
		preview: doc.progress?.preview ?? null,
		error: doc.error,
		timings: doc.timings
	};
}

/** A job just queued (POST /api/generations answered 202). */
export function queued(id: string, request: Record<string, unknown>, created: string): JobView {
	return fromDoc({
		id,
		status: 'queued',
		created,
		updated: created,
		finished_at: null,
		model: typeof request.model === 'string' ? request.model : null,
		n: typeof request.n === 'number' ? request.n : 1,
		request,
		outputs: [],
		error: null,
		timings: null
	});
}

function text(value: unknown): string | null {
	return typeof value === 'string' ? value : null;
}

/** ``job`` with ``event`` applied; null when the event is not about it. */
export function applyEvent(job: JobView, event: LiveEvent): JobView | null {
	const doc = event.data;
	const jobId = text(doc.job_id);
	const imageId = text(doc.image_id);
	if (event.type === 'ingested' && imageId) {
		const at = job.outputs.findIndex((o) => o.image_id === imageId);
		if (at < 0) return null;
		const outputs = job.outputs.map((o, i) => (i === at ? { ...o, ready: true } : o));
		return { ...job, outputs };
	}
	if (jobId !== job.id) return null;
	const data = (doc.data ?? {}) as Record<string, unknown>;
	switch (event.type) {
		case 'progress': {
			if (FINISHED.has(job.status)) return null;
			const step = typeof doc.step === 'number' ? doc.step : null;
			const total = typeof doc.total === 'number' ? doc.total : null;
			const message = text(doc.message) ?? '';
			return { ...job, status: 'running', step, total, message, preview: text(doc.preview) ?? job.preview };
		}
		case 'generated': {
			if (!imageId) return null;
			const index = typeof data.index === 'number' ? data.index : job.outputs.length;
			if (job.outputs.some((o) => o.index === index)) return null;
			const outputs = [...job.outputs, { index, image_id: imageId, ready: false }].sort(
				(a, b) => a.index - b.index
			);
			const timings = (data.timings as Record<string, number> | undefined) ?? job.timings;
			const done = outputs.length >= job.n;
			return {
				...job,
				outputs,
				timings,
				status: done ? 'done' : 'running',
				step: done ? null : job.step,
				preview: done ? null : job.preview
			};
		}
		case 'failed.generate':
		case 'cancelled.generate': {
			const status: JobStatus = event.type === 'failed.generate' ? 'failed' : 'cancelled';
			const reason = text(data.reason) ?? status;
			return { ...job, status, error: reason, step: null, preview: null };
		}
		default:
			return null;
	}
}

/** The fields of a job's request a new request can take again ("use these settings"). */
export function reusable(request: Record<string, unknown>): Record<string, unknown> {
	const keep = [
		'prompt',
		'negative_prompt',
		'mode',
		'model',
		'width',
		'height',
		'steps',
		'guidance',
		'seed',
		'n',
		'scheduler',
		'strength'
	];
	const found: Record<string, unknown> = {};
	for (const name of keep) {
		if (request[name] !== undefined && request[name] !== null) found[name] = request[name];
	}
	const init = request.init as { image_id?: unknown } | undefined;
	if (init && typeof init.image_id === 'string') found.image = init.image_id;
	return found;
}

/** Jobs heard live (any key's, as the history lists them) kept on top of the history pages. */
export const LIVE_MAX = 20;

/** ``job`` on top of the live jobs; past ``cap`` the oldest leave (the history has them). */
export function withLive(live: JobView[], job: JobView, cap = LIVE_MAX): { live: JobView[]; dropped: number } {
	const next = [job, ...live];
	return { live: next.slice(0, cap), dropped: Math.max(0, next.length - cap) };
}

/** What a screen reader is told when a job changes: only that it started or ended. */
export function announcement(before: JobView, after: JobView): string | null {
	if (before.status === after.status) return null;
	const prompt = typeof after.parameters.prompt === 'string' ? after.parameters.prompt : '';
	const name = prompt ? `“${prompt.length > 40 ? `${prompt.slice(0, 40)}…` : prompt}”` : after.id;
	if (after.status === 'running') return `Job ${name} started.`;
	if (after.status === 'done') return `Job ${name} is done.`;
	if (after.status === 'failed') return `Job ${name} failed: ${after.error ?? 'no reason given'}.`;
	if (after.status === 'cancelled') return `Job ${name} was cancelled.`;
	return null;
}
