/**
 * The webhooks admin page's state: the endpoints, the one whose deliveries are open, and
 * its delivery log. Deliveries follow lifecycle events: when the live stream brings one,
 * the endpoints and the open log are read again a moment later (the attempt is made just
 * after the event), at most once per LOG_DELAY_MS; nothing polls.
 */
import { getJson, sendJson } from '$lib/api';
import { Loadable } from '$lib/status/dashboard.svelte';
import { appendOlder, mergeNewest } from './log';
import type {
	DeliveryAttempt,
	DeliveryPage,
	NewWebhook,
	Replayed,
	WebhookChange,
	WebhookInfo,
	WebhookWithSecret
} from './types';

export const LOG_DELAY_MS = 1000;
export const PAGE = 50;

export class WebhookAdmin {
	endpoints = new Loadable<WebhookInfo[]>();
	/** the endpoint whose deliveries are shown */
	openId = $state<string | null>(null);
	deliveries = new Loadable<DeliveryAttempt[]>();
	nextBefore = $state<number | null>(null);
	/** a secret to show once: just created or rotated */
	secret = $state<{ endpoint: WebhookInfo; secret: string } | null>(null);
	private timer: ReturnType<typeof setTimeout> | null = null;

	get open(): WebhookInfo | null {
		return this.endpoints.value?.find((e) => e.id === this.openId) ?? null;
	}

	async load(): Promise<void> {
		await this.endpoints.load(async () => (await getJson<{ items: WebhookInfo[] }>('/api/webhooks')).items);
		if (this.openId !== null) await this.readLog();
	}

	async create(body: NewWebhook): Promise<WebhookWithSecret> {
		const created = await sendJson<WebhookWithSecret>('POST', '/api/webhooks', body);
		this.secret = { endpoint: created, secret: created.secret };
		await this.load();
		return created;
	}

	async change(id: string, body: WebhookChange): Promise<WebhookInfo> {
		const changed = await sendJson<WebhookInfo | WebhookWithSecret>('PATCH', `/api/webhooks/${encodeURIComponent(id)}`, body);
		if ('secret' in changed) this.secret = { endpoint: changed, secret: changed.secret };
		this.replace(changed);
		return changed;
	}

	async remove(id: string): Promise<void> {
		await sendJson('DELETE', `/api/webhooks/${encodeURIComponent(id)}`);
		if (this.openId === id) this.close();
		this.endpoints.value = this.endpoints.value?.filter((e) => e.id !== id) ?? null;
	}

	async show(id: string): Promise<void> {
		this.openId = id;
		this.deliveries.value = null;
		this.nextBefore = null;
		await this.readLog();
	}

	close(): void {
		this.openId = null;
		this.deliveries.value = null;
		this.nextBefore = null;
	}

	/** The newest page of the open endpoint's log, on top of the older pages loaded. */
	async readLog(): Promise<void> {
		const id = this.openId;
		if (id === null) return;
		await this.deliveries.load(async () => {
			const page = await getJson<DeliveryPage>(`/api/webhooks/${encodeURIComponent(id)}/deliveries`, { limit: PAGE });
			if (this.openId !== id) return page.items; // another log opened meanwhile: its read wins
			const loaded = this.deliveries.value;
			const merged = mergeNewest(loaded ? { items: loaded, nextBefore: this.nextBefore } : null, page);
			this.nextBefore = merged.nextBefore;
			return merged.items;
		});
	}

	async older(): Promise<void> {
		const id = this.openId;
		const before = this.nextBefore;
		if (id === null || before === null) return;
		const page = await getJson<DeliveryPage>(`/api/webhooks/${encodeURIComponent(id)}/deliveries`, { limit: PAGE, before });
		if (this.openId !== id) return;
		this.deliveries.value = appendOlder(this.deliveries.value ?? [], page.items);
		this.nextBefore = page.next_before;
	}

	async replay(id: string, deliveryId: string): Promise<Replayed> {
		const answer = await sendJson<Replayed>('POST', `/api/webhooks/${encodeURIComponent(id)}/deliveries/${encodeURIComponent(deliveryId)}/replay`);
		await this.readLog();
		return answer;
	}

	async replayFailed(id: string, since: Date): Promise<Replayed> {
		const answer = await sendJson<Replayed>('POST', `/api/webhooks/${encodeURIComponent(id)}/replay`, undefined, {
			since: since.toISOString()
		});
		await this.readLog();
		return answer;
	}

	/** A lifecycle event arrived: deliveries follow it, so read the open log shortly. */
	heard(): void {
		if (this.timer !== null) return;
		this.timer = setTimeout(() => {
			this.timer = null;
			void this.load();
		}, LOG_DELAY_MS);
	}

	stop(): void {
		if (this.timer !== null) clearTimeout(this.timer);
		this.timer = null;
	}

	private replace(endpoint: WebhookInfo): void {
		const info: WebhookInfo = { ...endpoint };
		delete (info as Partial<WebhookWithSecret>).secret;
		this.endpoints.value = this.endpoints.value?.map((e) => (e.id === info.id ? info : e)) ?? [info];
	}
}
