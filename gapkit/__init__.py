"""gapkit: measure, close and plot the modality gap between image and text embeddings.

Public Python API::

    import gapkit
    emb = gapkit.load_embeddings("my_set/")            # an embedding set or other formats
    result = gapkit.measure(emb.images, emb.texts, image_row=emb.image_row)
    print(result["gap"], result.to_dict())
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GapkitError
from .metrics import MeasureResult, measure
from .store import EmbeddingSet, load_embeddings, open_set, write_set

__all__ = [
    "__version__",
    "GapkitError",
    "MeasureResult",
    "measure",
    "EmbeddingSet",
    "load_embeddings",
    "open_set",
    "write_set",
]
