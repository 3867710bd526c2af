"""Benchmark of heads-mode fine-tuning (issue 4).

1. Seconds per epoch of ``gapkit.finetune.train_heads`` on N synthetic pairs at D = 512
   (default N = 100,000; linear heads, clip+atp+cu, batch 1024), validation included.
2. The cost of one training step (heads forward, loss, backward, AdamW) with clip+atp+cu and
   with Fahim's clip+align+unif, against a clip step measured in the same run, at batch 1024.
   Target: clip+atp+cu at most 1.3x clip. Steps of the losses are interleaved and the median
   of the repeats is reported, so that load from other processes hits all of them alike.

Usage: python benchmarks/finetune.py [--pairs 100000] [--dim 512] [--batch 1024] [--repeats 30] [--steps-only]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gapkit.finetune import TrainConfig, read_metrics, train_heads
from gapkit.heads import build_heads
from gapkit.losses import GapLoss
from gapkit.store import load_embeddings


def synthetic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 64), dtype=np.float32)
    a = rng.standard_normal((64, d), dtype=np.float32)
    b = rng.standard_normal((64, d), dtype=np.float32)
    images = z @ a + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    texts = z @ b + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    images[:, 0] += 150.0  # a modality gap (rows have norms of about 180)
    texts[:, 1] += 150.0
    return images, texts


def step_costs(d: int, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one training step per loss, interleaved."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=g)
    y = torch.randn(batch, d, generator=g)
    setups = {}
    for spec in ("clip", "clip+atp+cu", "clip+align+unif"):
        heads = build_heads(d, d)
        loss = GapLoss(spec)
        opt = torch.optim.AdamW(list(heads.parameters()) + list(loss.parameters()), lr=1e-4)
        setups[spec] = (heads, loss, opt)

    def step(spec: str) -> float:
        heads, loss, opt = setups[spec]
        t = time.perf_counter()
        total, _ = loss(heads.project_images(x), heads.project_texts(y))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return time.perf_counter() - t

    for spec in setups:  # warm-up
        step(spec)
        step(spec)
    times: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(repeats):
        for spec in setups:
            times[spec].append(step(spec))
    return {s: statistics.median(v) for s, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--steps-only", action="store_true", help="only the step-cost comparison")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 is steadier on a machine shared with other jobs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    costs = step_costs(args.dim, args.batch, args.repeats)
    base = costs["clip"]
    print(f"\none training step at batch {args.batch}, D = {args.dim} (median of {args.repeats}, interleaved):")
    for spec, t in costs.items():
        print(f"  {spec:<16} {t * 1e3:8.2f} ms   {t / base:5.2f}x clip")
    ratio = costs["clip+atp+cu"] / base
    print(f"  clip+atp+cu / clip = {ratio:.2f}x (target <= 1.3x): {'OK' if ratio <= 1.3 else 'ABOVE TARGET'}")
    if args.steps_only:
        return

    images, texts = synthetic(args.pairs, args.dim)
    emb = load_embeddings(images=images, texts=texts)
    cfg = TrainConfig(loss="clip+atp+cu", epochs=args.epochs, batch_size=args.batch, lr=1e-4,
                      val_fraction=0.01, patience=0, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = train_heads(emb, Path(tmp) / "run", cfg)
        wall = time.perf_counter() - t
        rows = read_metrics(Path(tmp) / "run")
    epoch_s = [b["time_s"] - a["time_s"] for a, b in zip(rows, rows[1:])]
    n_train = int(round(args.pairs * 0.99))
    print(f"\nheads mode, {args.pairs:,} synthetic pairs at D = {args.dim} (1 % held out), batch {args.batch}:")
    for e, s in enumerate(epoch_s, 1):
        print(f"  epoch {e}: {s:6.2f} s ({n_train / s:,.0f} pairs/s, validation on {args.pairs - n_train:,} pairs included)")
    print(f"  whole run incl. split, epoch-0 evaluation, checkpoints and projected sets: {wall:.1f} s")
    print(f"  validation gap {res.before['gap']:.3f} -> {res.after['gap']:.3f}")


if __name__ == "__main__":
    main()
