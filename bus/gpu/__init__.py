"""GPU memory: the VRAM lease ledger shared by every process, and the models one worker
keeps resident under those leases, with the device's own threads.

Sits on :mod:`bus.core` and :mod:`bus.infra`; knows nothing of the read side.
"""
