"""The HTTP edge of the bus: uploads, reads, keys, status, and the built frontend.

Sits on :mod:`bus.intake.accept` (and what is below it).
"""
