import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { LiveEvent } from '$lib/live.svelte';
import { Dashboard, emitter, failureFromEvent, Loadable, mergeFailures } from './dashboard.svelte';
import { throttle } from './throttle';
import type { DeadLetter } from './types';

describe('failures', () => {
	const failed = {
		type: 'failed.caption',
		id: '42',
		data: {
			id: 'x',
			type: 'failed.caption',
			source: 'darkroom/caption',
			time: '2026-11-28T12:00:05Z',
			image_id: 'img1',
			data: { stage: 'caption', kind: 'exhausted', reason: 'gave up', stream_seq: 17 }
		}
	};
	const record: DeadLetter = {
		stage: 'caption',
		reason: 'gave up',
		dlq_seq: 3,
		kind: 'exhausted',
		stream_seq: 17,
		time: '2026-11-28T12:00:04Z',
		image_id: 'img1'
	};
	const older: DeadLetter = { stage: 'ingest', reason: 'bad file', dlq_seq: 2, stream_seq: 9, time: '2026-11-28T11:00:00Z' };

	it('reads a failed.<stage> event, and nothing else', () => {
		const f = failureFromEvent(failed);
		expect(f).toMatchObject({ key: 'caption:17', stage: 'caption', kind: 'exhausted', image_id: 'img1' });
		expect(failureFromEvent({ type: 'captioned', id: '1', data: {} })).toBeNull();
	});

	it('lists a live failure and its dead letter once, retryable, newest first', () => {
		const merged = mergeFailures([failureFromEvent(failed)!], [record, older]);
		expect(merged.map((f) => [f.key, f.dlq_seq])).toEqual([
			['caption:17', 3],
			['ingest:9', 2]
		]);
	});

	it('knows which function emitted an event', () => {
		expect(emitter(failed)).toBe('caption');
		expect(emitter({ type: 'uploaded', id: '1', data: { source: 'gateway' } })).toBeNull();
	});
});

describe('throttle', () => {
	beforeEach(() => vi.useFakeTimers());
	afterEach(() => vi.useRealTimers());

	it('runs at once, then once more after the interval for a burst', async () => {
		const fn = vi.fn();
		const call = throttle(fn, 2000);
		call();
		expect(fn).toHaveBeenCalledTimes(1);
		for (let i = 0; i < 10; i++) call();
		expect(fn).toHaveBeenCalledTimes(1);
		await vi.advanceTimersByTimeAsync(2000);
		expect(fn).toHaveBeenCalledTimes(2);
		await vi.advanceTimersByTimeAsync(10_000);
		expect(fn).toHaveBeenCalledTimes(2);
	});

	it('does not overlap a run still going', async () => {
		let finish: () => void = () => {};
		const fn = vi.fn(() => new Promise<void>((resolve) => (finish = resolve)));
		const call = throttle(fn, 0);
		call();
		call();
		expect(fn).toHaveBeenCalledTimes(1);
		finish();
		await vi.advanceTimersByTimeAsync(0);
		expect(fn).toHaveBeenCalledTimes(2);
	});
});

describe('Dashboard rates', () => {
	const S = 1000;
	beforeEach(() => {
		vi.useFakeTimers({ now: 0 });
		// The reads the events set off answer 503: only what the events say counts here.
		vi.stubGlobal('fetch', vi.fn(async () => new Response('{}', { status: 503 })));
	});
	afterEach(() => {
		vi.unstubAllGlobals();
		vi.useRealTimers();
	});

	function event(type: string, source: string, stage?: string): LiveEvent {
		const data = stage ? { stage, kind: 'rejected', reason: 'no', stream_seq: Math.random() } : {};
		return { type, id: '1', data: { type, source, time: new Date().toISOString(), data } };
	}

	it('counts failures and outputs from the page opening, before any count was read', () => {
		const dashboard = new Dashboard();
		expect(dashboard.failedRate('ingest')).toBeNull();
		vi.setSystemTime(30 * S);
		dashboard.hear(event('failed.ingest', 'darkroom/ingest', 'ingest'));
		dashboard.hear(event('ingested', 'darkroom/ingest'));
		dashboard.hear(event('ingested', 'darkroom/ingest'));
		expect(dashboard.failedRate('ingest')).toBe(2); // 1 in the 30 s since it opened
		expect(dashboard.doneRate('ingest')).toBe(4);
		expect(dashboard.doneRate('caption')).toBeNull();
		vi.setSystemTime(100 * S);
		dashboard.tick();
		expect(dashboard.failedRate('ingest')).toBe(0);
		dashboard.stop();
	});
});

describe('Loadable', () => {
	it('keeps the answer of the read started last, whatever order they answer in', async () => {
		const loadable = new Loadable<string>();
		let answerOld: (v: string) => void = () => {};
		const old = loadable.load(() => new Promise<string>((resolve) => (answerOld = resolve)));
		await loadable.load(async () => 'new');
		answerOld('old');
		await old;
		expect(loadable.value).toBe('new');
		expect(loadable.loading).toBe(false);
	});
});
