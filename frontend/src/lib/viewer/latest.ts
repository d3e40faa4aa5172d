/**
 * Requests of which only the newest counts (the lineage of the image shown): starting one
 * aborts the one before, and stop() aborts the last, so a late answer about an image no longer
 * shown is never taken.
 */
export class Latest {
	private current: AbortController | null = null;

	/** A signal for a new request; the one before is aborted. */
	start(): AbortSignal {
		this.current?.abort();
		this.current = new AbortController();
		return this.current.signal;
	}

	stop(): void {
		this.current?.abort();
		this.current = null;
	}
}
