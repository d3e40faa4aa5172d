/** The generate form's values, and the request they make. */
import type { CatalogueModel, GenerationRequest } from './api';
import { parseSeed } from './seed';

export interface FormValues {
	prompt: string;
	negative_prompt: string;
	mode: string;
	/** an image id (the image modes) */
	image: string;
	strength: number | null;
	model: string;
	width: number | null;
	height: number | null;
	steps: number | null;
	guidance: number | null;
	/** text: empty means "the server draws one" */
	seed: string;
	n: number;
	/** '' : the model's own */
	scheduler: string;
}

/** The form for ``model``: its defaults, nothing typed yet. */
export function blankForm(model: CatalogueModel | undefined): FormValues {
	return {
		prompt: '',
		negative_prompt: '',
		mode: 'txt2img',
		image: '',
		strength: null,
		model: model?.name ?? '',
		width: model?.defaults.width ?? null,
		height: model?.defaults.height ?? null,
		steps: model?.defaults.steps ?? null,
		guidance: model?.defaults.guidance ?? null,
		seed: '',
		n: 1,
		scheduler: ''
	};
}

/** The request the form makes: empty fields are left out (the model's defaults). */
export function toRequest(values: FormValues, imageModes: readonly string[], maxSeed: number): GenerationRequest {
	const request: GenerationRequest = { mode: values.mode, n: values.n };
	if (values.prompt.trim()) request.prompt = values.prompt;
	if (values.negative_prompt.trim()) request.negative_prompt = values.negative_prompt;
	if (values.model) request.model = values.model;
	for (const name of ['width', 'height', 'steps', 'guidance'] as const) {
		const value = values[name];
		if (value !== null && Number.isFinite(value)) request[name] = value;
	}
	const seed = parseSeed(values.seed, maxSeed);
	if (seed !== null) request.seed = seed;
	if (values.scheduler) request.scheduler = values.scheduler;
	if (imageModes.includes(values.mode)) {
		if (values.image.trim()) request.image = values.image.trim();
		if (values.strength !== null && Number.isFinite(values.strength)) request.strength = values.strength;
	}
	return request;
}

/** A form filled from an earlier job's settings (see jobs.reusable). */
export function fromSettings(base: FormValues, settings: Record<string, unknown>): FormValues {
	const next = { ...base };
	const str = (name: string): string | undefined =>
		typeof settings[name] === 'string' ? (settings[name] as string) : undefined;
	const num = (name: string): number | undefined =>
		typeof settings[name] === 'number' ? (settings[name] as number) : undefined;
	next.prompt = str('prompt') ?? '';
	next.negative_prompt = str('negative_prompt') ?? '';
	next.mode = str('mode') ?? 'txt2img';
	next.image = str('image') ?? '';
	next.model = str('model') ?? base.model;
	next.scheduler = str('scheduler') ?? '';
	next.width = num('width') ?? base.width;
	next.height = num('height') ?? base.height;
	next.steps = num('steps') ?? base.steps;
	next.guidance = num('guidance') ?? base.guidance;
	next.strength = num('strength') ?? null;
	next.n = num('n') ?? 1;
	const seed = num('seed');
	next.seed = seed === undefined ? '' : String(seed);
	return next;
}
