/** The webhook documents (bus/gateway/webhooks_api.py), as the app reads them. */

export interface WebhookInfo {
	id: string;
	url: string;
	/** null: every event type */
	event_types: string[] | null;
	description: string;
	active: boolean;
	/** why it was turned off (410, failures) */
	disabled_reason: string | null;
	created: string;
	updated: string;
	/** every attempt failed since then */
	failing_since: string | null;
	/** rotated secrets still signing until */
	old_secrets_until: string[];
}

export interface WebhookWithSecret extends WebhookInfo {
	/** shown this once, never again */
	secret: string;
}

export interface NewWebhook {
	url: string;
	event_types: string[] | null;
	description: string;
}

export interface WebhookChange {
	url?: string;
	event_types?: string[] | null;
	description?: string;
	active?: boolean;
	rotate_secret?: boolean;
}

export interface DeliveryAttempt {
	id: number;
	/** the message (its webhook-id header): what a replay names */
	webhook_id: string;
	event_id: string;
	event_type: string;
	/** 1 for the first try; replays count on */
	attempt: number;
	/** null: no answer (refused, timed out) */
	status_code: number | null;
	latency_ms: number | null;
	/** null: delivered */
	error: string | null;
	delivered: boolean;
	/** the message now: pending, delivered or failed */
	message_state: string;
	at: string;
}

export interface DeliveryPage {
	items: DeliveryAttempt[];
	next_before: number | null;
}

export interface Replayed {
	endpoint_id: string;
	webhook_ids: string[];
	more: boolean;
}

/** What the endpoint form gives: a new endpoint's fields, or an edit's. */
export interface EndpointValues {
	url: string;
	description: string;
	event_types: string[] | null;
	active: boolean;
}
