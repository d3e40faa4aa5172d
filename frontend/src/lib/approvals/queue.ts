/**
 * The approval queue's keyboard model, pure: which item has the focus, which are selected,
 * and what a key asks for. j/k or the arrows move, Home/End jump, x or space selects, a
 * approves the focused item, r asks to reject it (the page then takes a reason). Items that
 * leave the queue (decided here or elsewhere) keep the focus in place: it moves to the item
 * that took the place of the one it was on.
 */

export interface QueueState {
	ids: string[];
	focus: number;
	selected: ReadonlySet<string>;
}

export type Command = { kind: 'approve' | 'reject'; id: string };

export function initial(ids: string[] = []): QueueState {
	return { ids, focus: 0, selected: new Set() };
}

function clamp(index: number, length: number): number {
	return length === 0 ? 0 : Math.min(length - 1, Math.max(0, index));
}

export function focusedId(state: QueueState): string | null {
	return state.ids[state.focus] ?? null;
}

/** The state after ``key``, and the decision it asks for (null: none). Unknown keys give
 * the same state object back, so the page lets the browser have them. */
export function onKey(state: QueueState, key: string): { state: QueueState; command: Command | null } {
	const id = focusedId(state);
	switch (key) {
		case 'j':
		case 'ArrowDown':
		case 'ArrowRight':
			return { state: { ...state, focus: clamp(state.focus + 1, state.ids.length) }, command: null };
		case 'k':
		case 'ArrowUp':
		case 'ArrowLeft':
			return { state: { ...state, focus: clamp(state.focus - 1, state.ids.length) }, command: null };
		case 'Home':
			return { state: { ...state, focus: 0 }, command: null };
		case 'End':
			return { state: { ...state, focus: clamp(state.ids.length - 1, state.ids.length) }, command: null };
		case 'x':
		case ' ':
			return { state: id ? toggle(state, id) : state, command: null };
		case 'a':
			return { state, command: id ? { kind: 'approve', id } : null };
		case 'r':
			return { state, command: id ? { kind: 'reject', id } : null };
		default:
			return { state, command: null };
	}
}

export function toggle(state: QueueState, id: string): QueueState {
	const selected = new Set(state.selected);
	if (selected.has(id)) selected.delete(id);
	else selected.add(id);
	return { ...state, selected };
}

export function selectAll(state: QueueState, on: boolean): QueueState {
	return { ...state, selected: new Set(on ? state.ids : []) };
}

export function focusOn(state: QueueState, id: string): QueueState {
	const index = state.ids.indexOf(id);
	return index < 0 ? state : { ...state, focus: index };
}

/** Items gone from the queue: the focus stays at its place (on the next item). */
export function remove(state: QueueState, gone: Iterable<string>): QueueState {
	const drop = new Set(gone);
	if (!state.ids.some((id) => drop.has(id))) return state;
	const before = state.ids.slice(0, state.focus).filter((id) => drop.has(id)).length;
	const ids = state.ids.filter((id) => !drop.has(id));
	const selected = new Set([...state.selected].filter((id) => !drop.has(id)));
	return { ids, focus: clamp(state.focus - before, ids.length), selected };
}

/** New items at the end of the queue (the newest are last); ones it has are left alone. */
export function append(state: QueueState, added: string[]): QueueState {
	const known = new Set(state.ids);
	const fresh = added.filter((id) => !known.has(id));
	return fresh.length ? { ...state, ids: [...state.ids, ...fresh] } : state;
}
