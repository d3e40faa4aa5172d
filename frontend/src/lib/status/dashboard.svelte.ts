/**
 * The status dashboard's state: what the gateway reports, kept current by the live stream.
 *
 * Nothing polls. Each lifecycle event that arrives (the live stream's) says the bus moved,
 * so the counts are read again, at most once per REFRESH_MS (the last event of a burst
 * always gets its read). A failed.<stage> event is a failure at once, and its dead letter
 * is read again. The rates are computed here from successive counts (see rate.ts): the
 * messages each function acknowledged, when the gateway reports them, else the events it
 * emitted and its failures as the live stream brings them.
 */
import { ApiError, getJson, sendJson } from '$lib/api';
import type { LiveEvent } from '$lib/live.svelte';
import { errorText } from './format';
import { addSample, heldUntil, perMinute, type Sample } from './rate';
import { throttle } from './throttle';
import type {
	BulkRetried,
	CatalogueModel,
	DeadLetter,
	Device,
	EmbeddingCoverage,
	Failure,
	ModelCatalogue,
	OpenAIModelList,
	Retried,
	SystemStatus
} from './types';

export const REFRESH_MS = 2000;
export const DLQ_LIMIT = 200;
export const RECENT_FAILURES = 50;

/** One thing read from the gateway: its value, whether it is being read, and why it failed.
 * Reads may overlap; the last one started wins (an older answer arriving late is dropped). */
export class Loadable<T> {
	value = $state<T | null>(null);
	loading = $state(false);
	error = $state('');
	private latest = 0;

	async load(read: () => Promise<T>): Promise<void> {
		const mine = ++this.latest;
		this.loading = true;
		try {
			const value = await read();
			if (mine !== this.latest) return;
			this.value = value;
			this.error = '';
		} catch (e) {
			if (mine === this.latest) this.error = describe(e);
		} finally {
			if (mine === this.latest) this.loading = false;
		}
	}
}

/** An error's words: the server's problem detail, or an OpenAI error's message (/v1). */
export function describe(e: unknown): string {
	if (e instanceof ApiError) {
		const nested = e.problem.error;
		if (nested && typeof nested === 'object' && 'message' in nested) {
			return String((nested as { message: unknown }).message);
		}
	}
	return errorText(e);
}

/** The key a failure has from both sources: its stage and the failed message's sequence. */
export function failureKey(stage: string, streamSeq: unknown, fallback: string): string {
	return typeof streamSeq === 'number' ? `${stage}:${streamSeq}` : `${stage}:${fallback}`;
}

export function failureFromEvent(event: LiveEvent): Failure | null {
	if (!event.type.startsWith('failed.')) return null;
	const envelope = event.data;
	const data = (envelope.data ?? {}) as Record<string, unknown>;
	const stage = String(data.stage ?? event.type.slice('failed.'.length));
	return {
		key: failureKey(stage, data.stream_seq, String(envelope.id ?? event.id)),
		stage,
		kind: String(data.kind ?? 'failed'),
		reason: String(data.reason ?? ''),
		time: String(envelope.time ?? new Date().toISOString()),
		image_id: typeof envelope.image_id === 'string' ? envelope.image_id : null,
		job_id: typeof envelope.job_id === 'string' ? envelope.job_id : null,
		dlq_seq: null
	};
}

export function failureFromDeadLetter(record: DeadLetter): Failure {
	return {
		key: failureKey(record.stage, record.stream_seq, `dlq-${record.dlq_seq}`),
		stage: record.stage,
		kind: String(record.kind ?? 'dead-lettered'),
		reason: record.reason,
		time: String(record.time ?? ''),
		image_id: record.image_id ?? null,
		job_id: record.job_id ?? null,
		dlq_seq: record.dlq_seq
	};
}

/** Live failures and the newest dead letters in one list, newest first, each once (a live
 * failure takes its dead letter's id once it is read, so it can be retried). */
