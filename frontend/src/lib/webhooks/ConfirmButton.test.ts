import { fireEvent, render, screen } from '@testing-library/svelte';
import { describe, expect, it, vi } from 'vitest';
import ConfirmButton from './ConfirmButton.svelte';

describe('ConfirmButton', () => {
	it('asks first, and acts only on the confirm', async () => {
		const onconfirm = vi.fn();
		render(ConfirmButton, { label: 'Delete', question: 'Delete it?', confirmLabel: 'Delete endpoint', onconfirm });
		await fireEvent.click(screen.getByRole('button', { name: 'Delete' }));
		expect(onconfirm).not.toHaveBeenCalled();
		expect(screen.getByRole('group', { name: 'Delete it?' })).toBeTruthy();
		await fireEvent.click(screen.getByRole('button', { name: 'Cancel' }));
		expect(onconfirm).not.toHaveBeenCalled();
		await fireEvent.click(screen.getByRole('button', { name: 'Delete' }));
		const yes = screen.getByRole('button', { name: 'Delete endpoint' });
		expect(document.activeElement).toBe(yes);
		await fireEvent.click(yes);
		expect(onconfirm).toHaveBeenCalledTimes(1);
		expect(screen.getByRole('button', { name: 'Delete' })).toBeTruthy();
	});
});
