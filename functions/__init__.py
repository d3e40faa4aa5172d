"""darkroom's functions: each a module with ``SPEC`` and ``handle(event, ctx)``."""