export function mergeFailures(live: Failure[], dead: DeadLetter[], limit = RECENT_FAILURES): Failure[] {
	const byKey = new Map<string, Failure>();
	for (const record of dead) byKey.set(failureFromDeadLetter(record).key, failureFromDeadLetter(record));
	for (const failure of live) {
		const known = byKey.get(failure.key);
		byKey.set(failure.key, { ...failure, dlq_seq: known?.dlq_seq ?? null });
	}
	return [...byKey.values()].sort((a, b) => b.time.localeCompare(a.time)).slice(0, limit);
}

/** The function a lifecycle event came from ("darkroom/caption" → caption), if any. */
export function emitter(event: LiveEvent): string | null {
	const source = event.data.source;
	if (typeof source !== 'string' || !source.startsWith('darkroom/')) return null;
	return source.slice('darkroom/'.length);
}

export class Dashboard {
	status = new Loadable<SystemStatus>();
	gpus = new Loadable<Device[]>();
	catalogue = new Loadable<ModelCatalogue>();
	vision = new Loadable<OpenAIModelList>();
	embeddings = new Loadable<EmbeddingCoverage>();
	/** the newest dead letters of every stage (failures, counts per stage) */
	deadLetters = new Loadable<DeadLetter[]>();
	/** the dead-letter table: one stage's, or every stage's ('') */
	dlqStage = $state('');
	dlq = new Loadable<DeadLetter[]>();
	liveFailures = $state<Failure[]>([]);
	/** the clock the rates are read at: moved on by events and by a slow local tick */
	now = $state(Date.now());
	/** per function: done and failed counts over time */
	done = $state<Record<string, Sample[]>>({});
	failed = $state<Record<string, Sample[]>>({});
	/** when the page opened: counts made live start from 0 here */
	private readonly opened = Date.now();
	private outputs = new Map<string, number>();
	private failures = new Map<string, number>();
	/** whether the gateway reports each function's acknowledged count (then rates use it) */
	private acked = $state(false);

	readonly refresh = throttle(() => this.readCounts(), REFRESH_MS);
	readonly refreshDeadLetters = throttle(() => this.readDeadLetters(), REFRESH_MS);

	/** Everything, read now (on opening, and when the live stream reconnects). */
	async loadAll(): Promise<void> {
		await Promise.all([
			this.readCounts(),
			this.readDeadLetters(),
			this.vision.load(() => getJson<OpenAIModelList>('/v1/models'))
		]);
	}

	private async readCounts(): Promise<void> {
		await Promise.all([
			this.status.load(() => getJson<SystemStatus>('/api/status')),
			this.gpus.load(async () => (await getJson<{ devices: Device[] }>('/api/status/gpus')).devices),
			this.catalogue.load(() => getJson<ModelCatalogue>('/api/models')),
			this.embeddings.load(() => getJson<EmbeddingCoverage>('/api/models/embeddings'))
		]);
		this.now = Date.now();
		this.sampleCounts();
	}

	private async readDeadLetters(): Promise<void> {
		const all = this.deadLetters.load(
			async () => (await getJson<{ items: DeadLetter[] }>('/api/dead-letters', { limit: DLQ_LIMIT })).items
		);
		const stage = this.dlqStage;
		await this.dlq.load(async () => {
			if (stage !== '') {
				return (await getJson<{ items: DeadLetter[] }>('/api/dead-letters', { stage, limit: DLQ_LIMIT })).items;
			}
			await all; // every stage's: the same read
			if (this.deadLetters.error) throw new Error(this.deadLetters.error);
			return this.deadLetters.value ?? [];
		});
		await all;
	}

	async chooseStage(stage: string): Promise<void> {
		this.dlqStage = stage;
		this.dlq.value = null;
		await this.readDeadLetters();
	}

	/** Take one live event. */
	hear(event: LiveEvent): void {
		const t = Date.now();
		this.now = t;
		const failure = failureFromEvent(event);
		if (failure !== null) {
			this.liveFailures = [failure, ...this.liveFailures].slice(0, RECENT_FAILURES);
			this.failed = this.count(this.failed, this.failures, failure.stage, t);
			this.refreshDeadLetters();
		} else if (!this.acked && event.id !== null && !event.type.startsWith('cancelled.')) {
			const from = emitter(event);
			if (from !== null) this.done = this.count(this.done, this.outputs, from, t);
		}
		this.refresh();
	}

