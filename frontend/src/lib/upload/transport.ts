/**
 * Sending one file, with upload progress (XMLHttpRequest: fetch reports none).
 *
 * A file under DIRECT_BYTES goes through the gateway (POST /api/uploads, one file per
 * request, so each has its own progress and its own answer). A bigger one goes straight to
 * the store: POST /api/uploads/presign, then the form to the store, then
 * POST /api/uploads/{id}/complete. When the browser cannot reach the store (a network error:
 * the store's address is not reachable from here, or the page's policy does not allow
 * connecting to it), the file goes through the gateway instead, and the row says so.
 */
import { ApiError, problemOf, sendJson } from '$lib/api';

/** Files from this size on go straight to the store. */
export const DIRECT_BYTES = 32 * 1024 * 1024;
/** The types the presigned form takes (the gateway sniffs the bytes of the others). */
const PRESIGNABLE = new Set([
	'image/jpeg',
	'image/png',
	'image/gif',
	'image/webp',
	'image/tiff',
	'image/heic',
	'image/avif'
]);

/** What the server said about one accepted file (POST /api/uploads' results[i]). */
export interface Accepted {
	id: string;
	duplicate: boolean;
	status: number;
	name: string;
	/** set when a big file could not go straight to the store */
	note?: string;
}

export type Progress = (loaded: number) => void;
export type Transport = (file: File, progress: Progress, signal: AbortSignal) => Promise<Accepted>;

interface Sent {
	status: number;
	text: string;
	statusText: string;
}

/** A network failure (no HTTP answer at all). */
export class NetworkError extends Error {}

/** POST ``body`` to ``url`` and report the bytes sent. */
export function post(
	url: string,
	body: FormData,
	progress: Progress,
	signal: AbortSignal,
	credentials = true
): Promise<Sent> {
	return new Promise((resolve, reject) => {
		const xhr = new XMLHttpRequest();
		xhr.open('POST', url);
		xhr.withCredentials = credentials;
		xhr.upload.onprogress = (event) => progress(event.loaded);
		xhr.onload = () => resolve({ status: xhr.status, text: xhr.responseText, statusText: xhr.statusText });
		xhr.onerror = () => reject(new NetworkError(`could not reach ${new URL(url, location.href).host}`));
		xhr.onabort = () => reject(new DOMException('cancelled', 'AbortError'));
		if (signal.aborted) return reject(new DOMException('cancelled', 'AbortError'));
		signal.addEventListener('abort', () => xhr.abort(), { once: true });
		xhr.send(body);
	});
}

/** The accepted file of a gateway answer, or the ApiError with the server's own words. */
export async function acceptedOf(sent: Sent): Promise<Accepted> {
	const response = new Response(sent.text, { status: sent.status, statusText: sent.statusText });
	if (!response.ok) throw await problemOf(response);
	const answer = (await response.json()) as { results?: Accepted[] } & Partial<Accepted>;
	const result = answer.results ? answer.results[0] : (answer as Accepted);
	if (!result?.id) throw new ApiError(sent.status, 'Unexpected answer', 'the server named no image', {});
	return result;
}

/** One file through the gateway (multipart, field ``file``). */
export async function viaGateway(file: File, progress: Progress, signal: AbortSignal): Promise<Accepted> {
	const form = new FormData();
	form.append('file', file, file.name);
	return acceptedOf(await post('/api/uploads', form, progress, signal));
}

interface Presigned {
	id: string;
	url: string;
	fields: Record<string, string>;
	file_field: string;
	complete_url: string;
}

/** One file straight into the store through a presigned form, then completed. */
export async function viaStore(file: File, progress: Progress, signal: AbortSignal): Promise<Accepted> {
	const form = await sendJson<Presigned>('POST', '/api/uploads/presign', {
		content_type: file.type,
		size: file.size,
		filename: file.name
	});
	const body = new FormData();
	for (const [name, value] of Object.entries(form.fields)) body.append(name, value);
	body.append(form.file_field, file, file.name); // the file comes last in an S3 POST
	const stored = await post(form.url, body, progress, signal, false);
	if (stored.status < 200 || stored.status >= 300) {
		const said = /<Message>([^<]*)<\/Message>/.exec(stored.text)?.[1];
		throw new ApiError(stored.status, 'Store refused', said ?? `the store answered ${stored.status}`, {});
	}
	try {
		return await sendJson<Accepted>('POST', form.complete_url);
	} catch (error) {
		// Completing is idempotent: a request lost on the way (a dropped idle connection
		// after a long upload) is simply sent again.
		if (!(error instanceof TypeError)) throw error;
		return sendJson<Accepted>('POST', form.complete_url);
	}
}

/** The transport the upload page uses: big files straight to the store, if it can. */
export const upload: Transport = async (file, progress, signal) => {
	if (file.size < DIRECT_BYTES || !PRESIGNABLE.has(file.type)) return viaGateway(file, progress, signal);
	try {
		return await viaStore(file, progress, signal);
	} catch (error) {
		if (!(error instanceof NetworkError)) throw error;
		progress(0);
		const result = await viaGateway(file, progress, signal);
		return { ...result, note: `sent through the gateway: ${error.message}` };
	}
};
