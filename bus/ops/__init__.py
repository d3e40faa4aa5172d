"""Running darkroom: the ``darkroom`` command, the ``up``/``gateway``/``worker``
lifecycles, the embedded servers, and the upload client.

The top layer: it may import anything; nothing imports it.
"""
