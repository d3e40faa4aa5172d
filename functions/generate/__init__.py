"""generate: Stable Diffusion XL text-to-image and image-to-image.

Listens to ``requested`` (a generation request object landed under ``requests/``) and emits
``generated`` for each output under ``generated/<job>/<n>.png``. Registered as a function
once its model code lands; until then no ``requested`` events are produced.
"""
