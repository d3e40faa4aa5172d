import { describe, expect, it } from 'vitest';
import { ApiError, problemOf, withQuery } from './api';

describe('withQuery', () => {
	it('leaves out empty values and encodes the rest', () => {
		expect(withQuery('/api/images', { q: 'red fox', tag: undefined, limit: 5, cursor: null, x: '' })).toBe(
			'/api/images?q=red+fox&limit=5'
		);
		expect(withQuery('/api/images', {})).toBe('/api/images');
	});
});

describe('problemOf', () => {
	it("gives the server's detail as the message", async () => {
		const body = JSON.stringify({ title: 'Unprocessable', detail: 'steps: expected ≤ 50, got 99' });
		const error = await problemOf(
			new Response(body, { status: 422, headers: { 'Content-Type': 'application/problem+json' } })
		);
		expect(error).toBeInstanceOf(ApiError);
		expect(error.status).toBe(422);
		expect(error.message).toBe('steps: expected ≤ 50, got 99');
	});

	it('falls back to the status line when the body is not JSON', async () => {
		const error = await problemOf(new Response('oops', { status: 502, statusText: 'Bad Gateway' }));
		expect(error.message).toBe('502 Bad Gateway');
	});
});
