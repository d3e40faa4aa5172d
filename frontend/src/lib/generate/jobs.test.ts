import { describe, expect, it } from 'vitest';
import type { LiveEvent } from '$lib/live.svelte';
import type { CatalogueModel } from '$lib/types';
import { announcement, applyEvent, queued, reusable, withLive } from './jobs';
import { blankForm, fromSettings, toRequest } from './form';

const event = (type: string, data: Record<string, unknown>): LiveEvent => ({ type, id: type === 'progress' ? null : '1', data });

describe('a job followed by its live events', () => {
	it('shows steps with the preview, each output as it lands, its thumbnail once ingested', () => {
		let job = queued('j1', { prompt: 'fox', n: 2 }, '2026-01-01T00:00:00Z');
		expect(applyEvent(job, event('progress', { job_id: 'other', step: 1, total: 4 }))).toBeNull();
		job = applyEvent(job, event('progress', { job_id: 'j1', step: 2, total: 4, preview: 'data:image/png;base64,AA' }))!;
		expect([job.status, job.step, job.total, job.preview]).toEqual(['running', 2, 4, 'data:image/png;base64,AA']);
		job = applyEvent(job, event('generated', { job_id: 'j1', image_id: 'j1-1', data: { index: 1 } }))!;
		expect(job.status).toBe('running');
		expect(job.outputs).toEqual([{ index: 1, image_id: 'j1-1', ready: false }]);
		expect(applyEvent(job, event('generated', { job_id: 'j1', image_id: 'j1-1', data: { index: 1 } }))).toBeNull();
		job = applyEvent(job, event('generated', { job_id: 'j1', image_id: 'j1-0', data: { index: 0, timings: { inference_s: 1 } } }))!;
		expect(job.status).toBe('done');
		expect(job.outputs.map((o) => o.image_id)).toEqual(['j1-0', 'j1-1']);
		expect(job.preview).toBeNull();
		job = applyEvent(job, event('ingested', { image_id: 'j1-0' }))!;
		expect(job.outputs[0].ready).toBe(true);
		expect(applyEvent(job, event('ingested', { image_id: 'elsewhere' }))).toBeNull();
		// a late step report does not bring a finished job back
		expect(applyEvent(job, event('progress', { job_id: 'j1', step: 4, total: 4 }))).toBeNull();
	});

	it('ends cancelled or failed with the reason', () => {
		const job = queued('j2', { prompt: 'fox' }, '2026-01-01T00:00:00Z');
		const cancelled = applyEvent(job, event('cancelled.generate', { job_id: 'j2', data: { reason: 'cancelled by request' } }))!;
		expect([cancelled.status, cancelled.error]).toEqual(['cancelled', 'cancelled by request']);
		const failed = applyEvent(job, event('failed.generate', { job_id: 'j2', data: {} }))!;
		expect([failed.status, failed.error]).toEqual(['failed', 'failed']);
	});
});

describe('use these settings again', () => {
	it('fills the form from a job as it ran, image included', () => {
		const model: CatalogueModel = {
			name: 'tiny',
			source: '/models/tiny',
			revision: 'main',
			variant: null,
			quantization: 'none',
			vram_mb: 64,
			description: '',
			licence: '',
			added: true,
			defaults: { width: 64, height: 64, steps: 4, guidance: 0, scheduler: null },
			default: true,
			cpu_default: true,
			demo: true,
			holders: [],
			workers: []
		};
		const settings = reusable({
			prompt: 'a fox',
			mode: 'img2img',
			model: 'tiny',
			width: 128,
			height: 64,
			steps: 6,
			seed: 12,
			n: 2,
			strength: 0.5,
			init: { key: 'images/x/display.webp', image_id: 'x' },
			created: 'ignored'
		});
		const form = fromSettings(blankForm(model), settings);
		expect(form).toMatchObject({ prompt: 'a fox', mode: 'img2img', image: 'x', width: 128, seed: '12', n: 2, strength: 0.5 });
		const request = toRequest(form, ['img2img'], 2 ** 53 - 1);
		expect(request).toMatchObject({ prompt: 'a fox', image: 'x', seed: 12, strength: 0.5, width: 128, steps: 6 });
		// txt2img sends neither image nor strength
		const plain = toRequest({ ...form, mode: 'txt2img' }, ['img2img'], 2 ** 53 - 1);
		expect(plain.image).toBeUndefined();
		expect(plain.strength).toBeUndefined();
		expect(toRequest({ ...form, seed: '' }, ['img2img'], 100).seed).toBeUndefined();
	});
});

describe('the jobs heard live', () => {
	it('are kept to the newest few, newest first', () => {
		let live = [queued('j1', {}, '2026-01-01T00:00:00Z')];
		let dropped = 0;
		for (let i = 2; i <= 4; i++) {
			const added = withLive(live, queued(`j${i}`, {}, '2026-01-01T00:00:00Z'), 3);
			live = added.live;
			dropped += added.dropped;
		}
		expect(live.map((j) => j.id)).toEqual(['j4', 'j3', 'j2']);
		expect(dropped).toBe(1);
	});

	it('are announced when they start and end, not at every step', () => {
		const job = queued('j1', { prompt: 'a fox' }, '2026-01-01T00:00:00Z');
		const step1 = applyEvent(job, event('progress', { job_id: 'j1', step: 1, total: 4 }))!;
		const step2 = applyEvent(step1, event('progress', { job_id: 'j1', step: 2, total: 4 }))!;
		const failed = applyEvent(step2, event('failed.generate', { job_id: 'j1', data: { reason: 'out of memory' } }))!;
		expect(announcement(job, step1)).toBe('Job “a fox” started.');
		expect(announcement(step1, step2)).toBeNull();
		expect(announcement(step2, failed)).toBe('Job “a fox” failed: out of memory.');
	});
});
