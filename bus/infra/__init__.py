"""Clients of the servers: the NATS connection, KV compare-and-set and mirrors, the S3
object store, upload spooling, metrics.

Sits on :mod:`bus.core` only.
"""
