"""With torchrun and 2 CPU processes (gloo), the gathered loss equals the one-process loss.

Each rank holds half of a global batch. GapLoss gathers the features of both ranks (gradient
through the local part), so the loss value, the gradient with respect to each rank's own rows
and the gradient of the learnable logit scale must equal those of one process on the full batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gapkit.losses import GapLoss

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from gapkit.losses import GapLoss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    B, D = 12, 6
    x_all = torch.randn(B, D, generator=g, dtype=torch.float64) * 2
    y_all = torch.randn(B, D, generator=g, dtype=torch.float64) + 0.5
    per = B // world
    out = {}
    for spec in ("clip+atp+cu", "clip+align+unif", "clip"):
        x = x_all[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        y = y_all[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        loss = GapLoss(spec, temperature=0.1, learn_temperature=True).double()
        total, parts = loss(x, y, progress=0.0)
        total.backward()
        out[spec] = {"loss": float(total.detach()), "parts": parts, "gx": x.grad.tolist(), "gy": y.grad.tolist(),
                     "gs": float(loss.logit_scale.grad)}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump({"world": world, "per": per, "results": out}, fh)
    dist.destroy_process_group()
    """
)


def _one_process(spec: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(12, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = (torch.randn(12, 6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    loss = GapLoss(spec, temperature=0.1, learn_temperature=True).double()
    total, parts = loss(x, y)
    total.backward()
    return {"loss": float(total.detach()), "parts": parts, "gx": x.grad, "gy": y.grad, "gs": float(loss.logit_scale.grad)}


def test_gathered_loss_equals_one_process_loss(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    per = ranks[0]["per"]
    for spec in ("clip+atp+cu", "clip+align+unif", "clip"):
        ref = _one_process(spec)
        for r, doc in enumerate(ranks):
            got = doc["results"][spec]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-10), spec
            assert got["parts"] == pytest.approx(ref["parts"], rel=1e-10), spec
            torch.testing.assert_close(torch.tensor(got["gx"], dtype=torch.float64), ref["gx"][r * per:(r + 1) * per])
            torch.testing.assert_close(torch.tensor(got["gy"], dtype=torch.float64), ref["gy"][r * per:(r + 1) * per])
            assert got["gs"] == pytest.approx(ref["gs"], rel=1e-9), spec


def test_local_loss_differs_from_global() -> None:
    # the check above is not vacuous: half a batch alone gives another loss and other gradients
    ref = _one_process("clip+atp+cu")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(12, 6, generator=g, dtype=torch.float64) * 2)[:6]
    y = (torch.randn(12, 6, generator=g, dtype=torch.float64) + 0.5)
    y = y[:6]
    total, _ = GapLoss("clip+atp+cu", temperature=0.1).double()(x, y)
    assert abs(float(total.detach()) - ref["loss"]) > 1e-3
