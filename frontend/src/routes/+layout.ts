// A single-page app: the gateway serves the shell, the client renders every page.
export const ssr = false;
export const prerender = false;
