/**
 * A button's action on the server: which one is running (its buttons wait), and what came
 * of the last one, a notice or the server's own error message.
 */
export class Action {
	busy = $state<string | null>(null);
	notice = $state('');
	error = $state('');

	/** Run ``work`` (named ``id``), whose answer is the notice to show. */
	async run(id: string, work: () => Promise<string>): Promise<void> {
		this.busy = id;
		this.notice = '';
		this.error = '';
		try {
			this.notice = await work();
		} catch (e) {
			this.error = e instanceof Error ? e.message : String(e);
		} finally {
			this.busy = null;
		}
	}
}
