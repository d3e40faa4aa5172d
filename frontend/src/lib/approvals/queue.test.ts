import { describe, expect, it } from 'vitest';
import { append, focusedId, initial, onKey, remove, selectAll } from './queue';

describe('the approval keyboard', () => {
	it('moves with j/k and the arrows, within the queue', () => {
		let state = initial(['a', 'b', 'c']);
		state = onKey(state, 'j').state;
		state = onKey(state, 'ArrowDown').state;
		expect(focusedId(state)).toBe('c');
		state = onKey(state, 'j').state;
		expect(focusedId(state)).toBe('c');
		state = onKey(state, 'k').state;
		expect(focusedId(state)).toBe('b');
		state = onKey(state, 'Home').state;
		expect(focusedId(state)).toBe('a');
		state = onKey(state, 'End').state;
		expect(focusedId(state)).toBe('c');
	});

	it('a approves and r rejects the focused item; other keys are left alone', () => {
		const state = onKey(initial(['a', 'b']), 'j').state;
		expect(onKey(state, 'a').command).toEqual({ kind: 'approve', id: 'b' });
		expect(onKey(state, 'r').command).toEqual({ kind: 'reject', id: 'b' });
		const other = onKey(state, 'q');
		expect(other.state).toBe(state);
		expect(other.command).toBeNull();
		expect(onKey(initial([]), 'a').command).toBeNull();
	});

	it('x and space select; select all and none', () => {
		let state = onKey(initial(['a', 'b']), 'x').state;
		expect([...state.selected]).toEqual(['a']);
		state = onKey(state, ' ').state;
		expect(state.selected.size).toBe(0);
		expect(selectAll(state, true).selected.size).toBe(2);
		expect(selectAll(state, false).selected.size).toBe(0);
	});

	it('keeps the focus in place when items leave, and takes new ones at the end', () => {
		let state = onKey(onKey(initial(['a', 'b', 'c', 'd']), 'j').state, 'j').state; // on c
		state = onKey(state, 'x').state;
		state = remove(state, ['a']); // one before the focus went: still on c
		expect(focusedId(state)).toBe('c');
		state = remove(state, ['c']); // the focused one went: the next takes its place
		expect(focusedId(state)).toBe('d');
		expect(state.selected.size).toBe(0);
		state = remove(state, ['d']); // the last went: the one before
		expect(focusedId(state)).toBe('b');
		expect(remove(state, ['zz'])).toBe(state);
		state = append(state, ['b', 'e']);
		expect(state.ids).toEqual(['b', 'e']);
	});
});
