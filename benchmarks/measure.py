"""Benchmark of `gapkit measure` on synthetic memory-mapped embedding sets, against two floors.

For each N (pairs) and dtype, at D = 512, in one fresh process per case:

* floor (a): numpy reads both memory-mapped arrays once and takes their column means;
* stream:    ``gapkit.measure(..., metrics=STREAM_METRICS)`` (every O(N*D) metric, one pass);
* floor (b): bare torch: normalised tensors already in memory, chunked matmul + top-10, both
             directions (image->text and text->image), nothing else;
* retrieval: ``gapkit.measure(..., metrics="retrieval")`` (including its own streaming pass,
             loading and normalising the gallery);
* default:   ``gapkit.measure(...)`` with the default metrics (stream + retrieval);
* cli:       the ``gapkit measure SET -q -f json`` command, start-up included.

Peak memory is the peak of the process's anonymous resident memory (RssAnon, sampled every
5 ms), the whole process (Python, numpy, torch, sklearn loaded: about 280 MiB before any work)
and, in the JSON, the level before the call (``base_anon_mib``): memory-mapped file pages are
page cache, shared and reclaimable, and are not counted.
Targets (issue 2): stream within 3x of floor (a); retrieval within 1.5x of floor (b); peak
under 2 GiB at N = 10^6; every cost but retrieval linear in N.

    python benchmarks/measure.py          # N = 1e4, 1e5, 1e6 (stream); retrieval at 1e4 and 2e4
    python benchmarks/measure.py --sizes 10000 --retrieval-sizes 10000 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

D = 512


def make_set(folder: Path, n: int, dtype: str, seed: int = 0) -> Path:
    """A synthetic embedding set (images.npy, texts.npy, info.json) written chunk by chunk."""
    from gapkit.store import FORMAT_NAME, FORMAT_VERSION

    path = folder / f"n{n}-{dtype}"
    if (path / "info.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=D).astype(np.float32) * 0.1
    im = np.lib.format.open_memmap(path / "images.npy", mode="w+", dtype=dtype, shape=(n, D))
    tx = np.lib.format.open_memmap(path / "texts.npy", mode="w+", dtype=dtype, shape=(n, D))
    step = 65536
    for s in range(0, n, step):
        e = min(n, s + step)
        a = rng.standard_normal((e - s, D), dtype=np.float32)
        im[s:e] = a
        tx[s:e] = a * 0.5 + rng.standard_normal((e - s, D), dtype=np.float32) + shift
    im.flush()
    tx.flush()
    del im, tx
    info = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "n_images": n, "n_texts": n,
            "image_dim": D, "text_dim": D, "dtype": dtype, "encoders": {"image": "synthetic", "text": "synthetic"}}
    (path / "info.json").write_text(json.dumps(info))
    return path


class AnonPeak:
    """Samples RssAnon of this process every 5 ms; ``peak()`` since the last ``reset()``, in MiB."""

    def __init__(self) -> None:
        self._peak = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop:
            self._peak = max(self._peak, self.now())
            time.sleep(0.005)

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> float:
        time.sleep(0.01)
        return max(self._peak, self.now()) / 1024


def child(path: Path, with_retrieval: bool) -> dict:
    import torch

    import gapkit
    from gapkit.metrics import STREAM_METRICS

    mem = AnonPeak()
    out: dict = {}

    def timed(name: str, fn, repeat: int = 2) -> None:
        best, peak, base = float("inf"), 0.0, 0.0
        for _ in range(repeat):
            mem.reset()
            base = max(base, mem.now() / 1024)
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
            peak = max(peak, mem.peak())
        out[name] = {"s": best, "peak_anon_mib": peak, "base_anon_mib": base}

    def load():
        return np.load(path / "images.npy", mmap_mode="r"), np.load(path / "texts.npy", mmap_mode="r")

    def floor_a():
        x, y = load()
        x.mean(axis=0)
        y.mean(axis=0)

    def stream():
        emb = gapkit.open_set(path)
        gapkit.measure(emb.images, emb.texts, metrics=STREAM_METRICS)

    floor_a()  # warm the page cache
    timed("floor_a", floor_a)
    timed("stream", stream)
    if with_retrieval:
        emb = gapkit.open_set(path)
        timed("retrieval", lambda: gapkit.measure(emb.images, emb.texts, metrics="retrieval"), repeat=1)
        timed("default", lambda: gapkit.measure(emb.images, emb.texts), repeat=1)
        x, y = load()
        xt = torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=1)
        yt = torch.nn.functional.normalize(torch.from_numpy(np.asarray(y, dtype=np.float32)), dim=1)
        chunk = 1024

        def floor_b():
            with torch.no_grad():
                for s in range(0, len(xt), chunk):
                    (xt[s : s + chunk] @ yt.T).topk(10, dim=1)
                for s in range(0, len(yt), chunk):
                    (yt[s : s + chunk] @ xt.T).topk(10, dim=1)

        timed("floor_b", floor_b, repeat=1)
    return out


def run_cli(path: Path, with_retrieval: bool) -> dict:
    metrics = "default" if with_retrieval else ",".join(
        __import__("gapkit.metrics", fromlist=["STREAM_METRICS"]).STREAM_METRICS
    )
    cmd = [sys.executable, "-m", "gapkit", "measure", str(path), "-q", "-f", "json", "--metrics", metrics]
    t = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M"] + cmd if Path("/usr/bin/time").exists() else cmd,
        capture_output=True, text=True,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"gapkit measure failed: {proc.stderr}")
    maxrss = None
    if Path("/usr/bin/time").exists():
        maxrss = int(proc.stderr.strip().splitlines()[-1]) / 1024
    return {"s": wall, "max_rss_mib_incl_page_cache": maxrss, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument(
        "--retrieval-sizes", default="10000,20000",
        help="N at which retrieval (quadratic) and the default metrics are timed too",
    )
    ap.add_argument("--dir", default=os.environ.get("GAPKIT_BENCH_DIR", "/tmp/gapkit-bench"))
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--with-retrieval", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.with_retrieval)))
        return
    folder = Path(args.dir)
    rows = []
    print(f"D = {D}; data in {folder}; torch threads default; times are the best of 2 runs (1 for retrieval)")
    ret_sizes = {int(float(s)) for s in args.retrieval_sizes.split(",") if s}
    sizes = sorted({int(float(s)) for s in args.sizes.split(",")} | ret_sizes)
    for dtype in args.dtypes.split(","):
        for n in sizes:
            t = time.perf_counter()
            path = make_set(folder, n, dtype)
            with_ret = n in ret_sizes
            cmd = [sys.executable, __file__, "--child", str(path)] + (["--with-retrieval"] if with_ret else [])
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            if not args.no_cli:
                res["cli"] = run_cli(path, with_ret)
            res.update(n=n, dtype=dtype)
            rows.append(res)
            line = (
                f"N={n:>8} {dtype}: floor(a) {res['floor_a']['s']:.3f}s | stream {res['stream']['s']:.3f}s "
                f"= {res['stream']['s'] / res['floor_a']['s']:.2f}x floor(a), peak {res['stream']['peak_anon_mib']:.0f} MiB"
            )
            if with_ret:
                line += (
                    f" | floor(b) {res['floor_b']['s']:.2f}s | retrieval {res['retrieval']['s']:.2f}s "
                    f"= {res['retrieval']['s'] / res['floor_b']['s']:.2f}x floor(b) | default {res['default']['s']:.2f}s, "
                    f"peak {res['default']['peak_anon_mib']:.0f} MiB"
                )
            else:
                line += " | retrieval not run at this N (quadratic; see --retrieval-sizes)"
            if "cli" in res:
                line += f" | CLI ({'default' if with_ret else 'stream'} metrics) {res['cli']['s']:.2f}s"
                if res["cli"]["max_rss_mib_incl_page_cache"] is not None:
                    line += f", max RSS incl. mapped pages {res['cli']['max_rss_mib_incl_page_cache']:.0f} MiB"
            print(line + f"  [{time.perf_counter() - t:.0f}s]", flush=True)
    # linearity: seconds per million rows of the streaming pass
    print("\nretrieval scaling (seconds / N^2 * 1e8, constant when quadratic):")
    for dtype in args.dtypes.split(","):
        per = [(r["n"], r["retrieval"]["s"] / r["n"] ** 2 * 1e8) for r in rows if r["dtype"] == dtype and "retrieval" in r]
        print(f"  {dtype}: " + ", ".join(f"N={n}: {v:.2f}" for n, v in per))
    print("\nlinearity (stream seconds per 10^6 pairs):")
    for dtype in args.dtypes.split(","):
        per = [(r["n"], r["stream"]["s"] / r["n"] * 1e6) for r in rows if r["dtype"] == dtype]
        print(f"  {dtype}: " + ", ".join(f"N={n}: {v:.2f}" for n, v in per))
    print("\njson: " + json.dumps(rows))


if __name__ == "__main__":
    main()
