import { describe, expect, it } from 'vitest';
import { fieldOf, problemsOf, sortErrors } from './fieldErrors';

describe('fieldOf: the gateway check_request messages by field', () => {
	it.each([
		['width must be a multiple of 64 for wide, got 520', 'width'],
		['height must be between 64 and 2048, got 4000', 'height'],
		['width x height must be at most 4,194,304 pixels, got 4096x4096 = 16,777,216', 'width'],
		['with model tiny-sd: steps x strength must be at least 1 (one denoising step), got 1 x 0.3', 'strength'],
		['mode img2img needs an image', 'image'],
		['mode txt2img takes no image: use img2img, remix, sketch or enhance', 'image'],
		['prompt must not be blank', 'prompt'],
		['negative_prompt must be at most 2000 characters, got 2001', 'negative_prompt'],
		['n must be between 1 and 4, got 9', 'n'],
		['seed must be between 0 and 9007199254740991, got -1', 'seed'],
		["model must be one of a, b, got 'c'", 'model'],
		['strength applies to the image modes, not txt2img', 'strength'],
		['scheduler must be one of euler, got "x"', 'scheduler'],
		['image must be an image id (1-64 characters of A-Z, a-z, 0-9, _ and -), got "a b"', 'image']
	])('%s', (message, field) => {
		expect(fieldOf(message)).toBe(field);
	});

	it('leaves what names no field of the form general', () => {
		expect(fieldOf('colour is not a field of this request')).toBeNull();
		expect(fieldOf('the body must be a JSON object, got []')).toBeNull();
	});
});

describe('sortErrors and problemsOf', () => {
	it('groups a refusal by field', () => {
		const problem = {
			detail: 'steps must be between 1 and 100, got 0; width must be a multiple of 8, got 65',
			errors: ['steps must be between 1 and 100, got 0', 'width must be a multiple of 8, got 65', 'x is not a field of this request']
		};
		const sorted = sortErrors(problemsOf(problem, ''));
		expect(sorted.fields.steps).toEqual(['steps must be between 1 and 100, got 0']);
		expect(sorted.fields.width).toEqual(['width must be a multiple of 8, got 65']);
		expect(sorted.general).toEqual(['x is not a field of this request']);
	});
	it('splits the detail when there is no errors list', () => {
		expect(problemsOf({ detail: 'a; b' }, 'm')).toEqual(['a', 'b']);
		expect(problemsOf({}, 'the message')).toEqual(['the message']);
	});
});
