/**
 * The gallery's filters live in the page's query string, so that a reload, the back button
 * and a shared link show the same images. These turn one into the other, and into the
 * API's own query parameters.
 */
import type { Query } from '$lib/api';

export interface Filters {
	status: string;
	tag: string;
	approval: string;
	/** YYYY-MM-DD, inclusive */
	from: string;
	/** YYYY-MM-DD, inclusive */
	to: string;
	/** words in the name, caption or tags */
	q: string;
	sort: 'created' | 'taken';
	order: 'desc' | 'asc';
	/** an image id: the images like it instead of the list */
	similar: string;
}

export const STATUSES = ['uploaded', 'ingested', 'ready', 'failed'] as const;
export const APPROVALS = ['none', 'pending', 'approved', 'rejected'] as const;
const NAMES = ['status', 'tag', 'approval', 'from', 'to', 'q', 'sort', 'order', 'similar'] as const;
const DATE = /^\d{4}-\d{2}-\d{2}$/;

export function readFilters(params: URLSearchParams): Filters {
	const get = (name: string): string => params.get(name)?.trim() ?? '';
	const status = get('status');
	const approval = get('approval');
	return {
		status: (STATUSES as readonly string[]).includes(status) ? status : '',
		tag: get('tag'),
		approval: (APPROVALS as readonly string[]).includes(approval) ? approval : '',
		from: DATE.test(get('from')) ? get('from') : '',
		to: DATE.test(get('to')) ? get('to') : '',
		q: get('q'),
		sort: get('sort') === 'taken' ? 'taken' : 'created',
		order: get('order') === 'asc' ? 'asc' : 'desc',
		similar: get('similar')
	};
}

/** The query string of ``filters`` (defaults left out), without the '?'. */
export function writeFilters(filters: Filters): string {
	const params = new URLSearchParams();
	for (const name of NAMES) {
		const value = filters[name];
		if (!value || (name === 'sort' && value === 'created') || (name === 'order' && value === 'desc')) {
			continue;
		}
		params.set(name, value);
	}
	return params.toString();
}

function nextDay(day: string): string {
	const moment = new Date(`${day}T00:00:00Z`);
	moment.setUTCDate(moment.getUTCDate() + 1);
	return moment.toISOString();
}

/** GET /api/images's (and the timeline's) parameters for ``filters``. */
export function listQuery(filters: Filters): Query {
	return {
		status: filters.status || undefined,
		tag: filters.tag || undefined,
		approval: filters.approval || undefined,
		since: filters.from ? `${filters.from}T00:00:00Z` : undefined,
		until: filters.to ? nextDay(filters.to) : undefined,
		q: filters.q || undefined,
		sort: filters.sort === 'created' ? undefined : filters.sort,
		order: filters.order === 'desc' ? undefined : filters.order
	};
}

/** Whether an image document passes the filters a client can check itself (a live image). */
export function admits(
	filters: Filters,
	doc: { status: string; approval: string; tags: string[]; created: string; taken: string | null }
): boolean {
	if (filters.q || filters.similar) return false; // the server decides those
	if (filters.status && doc.status !== filters.status) return false;
	if (filters.approval && doc.approval !== filters.approval) return false;
	if (filters.tag && !doc.tags.includes(filters.tag)) return false;
	// The dates bound the sort key, as listQuery's since/until do: sorted by the date
	// taken, a new upload may be an old photo.
	const key = Date.parse(filters.sort === 'taken' ? (doc.taken ?? doc.created) : doc.created);
	if (filters.from && key < Date.parse(`${filters.from}T00:00:00Z`)) return false;
	if (filters.to && key >= Date.parse(nextDay(filters.to))) return false;
	return true;
}

export function isFiltered(filters: Filters): boolean {
	return writeFilters({ ...filters, sort: 'created', order: 'desc' }) !== '';
}
