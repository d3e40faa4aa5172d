import { describe, expect, it } from 'vitest';
import { ApiError } from '$lib/api';
import type { ImageDoc } from '$lib/types';
import { share, UploadQueue } from './queue.svelte';
import type { Accepted, Progress } from './transport';

interface Call {
	file: File;
	progress: Progress;
	signal: AbortSignal;
	resolve: (value: Accepted) => void;
	reject: (error: unknown) => void;
}

/** A transport whose answers the test gives, one call at a time. */
function fakeTransport() {
	const calls: Call[] = [];
	let open = 0;
	let most = 0;
	const transport = (file: File, progress: Progress, signal: AbortSignal) =>
		new Promise<Accepted>((resolve, reject) => {
			open += 1;
			most = Math.max(most, open);
			const done = () => (open -= 1);
			signal.addEventListener('abort', () => reject(new DOMException('cancelled', 'AbortError')));
			calls.push({
				file,
				progress,
				signal,
				resolve: (value) => (done(), resolve(value)),
				reject: (error) => (done(), reject(error))
			});
		});
	return { calls, transport, most: () => most, open: () => open };
}

const files = (n: number) =>
	Array.from({ length: n }, (_, i) => {
		const file = new File([new Uint8Array(100)], `f${i}.jpg`, { type: 'image/jpeg' });
		return { file, path: file.name };
	});
const settle = () => new Promise((resolve) => setTimeout(resolve, 0));
const notFound: () => Promise<ImageDoc> = () =>
	Promise.reject(new ApiError(404, 'Not Found', 'no image', {}));

