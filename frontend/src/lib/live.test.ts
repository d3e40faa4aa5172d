import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { onSignedOut } from './api';
import { live, type LiveEvent } from './live.svelte';

/** Stands for the browser's EventSource (jsdom has none): records what was opened. */
class FakeSource {
	static CONNECTING = 0;
	static OPEN = 1;
	static CLOSED = 2;
	static opened: FakeSource[] = [];
	readyState = FakeSource.CONNECTING;
	onopen: (() => void) | null = null;
	onerror: (() => void) | null = null;
	listeners = new Map<string, (message: MessageEvent) => void>();
	constructor(readonly url: string) {
		FakeSource.opened.push(this);
	}
	addEventListener(type: string, listener: (message: MessageEvent) => void): void {
		this.listeners.set(type, listener);
	}
	close(): void {
		this.readyState = FakeSource.CLOSED;
	}
	emit(type: string, data: unknown, lastEventId: string): void {
		this.listeners.get(type)?.(new MessageEvent(type, { data: JSON.stringify(data), lastEventId }));
	}
	refuse(): void {
		this.readyState = FakeSource.CLOSED;
		this.onerror?.();
	}
}

describe('the live stream', () => {
	beforeEach(() => {
		FakeSource.opened = [];
		vi.useFakeTimers();
		vi.stubGlobal('EventSource', FakeSource);
	});
	afterEach(() => {
		live.stop();
		vi.useRealTimers();
		vi.unstubAllGlobals();
	});

	it('resumes after the newest stored event when a refused stream is opened again', async () => {
		vi.stubGlobal('fetch', vi.fn(async () => new Response('{}', { status: 200 })));
		const heard: LiveEvent[] = [];
		const stop = live.subscribe((event) => heard.push(event));
		live.start();
		const first = FakeSource.opened[0];
		expect(first.url).toBe('/api/events');
		first.emit('uploaded', { id: 'a' }, '41');
		first.emit('progress', { step: 1 }, '41'); // the browser repeats the last id
		first.refuse(); // e.g. a proxy's 502 while the gateway restarts
		expect(live.state).toBe('closed');
		await vi.advanceTimersByTimeAsync(1000);
		expect(FakeSource.opened).toHaveLength(2);
		expect(FakeSource.opened[1].url).toBe('/api/events?last_event_id=41');
		expect(heard.map((e) => e.id)).toEqual(['41', null]);
		stop();
	});

	it('tells the app it is signed out instead of retrying when the session ended', async () => {
		vi.stubGlobal('fetch', vi.fn(async () => new Response('{}', { status: 401 })));
		const signedOut = vi.fn();
		const stop = onSignedOut(signedOut);
		live.start();
		FakeSource.opened[0].refuse();
		await vi.advanceTimersByTimeAsync(1000);
		expect(signedOut).toHaveBeenCalledOnce();
		expect(FakeSource.opened).toHaveLength(1);
		stop();
	});
});
