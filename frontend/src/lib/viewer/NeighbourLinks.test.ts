import { render, screen } from '@testing-library/svelte';
import { describe, expect, it } from 'vitest';
import type { ImageDoc } from '$lib/types';
import NeighbourLinks from './NeighbourLinks.svelte';

const image = (id: string) => ({ id }) as ImageDoc;

function links(): string[] {
	return screen.queryAllByRole('link').map((link) => `${link.textContent} ${link.getAttribute('href')}`);
}

describe('previous and next in the viewer', () => {
	it('offers neither for a list of one, nor while they are not known', () => {
		const { unmount } = render(NeighbourLinks, { neighbours: { previous: null, next: null }, search: '' });
		expect(links()).toEqual([]);
		unmount();
		render(NeighbourLinks, { neighbours: null, search: '' });
		expect(links()).toEqual([]);
	});

	it('offers only the direction there is an image in, within the same list', () => {
		const { unmount } = render(NeighbourLinks, { neighbours: { previous: null, next: image('b') }, search: 'tag=fox' });
		expect(links()).toEqual(['Next › /images/b?tag=fox']);
		unmount();
		render(NeighbourLinks, { neighbours: { previous: image('a'), next: null }, search: '' });
		expect(links()).toEqual(['‹ Previous /images/a']);
	});

	it('keeps the place of a missing one, hidden from sight and from assistive technology', () => {
		const { container } = render(NeighbourLinks, { neighbours: { previous: image('a'), next: null }, search: '' });
		const gap = container.querySelector('.none');
		expect(gap?.textContent).toBe('Next ›');
		expect(gap?.getAttribute('aria-hidden')).toBe('true');
		expect(gap?.matches('a, [tabindex]')).toBe(false);
	});
});
