// The gateway serves the app under a strict Content-Security-Policy that runs no inline
// code. SvelteKit's page shell starts the app with an inline <script>; this moves it to a
// file of its own (named by its hash, so it caches forever) and points the page at it.
// A classic script, not a module: the bootstrap reads document.currentScript.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { gzipSync, brotliCompressSync } from 'node:zlib';

const out = process.env.DARKROOM_FRONTEND_BUILD ?? 'build';
const page = `${out}/index.html`;
const html = readFileSync(page, 'utf8');
const inline = /<script>([\s\S]*?)<\/script>/;
const found = html.match(inline);
if (!found) {
	console.log('externalize-boot: no inline script in', page);
	process.exit(0);
}
const code = found[1].trim() + '\n';
const name = `boot.${createHash('sha256').update(code).digest('hex').slice(0, 10)}.js`;
writeFileSync(`${out}/_app/immutable/${name}`, code);
const rewritten = html.replace(inline, `<script src="/_app/immutable/${name}"></script>`);
if (/<script>/.test(rewritten)) throw new Error('externalize-boot: a second inline script');
writeFileSync(page, rewritten);
// adapter-static precompressed the old page: compress the new one again.
rmSync(`${page}.gz`, { force: true });
rmSync(`${page}.br`, { force: true });
writeFileSync(`${page}.gz`, gzipSync(rewritten, { level: 9 }));
writeFileSync(`${page}.br`, brotliCompressSync(rewritten));
console.log(`externalize-boot: ${page} starts the app from /_app/immutable/${name}`);
