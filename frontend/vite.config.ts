import adapter from '@sveltejs/adapter-static';
import { sveltekit } from '@sveltejs/kit/vite';
import { svelteTesting } from '@testing-library/svelte/vite';
import { defineConfig } from 'vitest/config';

// Where the app is built (the gateway serves it from there); another folder lets several
// builds run side by side (DARKROOM_FRONTEND_BUILD: a folder name inside frontend/, which the
// browser tests read as well).
const out = process.env.DARKROOM_FRONTEND_BUILD ?? 'build';

export default defineConfig({
	plugins: [
		sveltekit({
			compilerOptions: {
				runes: ({ filename }) =>
					filename.split(/[/\\]/).includes('node_modules') ? undefined : true
			},
			// A single-page app: the gateway serves build/ and answers every other page path
			// with index.html, and the client routes it.
			adapter: adapter({ pages: out, assets: out, fallback: 'index.html', precompress: true }),
			outDir: out === 'build' ? '.svelte-kit' : `.svelte-kit-${out}`
		}),
		svelteTesting()
	],
	server: {
		// `npm run dev` talks to a gateway on its default port.
		proxy: {
			'/api': 'http://127.0.0.1:8080',
			'/v1': 'http://127.0.0.1:8080'
		}
	},
	test: {
		environment: 'jsdom',
		include: ['src/**/*.test.ts'],
		setupFiles: ['src/test-setup.ts']
	}
});
