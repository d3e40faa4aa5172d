/** How the dashboards write numbers and times: short, and "—" for what is not known. */

export const UNKNOWN = '—';

/** A rate per minute: whole numbers from 10 up, one decimal below. */
export function formatRate(perMinute: number | null | undefined): string {
	if (perMinute === null || perMinute === undefined || !Number.isFinite(perMinute)) return UNKNOWN;
	const value = Math.max(0, perMinute);
	if (value === 0) return '0/min';
	if (value >= 10) return `${Math.round(value).toLocaleString('en')}/min`;
	return `${value.toFixed(1)}/min`;
}

export function formatCount(n: number | null | undefined): string {
	return n === null || n === undefined ? UNKNOWN : n.toLocaleString('en');
}

/** Megabytes as MB or GB. */
export function formatMb(mb: number | null | undefined): string {
	if (mb === null || mb === undefined) return UNKNOWN;
	if (Math.abs(mb) >= 1024) return `${(mb / 1024).toFixed(1)} GB`;
	return `${Math.round(mb)} MB`;
}

export function formatBytes(bytes: number | null | undefined): string {
	if (bytes === null || bytes === undefined) return UNKNOWN;
	const units = ['B', 'KB', 'MB', 'GB', 'TB'];
	let value = bytes;
	let unit = 0;
	while (Math.abs(value) >= 1024 && unit < units.length - 1) {
		value /= 1024;
		unit++;
	}
	return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** A duration in seconds: "850 ms", "12 s", "4 min", "3 h", "2 d". */
export function formatSeconds(s: number | null | undefined): string {
	if (s === null || s === undefined || !Number.isFinite(s)) return UNKNOWN;
	const a = Math.abs(s);
	if (a < 1) return `${Math.round(s * 1000)} ms`;
	if (a < 60) return `${Math.round(s)} s`;
	if (a < 3600) return `${Math.round(s / 60)} min`;
	if (a < 86400) return `${Math.round(s / 3600)} h`;
	return `${Math.round(s / 86400)} d`;
}

/** A latency in milliseconds: "85 ms", "1.2 s". */
export function formatMs(ms: number | null | undefined): string {
	if (ms === null || ms === undefined || !Number.isFinite(ms)) return UNKNOWN;
	return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/** How long ago ``iso`` was, at ``now`` (ms): "just now", "12 s ago", "3 min ago"... */
export function formatAgo(iso: string | null | undefined, now: number): string {
	if (!iso) return UNKNOWN;
	const t = Date.parse(iso);
	if (Number.isNaN(t)) return UNKNOWN;
	const s = (now - t) / 1000;
	// A little in the future: the server's clock is ahead, or the page's moved on a while ago.
	if (s < -60) return `in ${formatSeconds(-s)}`;
	if (s < 2) return 'just now';
	return `${formatSeconds(s)} ago`;
}

/** A time as the reader's locale writes it, with seconds. */
export function formatTime(iso: string | null | undefined): string {
	if (!iso) return UNKNOWN;
	const t = new Date(iso);
	return Number.isNaN(t.getTime()) ? UNKNOWN : t.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
}

/** "1 image", "3 images". */
export function plural(n: number, one: string, many = `${one}s`): string {
	return `${n.toLocaleString('en')} ${n === 1 ? one : many}`;
}

/** The message of anything thrown. */
export function errorText(error: unknown): string {
	return error instanceof Error ? error.message : String(error);
}
