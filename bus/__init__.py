"""darkroom\x27s bus: the runtime every function runs on."""
