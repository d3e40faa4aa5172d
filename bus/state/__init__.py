"""What the system remembers beside the event stream: the image read model, API keys and
cancellation flags.

Sits on :mod:`bus.core` and :mod:`bus.infra`; knows nothing of GPUs.
"""
