"""generate: text-to-image and image-to-image with diffusers pipelines (see handler.py)."""
