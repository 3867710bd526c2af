"""`torchrun --nproc_per_node 2 -m gapkit embed` (gloo on CPU) gives the same set as one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gapkit
from gapkit.embed import embed
from tests.tiny_models import tiny_open_clip

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(medpix: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    oc = tiny_open_clip(tmp_path)
    out = tmp_path / "two"
    # 7 shards of 5 images: rank 0 gets 4 shards, rank 1 gets 3 (no padding, no duplicates)
    args = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "gapkit", "embed", str(medpix / "dev"), "--model", oc, "-o", str(out), "--limit", "33",
            "--shard-size", "5", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--json", "-q"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # rank 0 prints it
    assert summary["world"] == 2 and summary["computed_shards"] == [0, 2, 4, 6]
    one = tmp_path / "one"
    embed(medpix / "dev", one, model=oc, limit=33, shard_size=5, batch_size=4, workers=0, device="cpu")
    a, b = gapkit.open_set(out), gapkit.open_set(one)
    assert a.n_images == b.n_images == 33 and a.n_texts == b.n_texts
    np.testing.assert_allclose(a.images, b.images, atol=1e-5)
    np.testing.assert_allclose(a.texts, b.texts, atol=1e-5)
    assert a.image_row.tolist() == b.image_row.tolist()
    assert a.image_meta == b.image_meta and a.text_meta == b.text_meta
    ids = [m["id"] for m in a.image_meta]
    assert len(set(ids)) == len(ids) == 33  # nothing duplicated, nothing padded
    assert a.info["embed"]["world_size"] == 2
