import { describe, expect, it, vi } from 'vitest';
import { append, chunks, focusedId, initial, onKey, Refresher, remove, selectAll } from './queue';

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

describe('bulk decisions', () => {
	it('go to the server in parts of at most 500 ids', () => {
		const ids = Array.from({ length: 1201 }, (_, i) => `i${i}`);
		const parts = chunks(ids, 500);
		expect(parts.map((p) => p.length)).toEqual([500, 500, 201]);
		expect(parts.flat()).toEqual(ids);
		expect(chunks([], 500)).toEqual([]);
	});
});

/** A read the test answers when it likes. */
function reads() {
	const pending: { id: string; answer: (doc: string) => void }[] = [];
	const read = (id: string) => new Promise<string>((answer) => pending.push({ id, answer }));
	return { pending, read };
}

describe('single reads of queued images', () => {
	it('never bring back an image decided while its read was under way', async () => {
		const { pending, read } = reads();
		const applied: string[] = [];
		const refresher = new Refresher(read, (id) => applied.push(id));
		const done = refresher.refresh('a'); // a captioned event
		refresher.decided(['a']); // the admin pressed a; the POST succeeded
		pending[0].answer('pending'); // the late read still says pending
		await done;
		expect(applied).toEqual([]);
		await refresher.refresh('a'); // and later events for it are ignored
		expect(pending).toHaveLength(1);
	});

	it('read once more when an event comes during a read', async () => {
		const { pending, read } = reads();
		const applied: string[] = [];
		const refresher = new Refresher(read, (id, doc) => applied.push(`${id}:${doc}`));
		const done = refresher.refresh('a');
		void refresher.refresh('a'); // heard while reading: not dropped
		void refresher.refresh('a'); // nor a third time (one more read covers both)
		pending[0].answer('old');
		await vi.waitFor(() => expect(pending).toHaveLength(2));
		pending[1].answer('new');
		await done;
		expect(applied).toEqual(['a:old', 'a:new']);
		expect(pending).toHaveLength(2);
	});
});
