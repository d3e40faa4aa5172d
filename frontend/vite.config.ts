import adapter from '@sveltejs/adapter-static';
import { sveltekit } from '@sveltejs/kit/vite';
import { svelteTesting } from '@testing-library/svelte/vite';
import { defineConfig } from 'vitest/config';

export default defineConfig({
	plugins: [
		sveltekit({
			compilerOptions: {
				runes: ({ filename }) =>
					filename.split(/[/\\]/).includes('node_modules') ? undefined : true
			},
			// A single-page app: the gateway serves build/ and answers every other page path
			// with index.html, and the client routes it.
			adapter: adapter({ fallback: 'index.html', precompress: true })
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
