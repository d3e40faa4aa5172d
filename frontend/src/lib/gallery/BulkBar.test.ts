import { fireEvent, render, screen } from '@testing-library/svelte';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { session } from '$lib/session.svelte';
import BulkBar from './BulkBar.svelte';
import { Selection } from './selection.svelte';

function selected(count: number): Selection {
	const selection = new Selection();
	for (let n = 0; n < count; n++) selection.ids.add(`image-${n}`);
	return selection;
}

afterEach(() => {
	vi.unstubAllGlobals();
	session.info = null;
});

describe('BulkBar', () => {
	it('decides 1,201 images in requests of at most 500, and says so', async () => {
		session.info = { key_id: 'k', name: 'admin', scopes: ['admin'], expires: null };
		const bodies: { approve: string[] }[] = [];
		vi.stubGlobal('fetch', async (_path: string, init: RequestInit) => {
			const body = JSON.parse(String(init.body)) as { approve: string[] };
			bodies.push(body);
			const results = body.approve.map((image_id) => ({ image_id, approval: 'approved' }));
			return new Response(JSON.stringify({ results }), { headers: { 'Content-Type': 'application/json' } });
		});
		const onchanged = vi.fn();
		render(BulkBar, { selection: selected(1201), onchanged, onsimilar: vi.fn() });

		await fireEvent.click(screen.getByRole('button', { name: 'Approve' }));

		expect(await screen.findByText('1201 approved')).toBeTruthy();
		expect(bodies.map((b) => b.approve.length)).toEqual([500, 500, 201]);
		expect(onchanged).toHaveBeenCalledTimes(3);
		expect(onchanged).toHaveBeenLastCalledWith(bodies[2].approve, 'approved');
	});

	it('offers no zip of more than 500 images, and says why', () => {
		render(BulkBar, { selection: selected(501), onchanged: vi.fn(), onsimilar: vi.fn() });
		const button = screen.getByRole('button', { name: 'Download zip' }) as HTMLButtonElement;
		expect(button.disabled).toBe(true);
		expect(button.getAttribute('aria-describedby')).toBe('zip-limit');
		expect(screen.getByText('A zip holds at most 500 images: 501 are selected.')).toBeTruthy();
	});
});
