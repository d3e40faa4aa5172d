"""Every way bytes become an ``uploaded`` event: checking, deduplicating and storing an
upload, the GPS strip, fetching by URL, the presigned and MinIO-notification paths.

Sits on :mod:`bus.runtime` (and what is below it).
"""
