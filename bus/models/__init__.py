"""Models by task: the catalogue that resolves settings and profile to a model, and the
tiny offline demo models that stand in when a real one is not available.

Sits on :mod:`bus.core` only. Nothing here imports torch or transformers at import time.
"""
