/**
 * The gallery's multi-select: ids chosen by click, ctrl/cmd-click, shift-click (a range
 * from the last one chosen) and the keyboard (space, shift+arrows).
 */
import { SvelteSet } from 'svelte/reactivity';

export interface Position {
	bucket: number;
	index: number;
}

export class Selection {
	readonly ids = new SvelteSet<string>();
	/** where a shift-click range starts */
	anchor = $state<Position | null>(null);

	get size(): number {
		return this.ids.size;
	}

	has(id: string): boolean {
		return this.ids.has(id);
	}

	toggle(id: string, at: Position): void {
		if (this.ids.has(id)) this.ids.delete(id);
		else this.ids.add(id);
		this.anchor = at;
	}

	/** Add every id ``idAt`` knows between the anchor and ``to`` (both ends in). */
	extend(to: Position, counts: readonly number[], idAt: (p: Position) => string | null): void {
		const from = this.anchor ?? to;
		const [start, end] = before(from, to) ? [from, to] : [to, from];
		for (let b = start.bucket; b <= end.bucket; b++) {
			const first = b === start.bucket ? start.index : 0;
			const last = b === end.bucket ? end.index : counts[b] - 1;
			for (let i = first; i <= last; i++) {
				const id = idAt({ bucket: b, index: i });
				if (id) this.ids.add(id);
			}
		}
		if (!this.anchor) this.anchor = to;
	}

	clear(): void {
		this.ids.clear();
		this.anchor = null;
	}
}

function before(a: Position, b: Position): boolean {
	return a.bucket < b.bucket || (a.bucket === b.bucket && a.index <= b.index);
}
