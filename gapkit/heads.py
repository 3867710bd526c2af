"""Projection heads: one per modality, into a shared space, saved as safetensors + JSON config.

``build_heads(image_dim, text_dim, dim)`` makes an image head (image_dim -> dim) and a text head
(text_dim -> dim), so towers of different widths (768 and 384, say) can be aligned.

* ``kind="linear"``: y = W x + b.
* ``kind="mlp"``: y = W x + b + W₂ GELU(W₁ x + b₁) + b₂ (a residual two-layer MLP branch whose last
  layer starts at zero, so the head starts as its linear part).
* ``init="identity"`` (default) starts from the input geometry: W = I where the dims match, and a
  seeded semi-orthogonal W (an isometry when widening, an orthogonal projection when narrowing)
  where they do not; b = 0. ``init="random"`` uses torch's default (Kaiming-uniform) init, seeded.

A run folder holds ``heads.safetensors`` (the weights, keys ``image_head.*`` and ``text_head.*``)
and ``heads.json`` (the config: format, dims, kind, init, hidden width, and any extra fields such
as the loss and temperature). Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import GapkitError
from .store import atomic_write_bytes

HEADS_FORMAT = "gapkit-heads"
HEADS_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads.json"

__all__ = ["Head", "Heads", "build_heads", "save_heads", "load_heads", "WEIGHTS_FILE", "CONFIG_FILE"]


class Head(nn.Module):
    """One modality's head: linear, or linear plus a zero-initialised residual MLP branch."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.kind = kind
        if kind == "mlp":
            h = int(hidden or max(in_dim, out_dim))
            self.mlp = nn.Sequential(nn.Linear(in_dim, h), nn.GELU(), nn.Linear(h, out_dim))
        elif kind != "linear":
            raise GapkitError(f"unknown head kind {kind!r}: use linear or mlp")

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        if self.kind == "mlp":
            out = out + self.mlp(x)
        return out


class Heads(nn.Module):
    """An image head and a text head into one shared space; ``config`` rebuilds them."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        kind, hidden = config.get("kind", "linear"), config.get("hidden")
        self.image_head = Head(int(config["image_dim"]), int(config["dim"]), kind, hidden)
        self.text_head = Head(int(config["text_dim"]), int(config["dim"]), kind, hidden)

    def _run(self, head: Head, t: Tensor | Any) -> Tensor:
        p = next(head.parameters())
        t = torch.as_tensor(t)
        return head(t.to(device=p.device, dtype=p.dtype))

    def project_images(self, t: Tensor | Any) -> Tensor:
        """Image embeddings (N, image_dim) -> (N, dim), not normalised."""
        return self._run(self.image_head, t)

    def project_texts(self, t: Tensor | Any) -> Tensor:
        """Text embeddings (N, text_dim) -> (N, dim), not normalised."""
        return self._run(self.text_head, t)

    def forward(self, images: Tensor, texts: Tensor) -> tuple[Tensor, Tensor]:
        return self.project_images(images), self.project_texts(texts)


def _init_linear(layer: nn.Linear, init: str, gen: torch.Generator) -> None:
    out_dim, in_dim = layer.weight.shape
    with torch.no_grad():
        if init == "identity":
            if in_dim == out_dim:
                layer.weight.copy_(torch.eye(out_dim))
            else:  # semi-orthogonal: QR of a seeded Gaussian matrix
                a = torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=gen)
                q, r = torch.linalg.qr(a)
                q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
                layer.weight.copy_(q if q.shape == (out_dim, in_dim) else q.T)
            layer.bias.zero_()
        elif init == "random":
            bound_w = (1.0 / in_dim) ** 0.5  # what nn.Linear's reset_parameters amounts to
            layer.weight.copy_(torch.empty(out_dim, in_dim).uniform_(-bound_w, bound_w, generator=gen))
            layer.bias.copy_(torch.empty(out_dim).uniform_(-bound_w, bound_w, generator=gen))
        else:
            raise GapkitError(f"unknown head init {init!r}: use identity or random")


def build_heads(
    image_dim: int,
    text_dim: int,
    dim: int | None = None,
    kind: str = "linear",
    init: str = "identity",
    seed: int = 0,
    hidden: int | None = None,
) -> Heads:
    """Make seeded heads image_dim -> dim and text_dim -> dim (``dim`` defaults to image_dim).

    See the module docstring for ``kind`` and ``init``. The same arguments give the same weights.
    """
    dim = int(dim or image_dim)
    if min(image_dim, text_dim, dim) <= 0:
        raise GapkitError(f"head dims must be positive (image {image_dim}, text {text_dim}, dim {dim})")
    if kind not in ("linear", "mlp"):
        raise GapkitError(f"unknown head kind {kind!r}: use linear or mlp")
    if init not in ("identity", "random"):
        raise GapkitError(f"unknown head init {init!r}: use identity or random")
    config: dict[str, Any] = {
        "format": HEADS_FORMAT,
        "format_version": HEADS_VERSION,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "dim": dim,
        "kind": kind,
        "init": init,
        "seed": int(seed),
    }
    if kind == "mlp":
        config["hidden"] = int(hidden or max(image_dim, text_dim, dim))
    heads = Heads(config)
    gen = torch.Generator().manual_seed(int(seed))
    for head in (heads.image_head, heads.text_head):
        _init_linear(head.linear, init, gen)
        if kind == "mlp":
            first, last = head.mlp[0], head.mlp[2]
            _init_linear(first, "random", gen)
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
    return heads




def save_heads(heads: Heads, run_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
    """Write RUN/heads.safetensors and RUN/heads.json (config plus ``extra``), each atomically."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().float() for k, v in heads.state_dict().items()}
    config = dict(heads.config)
    if extra:
        config.update(extra)
    atomic_write_bytes(run_dir / WEIGHTS_FILE, save(state, metadata={"format": HEADS_FORMAT}))
    atomic_write_bytes(run_dir / CONFIG_FILE, (json.dumps(config, indent=2, default=str) + "\n").encode())