describe('UploadQueue', () => {
	it('sends at most `limit` files at once and starts the next as one finishes', async () => {
		const fake = fakeTransport();
		const queue = new UploadQueue(fake.transport, notFound, 4);
		queue.add(files(10));
		expect(fake.calls).toHaveLength(4);
		expect(queue.inFlight).toBe(4);
		expect(queue.items.filter((i) => i.state === 'queued')).toHaveLength(6);

		fake.calls[0].resolve({ id: 'img0', duplicate: false, status: 201, name: 'f0.jpg' });
		await settle();
		expect(fake.calls).toHaveLength(5);
		expect(fake.calls[4].file.name).toBe('f4.jpg'); // in the order they were added

		for (let i = 1; i < 10; i++) {
			fake.calls[i].resolve({ id: `img${i}`, duplicate: false, status: 201, name: `f${i}.jpg` });
			await settle();
		}
		expect(fake.most()).toBe(4);
		expect(queue.items.every((i) => i.state === 'processing')).toBe(true);
		expect(queue.total).toMatchObject({ loaded: 1000, size: 1000, files: 10, sent: 10 });
	});

	it('shows progress per file and in total', async () => {
		const fake = fakeTransport();
		const queue = new UploadQueue(fake.transport, notFound, 2);
		queue.add(files(3));
		fake.calls[0].progress(40);
		fake.calls[1].progress(10);
		expect(queue.items.map((i) => i.loaded)).toEqual([40, 10, 0]);
		expect(queue.total.loaded).toBe(50);
		expect(queue.total.size).toBe(300);
	});

	it("marks a duplicate with the earlier image and shows what the catalogue has of it", async () => {
		const fake = fakeTransport();
		const doc = {
			id: 'old1',
			status: 'ready',
			ingest: { width: 1 },
			caption: { caption: 'a red barn', demo: true }
		} as unknown as ImageDoc;
		const queue = new UploadQueue(fake.transport, async () => doc);
		queue.add(files(1));
		fake.calls[0].resolve({ id: 'old1', duplicate: true, status: 200, name: 'f0.jpg' });
		await settle();
		const [item] = queue.items;
		expect(item).toMatchObject({
			state: 'duplicate',
			imageId: 'old1',
			ingested: true,
			caption: 'a red barn',
			demo: true
		});
	});

	it("keeps the server's own words when it refuses a file, and the others go on", async () => {
		const fake = fakeTransport();
		const queue = new UploadQueue(fake.transport, notFound, 1);
		queue.add(files(2));
		fake.calls[0].reject(
			new ApiError(415, 'Upload rejected', 'not a supported image: expected JPEG, PNG...', {})
		);
		await settle();
		expect(queue.items[0]).toMatchObject({
			state: 'failed',
			error: 'not a supported image: expected JPEG, PNG...'
		});
		expect(fake.calls).toHaveLength(2);
		fake.calls[1].resolve({ id: 'b', duplicate: false, status: 201, name: 'f1.jpg' });
		await settle();
		expect(queue.total).toMatchObject({ sent: 1, failed: 1 });

		queue.retry(queue.items[0].key);
		expect(queue.items[0].state).toBe('sending');
		expect(fake.calls).toHaveLength(3);
	});

	it('follows the image live, even when its events came before the answer', async () => {
		const fake = fakeTransport();
		const queue = new UploadQueue(fake.transport, notFound);
		queue.add(files(2));
		queue.hear({ type: 'ingested', id: '7', data: { image_id: 'early' } });
		fake.calls[0].resolve({ id: 'early', duplicate: false, status: 201, name: 'f0.jpg' });
		fake.calls[1].resolve({ id: 'late', duplicate: false, status: 201, name: 'f1.jpg' });
		await settle();
		expect(queue.items[0]).toMatchObject({ state: 'processing', ingested: true, caption: null });

		queue.hear({ type: 'captioned', id: '8', data: { image_id: 'early', data: { caption: 'a fox', demo: true } } });
		queue.hear({ type: 'failed.ingest', id: '9', data: { image_id: 'late', data: { reason: 'truncated JPEG' } } });
		expect(queue.items[0]).toMatchObject({ state: 'ready', caption: 'a fox', demo: true });
		expect(queue.items[1]).toMatchObject({ state: 'failed', error: 'truncated JPEG' });
	});

	it('cancels a queued file and one being sent', async () => {
		const fake = fakeTransport();
		const queue = new UploadQueue(fake.transport, notFound, 1);
		queue.add(files(2));
		queue.cancel(queue.items[1].key);
		queue.cancel(queue.items[0].key);
		await settle();
		expect(queue.items.map((i) => i.state)).toEqual(['cancelled', 'cancelled']);
		expect(fake.calls).toHaveLength(1); // the queued one was never sent
		expect(queue.total.files).toBe(0);
	});
});

describe('the running totals', () => {
	it('stay equal to a recount of the rows through every kind of change', async () => {
		const fake = fakeTransport();
		const queue = new UploadQueue(fake.transport, notFound, 2);
		const recount = () => {
			const sum = { loaded: 0, size: 0, files: 0, sent: 0, failed: 0, active: 0, done: 0 };
			for (const item of queue.items) {
				const part = share(item);
				for (const key of Object.keys(sum) as (keyof typeof sum)[]) sum[key] += part[key];
			}
			return sum;
		};
		queue.add(files(5));
		fake.calls[0].progress(30);
		expect(queue.total).toEqual(recount());
		queue.cancel(queue.items[4].key); // a queued one
		fake.calls[0].resolve({ id: 'a', duplicate: false, status: 201, name: 'f0.jpg' });
		fake.calls[1].reject(new ApiError(415, 'Unsupported', 'not an image', {}));
		await settle();
		expect(queue.total).toEqual(recount());
		expect(queue.total).toMatchObject({ sent: 1, failed: 1, active: 2, files: 4 });
		queue.hear({ type: 'captioned', id: '1', data: { image_id: 'a', data: { caption: 'a barn' } } });
		expect(queue.total).toMatchObject({ done: 3 }); // captioned, failed, cancelled
		queue.clearFinished();
		expect(queue.total).toEqual(recount());
		expect(queue.total).toMatchObject({ files: 2, active: 2, done: 0 });
	});
});
