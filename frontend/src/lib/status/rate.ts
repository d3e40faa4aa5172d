/**
 * Rates from successive counts, computed in the browser: the gateway reports counts (how
 * many a function has done, as it learns of them), and the rate is the rise of a count over
 * a sliding window. A count that falls (a consumer made anew) starts the series afresh.
 */

export interface Sample {
	/** milliseconds (Date.now()) */
	t: number;
	/** a count that only rises */
	count: number;
}

/** The window a rate is measured over, and the samples kept for it. */
export const WINDOW_MS = 60_000;

/** ``samples`` plus one more at ``t``: older ones beyond the window are dropped, except
 * the newest of them (the base the window's rise is measured from). */
export function addSample(samples: Sample[], t: number, count: number, windowMs = WINDOW_MS): Sample[] {
	const last = samples.at(-1);
	if (last !== undefined && (count < last.count || t < last.t)) return [{ t, count }];
	const kept = [...samples, { t, count }];
	let first = 0;
	while (first + 1 < kept.length && kept[first + 1].t <= t - windowMs) first++;
	return kept.slice(first);
}

/**
 * Per minute at ``now``: the rise over the window that ends now. Between samples a count
 * stays what it last was, so a series that stops rising decays to 0 as the window moves on;
 * a series younger than the window is measured over its own age.
 * null: too little to tell (fewer than two samples, or no time between them and now).
 */
export function perMinute(samples: Sample[], now: number, windowMs = WINDOW_MS): number | null {
	const last = samples.at(-1);
	if (last === undefined || samples.length < 2) return null;
	const start = now - windowMs;
	let base = samples[0]; // the count at the window's start: the newest sample at or before it
	for (const s of samples) {
		if (s.t > start) break;
		base = s;
	}
	const elapsed = now - Math.max(base.t, start);
	if (elapsed <= 0) return null;
	return ((last.count - base.count) * 60_000) / elapsed;
}

/** ``samples`` with the count held at its last value up to ``now``: for a count that is
 * kept live (events counted as they come), where no sample means no rise since the last. */
export function heldUntil(samples: Sample[], now: number): Sample[] {
	const last = samples.at(-1);
	return last === undefined || now <= last.t ? samples : [...samples, { t: now, count: last.count }];
}
