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

/** The most ids the server takes in one bulk decision (MAX_BULK in bus/gateway/approvals.py). */
export const BULK_MAX = 500;

/** ``items`` in consecutive parts of at most ``size``. */
export function chunks<T>(items: readonly T[], size: number): T[][] {
	const parts: T[][] = [];
	for (let start = 0; start < items.length; start += size) parts.push(items.slice(start, start + size));
	return parts;
}

/**
 * Reads of single queued images, guarded. An image decided (here or elsewhere) is never
 * brought back by a read that started before the decision; an event heard while its image
 * is being read asks for one more read once that read ends, so its change is not missed.
 */
export class Refresher<T> {
	private readonly decidedIds = new Set<string>();
	/** Images being read → whether another read was asked for meanwhile. */
	private readonly reading = new Map<string, boolean>();
	private readonly read: (id: string) => Promise<T>;
	private readonly apply: (id: string, doc: T) => void;

	constructor(read: (id: string) => Promise<T>, apply: (id: string, doc: T) => void) {
		this.read = read;
		this.apply = apply;
	}

	/** Images that left the queue for good: later reads of them are dropped. */
	decided(ids: Iterable<string>): void {
		for (const id of ids) this.decidedIds.add(id);
	}

	isDecided(id: string): boolean {
		return this.decidedIds.has(id);
	}

	async refresh(id: string): Promise<void> {
		if (this.decidedIds.has(id)) return;
		if (this.reading.has(id)) {
			this.reading.set(id, true);
			return;
		}
		try {
			do {
				this.reading.set(id, false);
				let doc: T;
				try {
					doc = await this.read(id);
				} catch {
					continue; // gone meanwhile (deleted), or not readable: the next event says more
				}
				if (!this.decidedIds.has(id)) this.apply(id, doc);
			} while (this.reading.get(id) && !this.decidedIds.has(id));
		} finally {
			this.reading.delete(id);
		}
	}
}
