import { describe, expect, it } from 'vitest';
import { ApiError } from '$lib/api';
import { acceptedOf } from './transport';

const sent = (status: number, body: unknown, statusText = '') => ({
	status,
	statusText,
	text: typeof body === 'string' ? body : JSON.stringify(body)
});
const result = (id: string, duplicate: boolean) => ({
	name: 'a.jpg',
	status: duplicate ? 200 : 201,
	duplicate,
	id,
	url: `/api/images/${id}`
});

describe('acceptedOf', () => {
	it('takes the one result of an accepted or duplicate upload', async () => {
		expect(await acceptedOf(sent(201, { results: [result('new1', false)] }))).toMatchObject({
			id: 'new1',
			duplicate: false
		});
		expect(await acceptedOf(sent(200, { results: [result('old1', true)] }))).toMatchObject({
			id: 'old1',
			duplicate: true
		});
	});

	it("turns a refusal into an ApiError with the server's detail", async () => {
		const problem = {
			title: 'Upload rejected',
			status: 415,
			detail: 'not a supported image (content sniffed from its bytes); accepted: JPEG, PNG',
			results: [{ name: 'notes.txt', status: 415, error: 'not a supported image' }]
		};
		const error = await acceptedOf(sent(415, problem)).catch((e: unknown) => e);
		expect(error).toBeInstanceOf(ApiError);
		expect((error as ApiError).status).toBe(415);
		expect((error as ApiError).message).toBe(problem.detail);
	});

	it('says the status when the answer is not JSON', async () => {
		const error = await acceptedOf(sent(502, '<html>bad gateway</html>', 'Bad Gateway')).catch((e: unknown) => e);
		expect((error as Error).message).toBe('502 Bad Gateway');
	});
});
