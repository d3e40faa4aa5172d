/**
 * Who is signed in. The API key is pasted once and exchanged for an HttpOnly session
 * cookie (POST /api/session); the key itself is never stored in the browser.
 */
import { ApiError, getJson, onSignedOut, problemOf, request } from './api';

export interface SessionInfo {
	key_id: string;
	name: string;
	scopes: string[];
	expires: string | null;
}

class Session {
	info = $state<SessionInfo | null>(null);
	/** false until the first check of the cookie has answered */
	checked = $state(false);

	constructor() {
		onSignedOut(() => {
			this.info = null;
		});
	}

	get signedIn(): boolean {
		return this.info !== null;
	}

	/** Whether the key has ``scope`` (admin has them all). */
	can(scope: 'read' | 'upload' | 'generate' | 'admin'): boolean {
		const scopes = this.info?.scopes ?? [];
		return scopes.includes(scope) || scopes.includes('admin');
	}

	async check(): Promise<void> {
		try {
			this.info = await getJson<SessionInfo>('/api/session');
		} catch (error) {
			if (!(error instanceof ApiError) || error.status !== 401) throw error;
			this.info = null;
		} finally {
			this.checked = true;
		}
	}

	async signIn(key: string): Promise<void> {
		const response = await fetch('/api/session', {
			method: 'POST',
			credentials: 'same-origin',
			headers: { Authorization: `Bearer ${key.trim()}` }
		});
		if (!response.ok) throw await problemOf(response);
		this.info = (await response.json()) as SessionInfo;
	}

	async signOut(): Promise<void> {
		await request('/api/session', { method: 'DELETE' });
		this.info = null;
	}
}

export const session = new Session();
