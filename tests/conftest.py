"""Shared fixtures: paths to the real data in ../shared/data (tests skip where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GAPKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the project's ../shared/data folder)")
    return path


@pytest.fixture(scope="session")
def coco_features() -> Path:
    """Liang et al.'s real CLIP embeddings of 500 MSCOCO pairs, shape (2, 500, 512)."""
    return _need(SHARED_DATA / "clip-coco-features" / "features_clip.npy")


@pytest.fixture(scope="session")
def coco_features_random() -> Path:
    """The same pipeline with randomly initialised CLIP weights."""
    return _need(SHARED_DATA / "clip-coco-features" / "features_clip_random.npy")


@pytest.fixture(scope="session")
def medpix() -> Path:
    """MedPix 2.0 imagefolder root with train/ and dev/ (metadata.jsonl + JPEGs)."""
    return _need(SHARED_DATA / "medpix")
