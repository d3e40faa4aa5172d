"""What an acceptable image is: the accepted types (sniffed from bytes), the limits every
image is checked against, and opening one with only those decoders.

Shared by the intake (checking uploads) and the ingest function (decoding them). Sits on
:mod:`bus.core` only.
"""
