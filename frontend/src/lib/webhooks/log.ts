/**
 * The delivery log as loaded: the newest page read again on top of the pages already there.
 * Attempts are listed newest first by id; "older" pages continue from a cursor (next_before).
 */
import type { DeliveryAttempt, DeliveryPage } from './types';

export interface LoadedLog {
	items: DeliveryAttempt[];
	/** the cursor of the next older page; null: none left */
	nextBefore: number | null;
}

/**
 * ``page`` (the newest attempts, read again) over ``loaded``: its items replace the ones with
 * the same id and go on top; older ones already loaded stay, and so does their cursor. When
 * the page does not reach down to what was loaded (more attempts came than a page holds),
 * the log starts again from the page, so no gap is ever shown.
 */
export function mergeNewest(loaded: LoadedLog | null, page: DeliveryPage): LoadedLog {
	const fresh = { items: page.items, nextBefore: page.next_before };
	if (!loaded || loaded.items.length === 0 || page.items.length === 0) return fresh;
	const floor = Math.min(...page.items.map((a) => a.id));
	const newestLoaded = Math.max(...loaded.items.map((a) => a.id));
	if (page.next_before !== null && floor > newestLoaded) return fresh;
	const older = loaded.items.filter((a) => a.id < floor);
	return { items: [...page.items, ...older], nextBefore: page.next_before === null ? null : loaded.nextBefore };
}

/** An older page after the loaded ones (an attempt already listed is not listed twice). */
export function appendOlder(items: DeliveryAttempt[], older: DeliveryAttempt[]): DeliveryAttempt[] {
	const known = new Set(items.map((a) => a.id));
	return [...items, ...older.filter((a) => !known.has(a.id))];
}
