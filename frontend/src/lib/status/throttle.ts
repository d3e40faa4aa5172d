/**
 * Run ``fn`` at most once per ``ms``: the first call runs at once, calls within the next
 * ``ms`` make one more run when it has passed (so the last change is never missed), and a
 * run never overlaps the one before it (an async ``fn`` is awaited).
 */
export function throttle(fn: () => Promise<void> | void, ms: number): { (): void; cancel(): void } {
	let last = -Infinity;
	let timer: ReturnType<typeof setTimeout> | null = null;
	let running = false;
	let again = false;

	async function run(): Promise<void> {
		timer = null;
		if (running) {
			again = true;
			return;
		}
		running = true;
		last = Date.now();
		try {
			await fn();
		} finally {
			running = false;
			if (again) {
				again = false;
				call();
			}
		}
	}

	function call(): void {
		if (timer !== null) return;
		if (running) {
			again = true;
			return;
		}
		const wait = last + ms - Date.now();
		if (wait <= 0) void run();
		else timer = setTimeout(() => void run(), wait);
	}

	call.cancel = (): void => {
		if (timer !== null) clearTimeout(timer);
		timer = null;
		again = false;
	};
	return call;
}
