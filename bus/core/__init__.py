"""The contract and the vocabulary: Spec, Emit, Retry, Reject, Cancelled, Model, the event
envelope, every subject and key name, and the settings.

Pure: no I/O, and it imports no other part of darkroom. Everything else sits on it.
"""
