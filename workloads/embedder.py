"""An embedding-like tool for ``nalar bench batch``: one matrix product per invocation.

Each text is hashed into a bag-of-tokens vector and projected by a fixed random matrix (numpy; BLAS
does the work). One invocation has a fixed cost (the Python call, the projection's set-up, the
instance's thread hand-off) whatever the number of texts, as a model's forward pass does on a GPU:
``Embedder`` is ``batchable`` and pays it once per batch, ``EmbedderOne`` (the same code) once per call.
"""
from __future__ import annotations

from typing import Any

import nalar

DIM_IN, DIM_OUT = 1024, 256


def _project() -> Any:
    import numpy as np

    return np.random.default_rng(0).standard_normal((DIM_IN, DIM_OUT)).astype(np.float32) / DIM_IN ** 0.5


def embed_all(w: Any, texts: list[str]) -> list[list[float]]:
    """Unit-length embeddings of ``texts``, one row each (rounded: they travel as JSON)."""
    import numpy as np

    x = np.zeros((len(texts), DIM_IN), dtype=np.float32)
    for i, t in enumerate(texts):
        for tok in t.split():
            x[i, hash(tok) % DIM_IN] += 1.0
    y = x @ w
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-9)
    return [[round(float(v), 4) for v in row[:8]] for row in y]  # the first 8 dimensions: enough to check


@nalar.hints(batchable="embed", max_batch_size=64, max_batch_wait_ms=2)
class Embedder(nalar.Tool):
    """Batched: ``embed(text)`` from each caller, one ``embed(texts)`` invocation per batch."""

    def __init__(self) -> None:
        self.w = _project()

    def embed(self, texts: list[str]) -> list[list[float]]:
        return embed_all(self.w, texts)


class EmbedderOne(nalar.Tool):
    """The same tool without the hint: one invocation per call."""

    def __init__(self) -> None:
        self.w = _project()

    def embed(self, text: str) -> list[float]:
        return embed_all(self.w, [text])[0]
