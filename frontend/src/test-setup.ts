// Component tests run in jsdom: each test's DOM is cleaned up by @testing-library/svelte.
export {};
