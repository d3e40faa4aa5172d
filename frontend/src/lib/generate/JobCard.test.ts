import { fireEvent, render, screen } from '@testing-library/svelte';
import { describe, expect, it, vi } from 'vitest';
import JobCard from './JobCard.svelte';
import { queued, type JobView } from './jobs';

function running(): JobView {
	return { ...queued('j1', { prompt: 'a fox', n: 2, seed: 5 }, '2026-01-01T00:00:00Z'), status: 'running', step: 3, total: 8 };
}

describe('JobCard', () => {
	it('shows a running job with its step, and cancels it', async () => {
		const oncancel = vi.fn();
		render(JobCard, { job: running(), oncancel, onreuse: vi.fn() });
		expect(screen.getByText('Step 3 of 8')).toBeTruthy();
		// each step is not announced (the page announces a job's start and end once)
		expect(screen.queryByRole('status')).toBeNull();
		expect(screen.getByLabelText('Progress of job j1').getAttribute('value')).toBe('3');
		expect(screen.getByText(/seed 5/)).toBeTruthy();
		await fireEvent.click(screen.getByRole('button', { name: 'Cancel' }));
		expect(oncancel).toHaveBeenCalledWith('j1');
	});

	it('says what the worker does before the first step (a model loading)', () => {
		const job: JobView = { ...running(), step: 0, total: 1, message: 'loading tiny-sd' };
		render(JobCard, { job, oncancel: vi.fn(), onreuse: vi.fn() });
		expect(screen.getByText('Loading tiny-sd…')).toBeTruthy();
		expect(screen.queryByText(/Step 0 of/)).toBeNull();
	});

	it('offers no cancel once finished, and says why it ended', () => {
		const job: JobView = { ...running(), status: 'cancelled', error: 'cancelled by request', step: null };
		render(JobCard, { job, oncancel: vi.fn(), onreuse: vi.fn() });
		expect(screen.queryByRole('button', { name: 'Cancel' })).toBeNull();
		expect(screen.getByText('cancelled by request')).toBeTruthy();
		expect(screen.getByRole('button', { name: 'Use these settings again' })).toBeTruthy();
	});
});
