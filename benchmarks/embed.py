"""Benchmark of `gapkit embed` end to end against the model's forward alone, in the same run.

On the MedPix train images (1653 pairs) with open_clip ViT-B-32 (random weights by default:
speed does not depend on them), each phase in a fresh process:

* forward:  the images decoded and preprocessed, the captions tokenized, all *before* the clock
            starts (preloaded tensors); timed: ``encode_image`` + ``encode_text`` per batch of
            ``--batch-size`` pairs under inference_mode (and the same autocast as embed on GPU);
* embed:    ``gapkit.embed.embed(...)`` with the same encoders object (built before the clock)
            and batch size: dataset opening, DataLoader workers decoding and preprocessing,
            tokenizing, the forward, shard writing and the final merge, all timed;
* cli:      ``python -m gapkit embed ...`` as a user runs it (start-up and model loading included).

Reported: pairs/s of each, the ratio embed / forward (target >= 0.85 on a 2-core CPU, >= 0.95
on a GPU) and peak resident memory (ru_maxrss of the process, and of its largest child: the
DataLoader workers).

    python benchmarks/embed.py                          # all 1653 MedPix train pairs
    python benchmarks/embed.py --limit 256 --batch-size 32 --workers 1 --repeat 3   # median of 3 rounds
    python benchmarks/embed.py --model ViT-B-32:laion2b_s34b_b79k --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medpix" / "train"


def _peak() -> dict[str, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mib": self_kb / 1024, "peak_child_rss_mib": child_kb / 1024}


def phase_forward(a: argparse.Namespace) -> dict:
    import torch

    from gapkit.datasets import open_dataset
    from gapkit.encoders import load_encoders

    enc = load_encoders(a.model, device=a.device)
    ds = open_dataset(a.data, limit=a.limit)
    pixels = torch.stack([enc.image_transform(ds.load_image(i)) for i in range(len(ds))])
    texts = [t for r in ds.records for t in r.texts]
    assert len(texts) == len(ds), "the benchmark expects one caption per image (MedPix)"
    tokens = [enc.tokenize(texts[s: s + a.batch_size]) for s in range(0, len(texts), a.batch_size)]
    cuda = enc.device.type == "cuda"
    if cuda:
        pixels = pixels.pin_memory()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    with torch.inference_mode():  # warm-up batch, not timed (embed's first batch is timed)
        enc.encode_image(pixels[: a.batch_size])
        enc.encode_text(tokens[0])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b, s in enumerate(range(0, len(texts), a.batch_size)):
            if autocast is not None:
                with autocast:
                    im = enc.encode_image(pixels[s: s + a.batch_size])
                    tx = enc.encode_text(tokens[b])
            else:
                im = enc.encode_image(pixels[s: s + a.batch_size])
                tx = enc.encode_text(tokens[b])
            im.float().cpu()
            tx.float().cpu()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"phase": "forward", "pairs": len(texts), "seconds": dt, "pairs_per_s": len(texts) / dt, **_peak()}


def phase_embed(a: argparse.Namespace) -> dict:
    from gapkit.embed import embed
    from gapkit.encoders import load_encoders

    enc = load_encoders(a.model, device=a.device)
    out = Path(tempfile.mkdtemp(prefix="gapkit-bench-")) / "set"
    try:
        t0 = time.perf_counter()
        r = embed(a.data, out, encoders=enc, batch_size=a.batch_size, workers=a.workers, limit=a.limit,
                  device=a.device)
        dt = time.perf_counter() - t0
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {"phase": "embed", "pairs": r.n_texts, "seconds": dt, "pairs_per_s": r.n_texts / dt,
            "loop_pairs_per_s": r.pairs_per_s, **_peak()}


def phase_cli(a: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="gapkit-bench-")) / "set"
    cmd = [sys.executable, "-m", "gapkit", "embed", str(a.data), "--model", a.model, "-o", str(out), "-q", "--json",
           "--batch-size", str(a.batch_size)]
    for opt, val in (("--workers", a.workers), ("--limit", a.limit), ("--device", a.device)):
        if val is not None:
            cmd += [opt, str(val)]
    try:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        dt = time.perf_counter() - t0
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"gapkit embed failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {"phase": "cli", "pairs": r["n_texts"], "seconds": dt, "pairs_per_s": r["n_texts"] / dt, **_peak()}


PHASES = {"forward": phase_forward, "embed": phase_embed, "cli": phase_cli}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--model", default="ViT-B-32:random")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="embed's DataLoader workers (default: its own default)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--phases", default="forward,embed,cli")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all phases; the median ratio is reported")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.phase:
        print(json.dumps(PHASES[a.phase](a)))
        return
    if not Path(a.data).exists():
        raise SystemExit(f"no data at {a.data} (the MedPix train split of ../shared/data)")
    import torch

    print(f"gapkit embed benchmark: {a.model} on {a.data}" + (f" (first {a.limit})" if a.limit else ""))
    print(f"batch size {a.batch_size}, workers {a.workers if a.workers is not None else 'default'}, "
          f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    rounds: list[dict[str, dict]] = []
    for _ in range(a.repeat):
        rounds.append(_round(a))
    names = list(rounds[0])
    if a.repeat > 1:
        print(f"median of {a.repeat} rounds (phases alternate, so load from other jobs hits both alike):")
        for name in names:
            print(f"  {name:8s} {statistics.median(r[name]['pairs_per_s'] for r in rounds):8.2f} pairs/s, "
                  f"peak RSS {max(r[name]['peak_rss_mib'] for r in rounds):.0f} MiB")
    if "forward" in names:
        target = 0.95 if torch.cuda.is_available() else 0.85
        for name in ("embed", "cli"):
            if name in names:
                ratios = [r[name]["pairs_per_s"] / r["forward"]["pairs_per_s"] for r in rounds]
                ratio = statistics.median(ratios)
                flag = "" if name == "cli" else (" (meets target >= %.2f)" % target if ratio >= target else " (BELOW target %.2f)" % target)
                per_round = ", ".join(f"{x:.3f}" for x in ratios)
                print(f"  ratio {name}/forward = {ratio:.3f}{flag}" + (f"  [rounds: {per_round}]" if len(ratios) > 1 else ""))


def _round(a: argparse.Namespace) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in a.phases.split(","):
        cmd = [sys.executable, __file__, "--phase", name, "--data", a.data, "--model", a.model,
               "--batch-size", str(a.batch_size)]
        for opt, val in (("--workers", a.workers), ("--limit", a.limit), ("--device", a.device)):
            if val is not None:
                cmd += [opt, str(val)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if res.returncode != 0:
            raise SystemExit(f"phase {name} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        results[name] = r
        print(f"  {name:8s} {r['pairs']:6d} pairs  {r['seconds']:8.2f} s  {r['pairs_per_s']:8.2f} pairs/s  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB (largest child {r['peak_child_rss_mib']:.0f} MiB)", flush=True)
    return results


if __name__ == "__main__":
    main()
