"""Every way bytes become an ``uploaded`` event: sniffing and checking images, spooling,
the GPS strip, fetching by URL, the presigned and MinIO-notification paths.

Sits on :mod:`bus.runtime` (and what is below it).
"""
