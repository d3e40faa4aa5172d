import { fireEvent, render } from '@testing-library/svelte';
import { describe, expect, it, vi, type Mock } from 'vitest';
import Shortcuts from './Shortcuts.svelte';
import type { ViewerAction } from './keys';

function setUp(only?: ViewerAction[]) {
	const names: ViewerAction[] = only ?? [
		'previous',
		'next',
		'close',
		'info',
		'edit',
		'delete',
		'zoom-in',
		'zoom-out',
		'zoom-reset'
	];
	const actions = Object.fromEntries(names.map((name) => [name, vi.fn<() => void>()])) as Record<
		ViewerAction,
		Mock<() => void>
	>;
	render(Shortcuts, { actions });
	return actions;
}

describe('the viewer keyboard', () => {
	it('runs the action of each key', async () => {
		const actions = setUp();
		const keys: [string, ViewerAction][] = [
			['ArrowLeft', 'previous'],
			['ArrowRight', 'next'],
			['Escape', 'close'],
			['i', 'info'],
			['e', 'edit'],
			['Delete', 'delete'],
			['+', 'zoom-in'],
			['-', 'zoom-out'],
			['0', 'zoom-reset']
		];
		for (const [key, action] of keys) {
			const event = new KeyboardEvent('keydown', { key, bubbles: true, cancelable: true });
			window.dispatchEvent(event);
			expect(actions[action], key).toHaveBeenCalledTimes(1);
			expect(event.defaultPrevented, key).toBe(true);
		}
	});

	it('leaves keys alone while typing, with a modifier, or in an open dialog', async () => {
		const actions = setUp();
		const field = document.createElement('textarea');
		document.body.append(field);
		await fireEvent.keyDown(field, { key: 'e' });
		await fireEvent.keyDown(field, { key: 'ArrowLeft' });
		await fireEvent.keyDown(window, { key: 'ArrowLeft', ctrlKey: true });
		await fireEvent.keyDown(window, { key: '0', metaKey: true });

		const dialog = document.createElement('dialog');
		dialog.setAttribute('open', '');
		const button = document.createElement('button');
		dialog.append(button);
		document.body.append(dialog);
		await fireEvent.keyDown(button, { key: 'Escape' });
		await fireEvent.keyDown(button, { key: 'Delete' });

		for (const action of Object.values(actions)) expect(action).not.toHaveBeenCalled();
		field.remove();
		dialog.remove();
	});

	it("does nothing for an action the page does not offer (Del without the admin scope)", async () => {
		const actions = setUp(['next']);
		const event = new KeyboardEvent('keydown', { key: 'Delete', bubbles: true, cancelable: true });
		window.dispatchEvent(event);
		expect(event.defaultPrevented).toBe(false);
		await fireEvent.keyDown(window, { key: 'ArrowRight' });
		expect(actions.next).toHaveBeenCalledOnce();
	});
});