	/** Move the rates' clock on (between events a rate decays). */
	tick(): void {
		this.now = Date.now();
	}

	/** Done per minute for ``fn``; null: not known yet. */
	doneRate(fn: string): number | null {
		const samples = this.done[fn] ?? [];
		return perMinute(this.acked ? samples : heldUntil(samples, this.now), this.now);
	}

	failedRate(fn: string): number | null {
		return perMinute(heldUntil(this.failed[fn] ?? [], this.now), this.now);
	}

	/** Each stage's dead letters among the newest read (DLQ_LIMIT of them). */
	deadLettersByStage = $derived.by(() => {
		const counts: Record<string, number> = {};
		for (const record of this.deadLetters.value ?? []) counts[record.stage] = (counts[record.stage] ?? 0) + 1;
		return counts;
	});

	recentFailures = $derived(mergeFailures(this.liveFailures, (this.deadLetters.value ?? []).slice(0, RECENT_FAILURES)));

	/** One more of ``name`` in ``counts`` at ``t``: its series, with a sample added. A series
	 * counted live starts from 0 when the page opened, the base of its first rise. */
	private count(
		series: Record<string, Sample[]>,
		counts: Map<string, number>,
		name: string,
		t: number
	): Record<string, Sample[]> {
		const count = (counts.get(name) ?? 0) + 1;
		counts.set(name, count);
		const samples = series[name] ?? [{ t: this.opened, count: 0 }];
		return { ...series, [name]: addSample(samples, t, count) };
	}

	/** Every function's series: the acknowledged counts the gateway reports, when it does;
	 * else (counted live) each starts from 0 when the page opened. */
	private sampleCounts(): void {
		const done = { ...this.done };
		const failed = { ...this.failed };
		const before = this.acked; // counted live until now: those series start afresh
		for (const row of this.status.value?.functions ?? []) {
			if (typeof row.acked === 'number') {
				this.acked = true;
				done[row.function] = addSample(before ? (done[row.function] ?? []) : [], this.now, row.acked);
			} else {
				done[row.function] ??= [{ t: this.opened, count: 0 }];
			}
			failed[row.function] ??= [{ t: this.opened, count: 0 }];
		}
		this.done = done;
		this.failed = failed;
	}

	// --- actions (admin) ------------------------------------------------------------------
	async retry(record: { dlq_seq: number }): Promise<Retried> {
		const answer = await sendJson<Retried>('POST', `/api/dead-letters/${record.dlq_seq}/retry`);
		this.forget([record.dlq_seq]);
		this.refreshDeadLetters();
		return answer;
	}

	async retryStage(stage: string): Promise<BulkRetried> {
		const answer = await sendJson<BulkRetried>('POST', '/api/dead-letters/retry', undefined, { stage });
		await this.readDeadLetters();
		return answer;
	}

	async rerun(imageId: string, stage: 'ingest' | 'caption'): Promise<void> {
		await sendJson('POST', `/api/images/${encodeURIComponent(imageId)}/rerun`, undefined, { stage });
	}

	/** Drop retried dead letters from what is shown, before the list is read again. */
	private forget(seqs: number[]): void {
		const gone = new Set(seqs);
		const keep = (items: DeadLetter[] | null) => items?.filter((r) => !gone.has(r.dlq_seq)) ?? null;
		this.deadLetters.value = keep(this.deadLetters.value);
		this.dlq.value = keep(this.dlq.value);
	}

	stop(): void {
		this.refresh.cancel();
		this.refreshDeadLetters.cancel();
	}
}

/** The generation models resident on a GPU now (held under a lease). */
export function resident(models: CatalogueModel[]): CatalogueModel[] {
	return models.filter((m) => m.holders.length > 0);
}
