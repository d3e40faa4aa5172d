"""The HTTP edge of the bus: uploads, reads, keys, status, and the built frontend."""
