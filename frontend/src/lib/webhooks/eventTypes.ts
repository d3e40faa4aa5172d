/** The event-type filter of a webhook endpoint, as the form edits it. */

/** The lifecycle event types an endpoint can ask for (failed.* and cancelled.* cover each
 * stage's; a type of one stage, e.g. failed.caption, goes in "more"). */
export const KNOWN_TYPES = [
	'uploaded',
	'ingested',
	'captioned',
	'requested',
	'generated',
	'approved',
	'rejected',
	'deleted',
	'failed.*',
	'cancelled.*',
	'webhook_disabled'
] as const;

export interface Filter {
	/** every event type (the API's null) */
	all: boolean;
	/** the known types chosen */
	chosen: string[];
	/** others, comma- or space-separated (e.g. failed.caption) */
	more: string;
}

/** The form's filter for ``types`` (null: all). */
export function toFilter(types: string[] | null): Filter {
	if (types === null) return { all: true, chosen: [], more: '' };
	const known = new Set<string>(KNOWN_TYPES);
	return {
		all: false,
		chosen: types.filter((t) => known.has(t)),
		more: types.filter((t) => !known.has(t)).join(', ')
	};
}

/** The API's event_types for ``filter``: null for all, else the types, each once, sorted. */
export function fromFilter(filter: Filter): string[] | null {
	if (filter.all) return null;
	const more = filter.more
		.split(/[\s,]+/)
		.map((t) => t.trim())
		.filter(Boolean);
	return [...new Set([...filter.chosen, ...more])].sort();
}

/** How an endpoint's filter reads in a list. */
export function describeTypes(types: string[] | null): string {
	return types === null ? 'all events' : types.join(', ');
}
