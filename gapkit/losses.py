"""Training objectives that close the modality gap, as torch functions.

Every function takes raw batch embeddings ``x`` (images, B x D) and ``y`` (texts, B x D), row i
of each being a true pair, and L2-normalises them inside. Notation: x̂_i = x_i / ‖x_i‖, likewise ŷ_i.

* :func:`clip_loss` -- symmetric InfoNCE of CLIP (Radford et al. 2021).
* :func:`atp_loss` -- Align True Pairs (Grassucci, Cicchetti, Comminiello, "Closing the gap in
  multimodal medical representation alignment"; code: github.com/ispamm/ModGap).
* :func:`cu_loss` -- Centroid Uniformity (same source).
* :func:`alignment_loss`, :func:`uniformity_loss` -- Wang & Isola 2020, used by Fahim et al. 2024
  ("It's not a modality gap: characterizing and addressing the contrastive gap") as
  clip + alignment + ½(uniformity(x) + uniformity(y)).
* :class:`GapLoss` -- a named sum of these (``"clip+atp+cu"``, ``"clip"``, ``"clip+align+unif"``),
  with weights, the authors' schedules, a fixed or learnable temperature, and feature gathering
  across torch.distributed ranks.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import GapkitError

__all__ = [
    "clip_loss",
    "atp_loss",
    "cu_loss",
    "alignment_loss",
    "uniformity_loss",
    "gather_features",
    "alpha_schedule",
    "beta_schedule",
    "GapLoss",
    "LOSS_NAMES",
    "parse_loss",
]

#: open_clip's initial logit scale is log(1/0.07); the scale exp(·) is clamped at 100
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def _norm(t: Tensor) -> Tensor:
    return F.normalize(t, dim=-1)


def clip_loss(x: Tensor, y: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric contrastive loss.

    L_clip = ½ [CE(s·X̂Ŷᵀ, I) + CE(s·ŶX̂ᵀ, I)], where CE(L, I) = −(1/B) Σ_i log softmax(L_i)_i is the
    cross-entropy of each row of the logits L against its true pair (the diagonal), and
    s = 1/τ is the logit scale (inverse temperature). Source: Radford et al. 2021 (CLIP), as in
    open_clip's ``ClipLoss``.
    """
    return _clip_unit(_norm(x), _norm(y), logit_scale)