def load_heads(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Heads:
    """Read heads saved by :func:`save_heads`; GapkitError for a missing, corrupt or pickled file.

    ``run_dir`` is the run folder (or its heads.safetensors / heads.json file).
    """
    from safetensors.torch import load as st_load

    p = Path(run_dir)
    if p.is_file() and p.name in (WEIGHTS_FILE, CONFIG_FILE):
        p = p.parent
    if not p.exists():
        raise GapkitError("no such heads folder", path=p)
    cfg_path, w_path = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_path.is_file():
        hint = ""
        if any(p.glob("*.pt")) or any(p.glob("*.pth")) or any(p.glob("*.bin")):
            hint = " (found torch pickle files, which gapkit does not load; save heads with gapkit)"
        raise GapkitError(f"not a heads folder: {CONFIG_FILE} is missing{hint}", path=p)
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GapkitError(f"unreadable heads config ({err})", path=cfg_path) from err
    if not isinstance(config, dict) or config.get("format") != HEADS_FORMAT:
        raise GapkitError(f"not a {HEADS_FORMAT} config", path=cfg_path)
    if int(config.get("format_version", 0)) > HEADS_VERSION:
        raise GapkitError("heads format is newer than this gapkit reads; upgrade gapkit", path=cfg_path)
    missing = [k for k in ("image_dim", "text_dim", "dim") if k not in config]
    if missing:
        raise GapkitError(f"heads config lacks {', '.join(missing)}", path=cfg_path)
    if not w_path.is_file():
        raise GapkitError(f"{WEIGHTS_FILE} is missing", path=p)
    raw = w_path.read_bytes()
    try:
        state = st_load(raw)
    except Exception as err:  # safetensors raises its own error types
        if raw[:4] == b"PK\x03\x04" or (raw[:1] == b"\x80" and raw[-1:] == b"."):
            raise GapkitError(
                "is a pickle/torch file, not safetensors; gapkit does not unpickle", path=w_path
            ) from err
        raise GapkitError(f"not a readable safetensors file ({err})", path=w_path) from err
    try:
        heads = Heads(config)
        heads.load_state_dict(state, strict=True)
    except GapkitError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GapkitError(f"weights do not match {CONFIG_FILE} ({msg})", path=w_path) from err
    return heads.to(device).eval()
