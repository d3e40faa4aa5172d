/** The viewer's keyboard: which key does what. */

export type ViewerAction =
	| 'previous'
	| 'next'
	| 'close'
	| 'info'
	| 'edit'
	| 'delete'
	| 'zoom-in'
	| 'zoom-out'
	| 'zoom-reset';

const KEYS: Record<string, ViewerAction> = {
	ArrowLeft: 'previous',
	ArrowRight: 'next',
	Escape: 'close',
	i: 'info',
	I: 'info',
	e: 'edit',
	E: 'edit',
	Delete: 'delete',
	'+': 'zoom-in',
	'=': 'zoom-in',
	'-': 'zoom-out',
	_: 'zoom-out',
	'0': 'zoom-reset'
};

/** Whether the key goes to what has the focus (a text field, a button's own keys). */
function typing(target: EventTarget | null): boolean {
	if (!(target instanceof HTMLElement)) return false;
	if (target.isContentEditable) return true;
	const tag = target.tagName;
	if (tag === 'TEXTAREA' || tag === 'SELECT') return true;
	if (tag !== 'INPUT') return false;
	const type = (target as HTMLInputElement).type;
	return !['button', 'checkbox', 'radio', 'submit', 'reset'].includes(type);
}

/** The viewer's action for a key press, or null: with a modifier, while typing, or inside
 * an open dialog, keys keep their usual meaning. */
export function viewerAction(event: KeyboardEvent): ViewerAction | null {
	if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return null;
	if (typing(event.target)) return null;
	if (event.target instanceof Element && event.target.closest('dialog[open]')) return null;
	return KEYS[event.key] ?? null;
}