def _clip_unit(xn: Tensor, yn: Tensor, logit_scale: Tensor | float) -> Tensor:
    logits = logit_scale * (xn @ yn.T)
    target = torch.arange(xn.shape[0], device=xn.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def atp_loss(x: Tensor, y: Tensor) -> Tensor:
    """Align True Pairs: L_ATP = (1/B) Σ_i ‖x̂_i − ŷ_i‖² (= 2 − 2·mean_i ⟨x̂_i, ŷ_i⟩).

    Source: Grassucci, Cicchetti, Comminiello, "Closing the gap in multimodal medical
    representation alignment" (code: github.com/ispamm/ModGap).
    """
    return _atp_unit(_norm(x), _norm(y))


def _atp_unit(xn: Tensor, yn: Tensor) -> Tensor:
    return (xn - yn).pow(2).sum(dim=1).mean()


class _LogMeanOffdiagKernel(torch.autograd.Function):
    """f(z) = log( mean_{i≠j} exp(−t‖z_i − z_j‖²) ) for unit rows z, exploiting symmetry.

    On the sphere ‖z_i − z_j‖² = 2 − 2⟨z_i, z_j⟩, so with K_ij = exp(2t(⟨z_i, z_j⟩ − 1)) (in
    [e^{−4t}, 1]: no overflow) and K_ii := 0, f = log(ΣK / (B(B−1))). K is symmetric: the forward
    pass computes only the blocks on and above the diagonal (rows cut into up to 4 blocks:
    10/16 of the products of zzᵀ), and ∂f/∂z = (4t/ΣK)·K z takes one pass over the blocks,
    where autograd would compute zzᵀ whole and then two matmuls.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, t: float) -> Tensor:  # type: ignore[override]
        b = z.shape[0]
        n_blocks = max(1, min(4, b // 256))
        bounds = [round(i * b / n_blocks) for i in range(n_blocks + 1)]
        spans = list(zip(bounds[:-1], bounds[1:]))
        acc = torch.float64 if z.dtype in (torch.float32, torch.float64) else torch.float32
        total = torch.zeros((), dtype=acc, device=z.device)
        blocks = []
        shift = torch.full((), -2.0 * t, dtype=z.dtype, device=z.device)
        for i, (s0, e0) in enumerate(spans):
            for j in range(i, len(spans)):
                s1, e1 = spans[j]
                # 2t(⟨z_i, z_j⟩ − 1) in one gemm call, then exp in place
                k = torch.addmm(shift, z[s0:e0], z[s1:e1].T, alpha=2.0 * t).exp_()
                if i == j:
                    k.fill_diagonal_(0.0)
                total = total + (1.0 if i == j else 2.0) * k.sum(dtype=acc)
                blocks.append((i, j, k))
        ctx.save_for_backward(z, *[k for _, _, k in blocks])
        ctx.index = [(i, j) for i, j, _ in blocks]
        ctx.spans = spans
        ctx.t = t
        ctx.total = total
        return (torch.log(total) - math.log(b * (b - 1))).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        z, *ks = ctx.saved_tensors
        out = torch.zeros_like(z)
        spans = ctx.spans
        for (i, j), k in zip(ctx.index, ks):
            (s0, e0), (s1, e1) = spans[i], spans[j]
            out[s0:e0].addmm_(k, z[s1:e1])  # accumulate inside the gemm
            if i != j:
                out[s1:e1].addmm_(k.T, z[s0:e0])
        scale = (grad.to(ctx.total.dtype) * 4.0 * ctx.t / ctx.total).to(z.dtype)
        return out * scale, None


def _log_mean_offdiag_gauss(z: Tensor, t: float = 2.0) -> Tensor:
    """log( mean_{i≠j} exp(−t‖z_i − z_j‖²) ) for unit rows z, without an i=j term.

    The mean over i≠j equals the mean over i<j because the kernel is symmetric.
    """
    if z.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 rows in a batch")
    return _LogMeanOffdiagKernel.apply(z, float(t))


def cu_loss(x: Tensor, y: Tensor) -> Tensor:
    """Centroid Uniformity: L_CU = log( (2/(B(B−1))) Σ_{i<j} exp(−2‖μ_i − μ_j‖²) ).

    μ_i = normalise((x̂_i + ŷ_i)/2) is the unit centroid of pair i. Minimising it spreads the pair
    centroids uniformly on the sphere (Wang & Isola's uniformity with t = 2, applied to the
    centroids). Source: Grassucci, Cicchetti, Comminiello (code: github.com/ispamm/ModGap).
    """
    return _cu_unit(_norm(x), _norm(y))


def _cu_unit(xn: Tensor, yn: Tensor) -> Tensor:
    return _log_mean_offdiag_gauss(_norm(xn + yn), 2.0)  # normalise((x̂+ŷ)/2) = normalise(x̂+ŷ)


def alignment_loss(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """Wang & Isola's alignment: L_align = (1/B) Σ_i ‖x̂_i − ŷ_i‖^α (α = 2: the same value as ATP).

    Source: Wang & Isola 2020, "Understanding contrastive representation learning through
    alignment and uniformity on the hypersphere"; used by Fahim et al. 2024.
    """
    xn, yn = _norm(x), _norm(y)
    d = (xn - yn).norm(dim=1)
    return d.pow(alpha).mean() if alpha != 2.0 else (xn - yn).pow(2).sum(dim=1).mean()


def uniformity_loss(x: Tensor, t: float = 2.0) -> Tensor:
    """Wang & Isola's uniformity: L_unif(x) = log( mean_{i≠j} exp(−t‖x̂_i − x̂_j‖²) ), t = 2.

    Source: Wang & Isola 2020; Fahim et al. 2024 add ½(L_unif(x) + L_unif(y)) to CLIP's loss.
    """
    return _log_mean_offdiag_gauss(_norm(x), t)


# --------------------------------------------------------------------------------------------
# across processes
# --------------------------------------------------------------------------------------------


def gather_features(x: Tensor) -> Tensor:
    """Concatenate ``x`` of all torch.distributed ranks (rank order), gradient through the local part.

    As open_clip's ``ClipLoss`` (``gather_with_grad=False``): the other ranks' rows are constants
    and this rank's rows are the local tensor itself, so the gradient of a loss on the gathered
    batch with respect to the local rows is exact. (When DDP then averages parameter gradients
    over W ranks, they are 1/W of the one-process gradient of the same global loss: scale the
    loss or the learning rate by W if that matters.) Identity when not distributed. All ranks
    must pass the same number of rows.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------


def alpha_schedule(progress: float) -> float:
    """Weight factor of ATP: 1 until 50 % of training, then linear to 2 at the end (ModGap code)."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 if p <= 0.5 else 1.0 + (p - 0.5) / 0.5


def beta_schedule(progress: float) -> float:
    """Weight factor of CU: 1 until 20 % of training, then linear to 0 at 70 % (ModGap code)."""
    p = min(max(float(progress), 0.0), 1.0)
    if p <= 0.2:
        return 1.0
    if p >= 0.7:
        return 0.0
    return 1.0 - (p - 0.2) / 0.5


# --------------------------------------------------------------------------------------------
# the combined loss
# --------------------------------------------------------------------------------------------

#: term name -> (function of x, y, logit scale), and the aliases accepted in loss specs
#: (the functions take unit rows: GapLoss normalises once)
_TERMS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "clip": _clip_unit,
    "atp": lambda x, y, s: _atp_unit(x, y),
    "cu": lambda x, y, s: _cu_unit(x, y),
    "align": lambda x, y, s: _atp_unit(x, y),  # Wang & Isola's alignment with α = 2
    "unif": lambda x, y, s: 0.5 * (_log_mean_offdiag_gauss(x, 2.0) + _log_mean_offdiag_gauss(y, 2.0)),
}
_ALIASES = {
    "alignment": "align",
    "uniformity": "unif",
    "uniform": "unif",
    "fahim": "clip+align+unif",
    "clip+atp+cu": "clip+atp+cu",
}
#: the named objectives (anything made of the terms above, joined with '+', is accepted)
LOSS_NAMES = ("clip", "clip+atp+cu", "clip+atp", "clip+cu", "clip+align+unif")


def parse_loss(spec: str) -> list[str]:
    """Terms of a loss spec such as ``"clip+atp+cu"`` or ``"fahim"``; GapkitError when unknown."""
    s = spec.strip().lower().replace(" ", "")
    s = _ALIASES.get(s, s)
    terms = [_ALIASES.get(t, t) for t in s.split("+") if t]
    if not terms:
        raise GapkitError(f"empty loss spec {spec!r}")
    bad = [t for t in terms if t not in _TERMS]
    if bad:
        raise GapkitError(
            f"unknown loss term {bad[0]!r} in {spec!r}; terms are {', '.join(_TERMS)} "
            f"(e.g. {', '.join(LOSS_NAMES)})"
        )
    if len(set(terms)) != len(terms):
        raise GapkitError(f"loss term repeated in {spec!r}")
    return terms


class GapLoss(torch.nn.Module):
    """total = Σ_k w_k·f_k(t)·L_k(x, y) over the terms of ``spec``.

    For ``"clip+atp+cu"``: L = L_clip + λ_atp·α(t)·L_ATP + λ_cu·β(t)·L_CU, with α, β = 1 unless
    ``schedule`` (then :func:`alpha_schedule`, :func:`beta_schedule` of the training progress t).
    For ``"clip+align+unif"`` (Fahim et al. 2024): L_clip + λ_align·L_align + λ_unif·½(L_unif(x) +
    L_unif(y)), weights 1 by default.

    Temperature: fixed (logit scale s = 1/τ) or learnable as in open_clip (a parameter
    ``logit_scale`` = log s initialised at log(1/τ), s = exp(logit_scale) clamped at 100). With
    ``gather=True`` the features of all torch.distributed ranks are concatenated first
    (:func:`gather_features`), so clip and cu see the global batch.

    ``forward(x, y, progress)`` returns (total, terms): the total loss and a dict of floats with
    each unweighted term, keyed by name (``clip``, ``atp``, ``cu``, ``align``, ``unif``).
    """

    def __init__(
        self,
        spec: str = "clip+atp+cu",
        *,
        atp_weight: float = 1.0,
        cu_weight: float = 1.0,
        align_weight: float = 1.0,
        unif_weight: float = 1.0,
        schedule: bool = False,
        temperature: float = INIT_TEMPERATURE,
        learn_temperature: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise GapkitError(f"temperature must be > 0, not {temperature}")
        self.spec = spec
        self.terms = parse_loss(spec)
        self.weights = {"clip": 1.0, "atp": float(atp_weight), "cu": float(cu_weight),
                        "align": float(align_weight), "unif": float(unif_weight)}
        self.schedule = bool(schedule)
        self.learn_temperature = bool(learn_temperature)
        self.gather = bool(gather)
        init = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if self.learn_temperature:
            self.logit_scale = torch.nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    @property
    def name(self) -> str:
        return "+".join(self.terms)

    def scale(self) -> Tensor:
        """s = exp(logit_scale), clamped at 100 (open_clip)."""
        return torch.clamp(self.logit_scale, max=math.log(MAX_LOGIT_SCALE)).exp()

    @property
    def temperature(self) -> float:
        """Current τ = 1/s."""
        return float(1.0 / self.scale().detach())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the learnable logit scale in place (open_clip does this after each step)."""
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def factors(self, progress: float) -> dict[str, float]:
        """The weight of each term at training progress t in [0, 1] (weights × schedules)."""
        out = {}
        for t in self.terms:
            w = self.weights[t]
            if self.schedule and t == "atp":
                w *= alpha_schedule(progress)
            elif self.schedule and t == "cu":
                w *= beta_schedule(progress)
            out[t] = w
        return out

    def forward(self, x: Tensor, y: Tensor, progress: float = 0.0) -> tuple[Tensor, dict[str, float]]:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} image rows but {y.shape[0]} text rows")
        if self.gather:
            x, y = gather_features(x), gather_features(y)
        s = self.scale()
        x, y = _norm(x), _norm(y)
        total = x.new_zeros(())
        parts: dict[str, float] = {}
        for t, w in self.factors(progress).items():
            val = _TERMS[t](x, y, s)
            parts[t] = float(val.detach())
            if w != 0.0:
                total = total + w * val
        return total, parts
