/**
 * The gateway refuses a generation request with every problem listed, each starting with
 * the field it is about ("width must be a multiple of 8, got 1000"; "with model x: steps x
 * strength must be at least 1 ..."). This sorts them by field, so each shows by its control;
 * what names no field of the form stays general.
 */

export const FIELDS = [
	'prompt',
	'negative_prompt',
	'mode',
	'image',
	'strength',
	'model',
	'width',
	'height',
	'steps',
	'guidance',
	'seed',
	'n',
	'scheduler'
] as const;
export type Field = (typeof FIELDS)[number];

export interface SortedErrors {
	fields: Partial<Record<Field, string[]>>;
	general: string[];
}


/** The field one problem is about, if it names one. */
export function fieldOf(problem: string): Field | null {
	const text = problem.replace(/^with model [^:]+: /, '');
	if (text.startsWith('steps x strength')) return 'strength';
	if (text.startsWith('width x height')) return 'width';
	if (/^mode \S+ (needs an image|takes no image)/.test(text)) return 'image';
	const name = /^(\w+)/.exec(text)?.[1];
	if (name && /\bis not a field\b/.test(text)) return null;
	return name && (FIELDS as readonly string[]).includes(name) ? (name as Field) : null;
}

export function sortErrors(problems: string[]): SortedErrors {
	const sorted: SortedErrors = { fields: {}, general: [] };
	for (const problem of problems) {
		const field = fieldOf(problem);
		if (field === null) sorted.general.push(problem);
		else (sorted.fields[field] ??= []).push(problem);
	}
	return sorted;
}

/** The problems of a refusal: its ``errors`` list, else its detail split at "; ". */
export function problemsOf(problem: Record<string, unknown>, message: string): string[] {
	const errors = problem.errors;
	if (Array.isArray(errors) && errors.every((e) => typeof e === 'string')) return errors as string[];
	const detail = typeof problem.detail === 'string' ? problem.detail : message;
	return detail.split('; ').filter((line) => line.trim() !== '');
}
