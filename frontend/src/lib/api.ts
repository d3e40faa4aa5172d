/**
 * The one way the app talks to the gateway: same-origin fetch with the session cookie.
 * Errors arrive as problem+json; they become an ApiError whose message is the server's
 * own detail, so every page can show it as it is.
 */

export class ApiError extends Error {
	readonly status: number;
	readonly title: string;
	readonly problem: Record<string, unknown>;

	constructor(status: number, title: string, detail: string, problem: Record<string, unknown>) {
		super(detail || title);
		this.status = status;
		this.title = title;
		this.problem = problem;
	}
}

/** Query-string values; undefined and null are left out. */
export type Query = Record<string, string | number | boolean | null | undefined>;

export function withQuery(path: string, query?: Query): string {
	if (!query) return path;
	const params = new URLSearchParams();
	for (const [name, value] of Object.entries(query)) {
		if (value !== undefined && value !== null && value !== '') params.set(name, String(value));
	}
	const text = params.toString();
	return text ? `${path}?${text}` : path;
}

/** An error from a failed answer: its problem+json, or its status line. */
export async function problemOf(response: Response): Promise<ApiError> {
	let problem: Record<string, unknown> = {};
	try {
		problem = (await response.json()) as Record<string, unknown>;
	} catch {
		// not JSON: the status line says what there is to say
	}
	const title = String(problem.title ?? response.statusText ?? 'Error');
	let detail = String(problem.detail ?? '');
	const errors = problem.errors;
	if (Array.isArray(errors) && errors.length > 0) {
		const lines = errors.map((e) => (typeof e === 'string' ? e : JSON.stringify(e)));
		detail = detail ? `${detail}: ${lines.join('; ')}` : lines.join('; ');
	}
	return new ApiError(response.status, title, detail || `${response.status} ${title}`, problem);
}

/** Listeners told when the server says the session is gone (401). */
const signedOutListeners = new Set<() => void>();
export function onSignedOut(listener: () => void): () => void {
	signedOutListeners.add(listener);
	return () => signedOutListeners.delete(listener);
}

/** Tell the app the session is gone (the server answered 401). */
export function signedOut(): void {
	for (const listener of signedOutListeners) listener();
}

export async function request(path: string, init: RequestInit = {}): Promise<Response> {
	const response = await fetch(path, { credentials: 'same-origin', ...init });
	if (!response.ok) {
		const error = await problemOf(response);
		if (response.status === 401 && path !== '/api/session') signedOut();
		throw error;
	}
	return response;
}

export async function getJson<T>(path: string, query?: Query, signal?: AbortSignal): Promise<T> {
	const response = await request(withQuery(path, query), { signal });
	return (await response.json()) as T;
}

export async function sendJson<T>(
	method: 'POST' | 'PUT' | 'PATCH' | 'DELETE',
	path: string,
	body?: unknown,
	query?: Query
): Promise<T> {
	const init: RequestInit = { method };
	if (body !== undefined) {
		init.body = JSON.stringify(body);
		init.headers = { 'Content-Type': 'application/json' };
	}
	const response = await request(withQuery(path, query), init);
	if (response.status === 204) return undefined as T;
	const type = response.headers.get('Content-Type') ?? '';
	return (type.includes('json') ? await response.json() : undefined) as T;
}
