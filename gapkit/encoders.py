"""Model specs -> an image encoder and a text encoder behind one interface.

Spellings (``--model`` for a dual encoder, ``--image-model`` / ``--text-model`` for towers):

open_clip
    ``NAME:TAG``            a built-in architecture with a pretrained tag (``ViT-B-32:laion2b_s34b_b79k``)
    ``NAME:FILE``           the architecture with a local checkpoint (``ViT-B-32:/ckpt.safetensors``)
    ``NAME:random``         random initialisation (seeded, so every process gets the same weights)
    ``hf-hub:ORG/NAME``     an open_clip model on the Hugging Face Hub
    ``local-dir:PATH``      a folder with ``open_clip_config.json`` and its weights
    ``CONFIG.json[:X]``     an open_clip model-config file (registered with ``add_model_config``);
                            ``X`` is ``random`` (the default), a tag or a checkpoint file

transformers
    ``ORG/NAME`` or a folder with ``config.json``. A model with ``get_image_features`` and
    ``get_text_features`` (CLIPModel, SiglipModel, ...) is a dual encoder and can serve as
    ``--model`` or as one tower; any other vision model is an image tower (pooler output, CLS or
    mean of the last hidden state), any other text model a text tower (CLS, attention-masked
    mean, or pooler output). A folder with only ``config.json`` (no weights) is a randomly
    initialised model (seeded; a note says so); its tokenizer must still be found (in the folder
    or with ``tokenizer=``).

Nothing here downloads silently when offline: a spec that needs the network fails with a
GapkitError that says so.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .datasets import to_rgb  # the one conversion of image modes, shared with the readers
from .errors import GapkitError
from .progress import Reporter, ensure

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "merges.txt")
_IMAGE_POOLINGS = ("auto", "pooler", "cls", "mean")
_TEXT_POOLINGS = ("auto", "cls", "mean", "pooler")


# --------------------------------------------------------------------------------------------
# devices and images
# --------------------------------------------------------------------------------------------


def pick_device(name: str | None = None) -> torch.device:
    """``name`` as a torch device, or by default cuda, then mps, then cpu."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as err:
            raise GapkitError(f"unknown device {name!r} (cpu, cuda, cuda:1, mps)") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise GapkitError(f"device {name!r} asked for, but CUDA is not available here")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise GapkitError(f"device {name!r} asked for, but MPS is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class RGBTransform:
    """``transform(to_rgb(image))``: a picklable wrapper used as ``Encoders.image_transform``."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(img))


class HFImageTransform:
    """A transformers image processor applied to one image: ``(C, H, W)`` float tensor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]


def _config_transform(image_size: Any) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T

    size = image_size if isinstance(image_size, int) else tuple(image_size)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------------


class _Part(torch.nn.Module):
    """One tower of a dual model: owns some of the model's submodules and direct parameters, and
    calls ``fn(model, x)`` on the whole model (kept unregistered, so the other tower's weights
    are not in this module's state dict)."""

    def __init__(self, model: torch.nn.Module, names: set[str], fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_fn", fn)
        for name, child in model.named_children():
            if name in names:
                self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            if name in names:
                self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            if name in names:
                self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)

    def _apply(self, fn: Any, recurse: bool = True) -> "_Part":  # keep the model's buffers in step
        super()._apply(fn, recurse)
        for name, b in self._buffers.items():
            self._model._buffers[name] = b
        return self

    def forward(self, x: Any) -> torch.Tensor:
        return self._fn(self._model, x)


def _split_names(model: torch.nn.Module, image_prefixes: tuple[str, ...], skip: tuple[str, ...]) -> tuple[set[str], set[str]]:
    names = [n for n, _ in model.named_children()]
    names += [n for n, _ in model.named_parameters(recurse=False)]
    names += [n for n, _ in model.named_buffers(recurse=False)]
    image = {n for n in names if n.startswith(image_prefixes)}
    text = {n for n in names if n not in image and n not in skip}
    return image, text


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[1] if len(out) > 1 else out[0]
    return pooled


def _accepted(fn: Callable[..., Any], tokens: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in tokens.items() if k in params}


def _oc_image(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model.encode_image(pixels)


def _oc_text(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    return model.encode_text(tokens)


def _hf_image(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return _features(model.get_image_features(pixel_values=pixels))


def _hf_text(model: Any, tokens: dict[str, Any]) -> torch.Tensor:
    return _features(model.get_text_features(**_accepted(model.get_text_features, tokens)))


class HFVisionTower(torch.nn.Module):
    """A transformers vision model, pooled: ``pooler`` (pooler_output), ``cls`` (first token of
    the last hidden state) or ``mean`` (mean of all tokens of the last hidden state)."""

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        h = out.last_hidden_state
        if h.dim() == 4:  # convolutional backbones: (B, C, H, W)
            return h.mean(dim=(2, 3)) if self.pooling == "mean" else h.flatten(2)[:, :, 0]
        return h[:, 0] if self.pooling == "cls" else h.mean(dim=1)


class HFTextTower(torch.nn.Module):
    """A transformers text model, pooled: ``cls`` (first token), ``mean`` (mean of the last hidden
    state over the tokens the attention mask keeps) or ``pooler`` (pooler_output)."""

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**_accepted(self.model.forward, tokens))
        if self.pooling == "pooler":
            return out.pooler_output
        h = out.last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


class HFTokenize:
    """A transformers tokenizer: padded, truncated to ``max_length``, as a dict of tensors."""

    def __init__(self, tokenizer: Any, max_length: int, padding: str | bool = True) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.padding = padding

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(enc)


class OpenClipTokenize:
    """An open_clip tokenizer (truncates to the model's context length)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------


class Encoders:
    """An image encoder and a text encoder with one interface.

    ``image_tower`` / ``text_tower`` are trainable modules; ``encode_image`` / ``encode_text``
    run them (under whatever grad mode the caller chose) and return ``(B, d)`` tensors, not
    normalised. ``image_transform`` is the model's own preprocessing of one PIL image;
    ``tokenize`` the model's tokenizer, truncating to its context length.
    """

    def __init__(
        self,
        image_tower: torch.nn.Module,
        text_tower: torch.nn.Module,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], Any],
        info: dict[str, Any],
        models: list[torch.nn.Module],
        device: torch.device | None = None,
    ) -> None:
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_transform = image_transform
        self._tokenizer = tokenizer
        self.info = info
        self._models = models
        self.device = torch.device("cpu")
        self._dims: tuple[int, int] | None = None
        self.image_tower.eval()
        self.text_tower.eval()
        if device is not None:
            self.to(device)

    # -- encoding ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Any:
        """Token ids for ``texts`` (a tensor for open_clip, a dict of tensors for transformers)."""
        return self._tokenizer(list(texts))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, d_image) features of preprocessed pixels."""
        return self.image_tower(pixels.to(self.device, non_blocking=True))

    def encode_text(self, tokens: Any) -> torch.Tensor:
        """(B, d_text) features of tokenized texts."""
        if isinstance(tokens, dict):
            tokens = {k: v.to(self.device, non_blocking=True) for k, v in tokens.items()}
        else:
            tokens = tokens.to(self.device, non_blocking=True)
        return self.text_tower(tokens)

    # -- description ---------------------------------------------------------------------
    def _probe(self) -> tuple[int, int]:
        if self._dims is None:
            img = self.image_transform(Image.new("RGB", (64, 64), (128, 128, 128))).unsqueeze(0)
            with torch.inference_mode():
                d_im = int(self.encode_image(img).shape[-1])
                d_tx = int(self.encode_text(self.tokenize(["a"])).shape[-1])
            self._dims = (d_im, d_tx)
        return self._dims

    @property
    def image_dim(self) -> int:
        return self._probe()[0]

    @property
    def text_dim(self) -> int:
        return self._probe()[1]

    def spec(self) -> dict[str, Any]:
        """JSON-able description: the specs, poolings, preprocessing and dims."""
        out = json.loads(json.dumps(self.info, default=str))
        out["image_dim"] = self.image_dim
        out["text_dim"] = self.text_dim
        return out

    # -- weights and devices -------------------------------------------------------------
    def to(self, device: str | torch.device) -> "Encoders":
        """Move both towers (and the models they belong to) to ``device``."""
        device = torch.device(device)
        for m in self._models:
            m.to(device)
        self.image_tower.to(device)
        self.text_tower.to(device)
        self.device = device
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The towers' weights, keys prefixed ``image_tower.`` and ``text_tower.``."""
        sd = {f"image_tower.{k}": v for k, v in self.image_tower.state_dict().items()}
        sd.update({f"text_tower.{k}": v for k, v in self.text_tower.state_dict().items()})
        return sd

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights saved by :meth:`state_dict` (e.g. ``RUN/encoders.safetensors``)."""
        parts: dict[str, dict[str, torch.Tensor]] = {"image_tower": {}, "text_tower": {}}
        unknown = []
        for k, v in state.items():
            head, _, rest = k.partition(".")
            if head in parts:
                parts[head][rest] = v
            else:
                unknown.append(k)
        if strict and unknown:
            raise GapkitError(f"weights for unknown modules: {', '.join(unknown[:5])}")
        try:
            self.image_tower.load_state_dict(parts["image_tower"], strict=strict)
            self.text_tower.load_state_dict(parts["text_tower"], strict=strict)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise GapkitError(f"weights do not fit these encoders: {first}") from err
        self._dims = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.image_tower.parameters()) + list(self.text_tower.parameters())


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


class _Side(dict):
    """What one spec provides: towers, transform, tokenizer, description."""


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return " (HF_HUB_OFFLINE is set: only local files and the local cache are used)"
    return ""


def _seeded() -> Any:
    """A context in which random initialisation is the same in every process."""
    ctx = torch.random.fork_rng(devices=[])
    ctx.__enter__()
    torch.manual_seed(RANDOM_SEED)
    return ctx


def _is_open_clip_config(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GapkitError(f"unreadable model config ({err})", path=path) from err
    return isinstance(cfg, dict) and "vision_cfg" in cfg and "text_cfg" in cfg


def _open_clip_parse(spec: str) -> tuple[str, str | None, str] | None:
    """(open_clip model name, pretrained, kind) or None when ``spec`` is not an open_clip spec."""
    import open_clip

    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None, spec.split(":", 1)[0]
    # CONFIG.json[:X]
    head, sep, tail = spec.rpartition(":") if ".json:" in spec else (spec, "", "")
    if not sep:
        head, tail = spec, ""
    if head.lower().endswith(".json"):
        path = Path(head)
        if not path.is_file():
            raise GapkitError("no such open_clip model-config file", path=path)
        if not _is_open_clip_config(path):
            raise GapkitError("not an open_clip model config (needs vision_cfg and text_cfg)", path=path)
        open_clip.add_model_config(path)
        return path.stem, (tail or "random"), "config-json"
    if Path(spec).is_dir():
        if (Path(spec) / "open_clip_config.json").is_file():
            return f"local-dir:{spec}", None, "local-dir"
        return None
    name, sep, pretrained = spec.partition(":")
    if name in open_clip.list_models() or name.replace("/", "-") in open_clip.list_models():
        if not sep or not pretrained:
            tags = [t for n, t in open_clip.list_pretrained() if n == name]
            hint = f" (tags: {', '.join(tags[:6])})" if tags else ""
            raise GapkitError(
                f"open_clip model {name!r} needs weights: {name}:TAG{hint}, {name}:/path/ckpt, "
                f"or {name}:random for random initialisation"
            )
        return name, pretrained, "builtin"
    if sep and not Path(spec).exists() and "/" not in name:
        raise GapkitError(
            f"unknown model {name!r}: not an open_clip architecture (see open_clip.list_models()), "
            "not a folder, not a Hugging Face id"
        )
    return None


def _load_open_clip(spec: str, name: str, pretrained: str | None, kind: str, reporter: Reporter) -> _Side:
    import open_clip

    random_init = pretrained == "random"
    kwargs: dict[str, Any] = {"pretrained_text": False}
    if not random_init and pretrained is not None:
        if Path(pretrained).suffix and not Path(pretrained).is_file() and (
            "/" in pretrained or os.sep in pretrained or Path(pretrained).suffix in (".safetensors", ".pt", ".bin", ".pth")
        ):
            raise GapkitError("no such checkpoint file", path=pretrained)
        kwargs["pretrained"] = pretrained
    ctx = _seeded()
    prev_disable = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # open_clip logs on the root logger; failures become GapkitError
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except GapkitError:
        raise
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GapkitError(f"cannot load open_clip model {spec!r}: {msg}{_offline_hint()}") from err
    finally:
        logging.disable(prev_disable)
        ctx.__exit__(None, None, None)
    if random_init:
        reporter.note(f"{spec}: random weights (open_clip {name}, seed {RANDOM_SEED})")
    model.eval()
    image_names, text_names = _split_names(model, ("visual",), ("logit_scale", "logit_bias"))
    return _Side(
        library="open_clip",
        spec=spec,
        image_tower=_Part(model, image_names, _oc_image),
        text_tower=_Part(model, text_names, _oc_text),
        image_transform=RGBTransform(preprocess),
        tokenizer=OpenClipTokenize(tokenizer),
        model=model,
        image_info={"preprocessing": "open_clip preprocess", "pooling": "model"},
        text_info={"pooling": "model", "context_length": getattr(tokenizer, "context_length", None)},
        random=random_init,
    )


def _st_pooling(path: Path) -> str | None:
    """The pooling of a sentence-transformers folder (``1_Pooling/config.json``), if any."""
    cfg_path = path / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _load_hf(
    spec: str, need: str, image_pooling: str, text_pooling: str, tokenizer: str | None, reporter: Reporter
) -> _Side:
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # library code does not print
    local = Path(spec)
    is_dir = local.is_dir()
    if not is_dir and (spec.startswith((".", "/", "~")) or local.suffix.lower() in (".json", ".safetensors", ".bin", ".pt")
                       or spec.count("/") > 1):
        raise GapkitError(
            "not a model: no such folder, and not an open_clip spec (NAME:TAG) or a Hugging Face "
            "id (ORG/NAME)",
            path=spec,
        )
    if is_dir and not (local / "config.json").is_file():
        raise GapkitError("folder has no config.json (nor open_clip_config.json): not a model folder", path=local)
    try:
        config = AutoConfig.from_pretrained(spec)
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GapkitError(f"cannot load the model config of {spec!r} (no such local folder; tried it as a "
                          f"Hugging Face id): {msg}{_offline_hint()}") from err
    random_init = is_dir and not any((local / f).is_file() for f in _WEIGHT_FILES)
    missing: list[str] = []
    ctx = _seeded()
    try:
        if random_init:
            model = AutoModel.from_config(config)
            reporter.note(f"{spec}: no weights in the folder, random weights from its config.json (seed {RANDOM_SEED})")
        else:
            model, loading = AutoModel.from_pretrained(spec, dtype=torch.float32, output_loading_info=True)
            missing = list(loading.get("missing_keys", []))
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GapkitError(f"cannot load transformers model {spec!r}: {msg}{_offline_hint()}") from err
    finally:
        ctx.__exit__(None, None, None)
    model.eval()
    model.float()
    dual = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
    side = _Side(library="transformers", spec=spec, model=model, random=random_init, image_info={}, text_info={},
                 architecture=type(model).__name__)
    if need == "both" and not dual:
        raise GapkitError(
            f"{spec} ({type(model).__name__}) is not a dual image-text encoder (no get_image_features/"
            "get_text_features); use --image-model and --text-model for separate towers"
        )
    vision_cfg = getattr(config, "vision_config", None) or config
    text_cfg = getattr(config, "text_config", None) or config
    if need in ("both", "image"):
        if dual:
            image_names, _ = _split_names(model, ("vision", "visual", "image"), ())
            side["image_tower"] = _Part(model, image_names, _hf_image)
            side["image_info"]["pooling"] = "model"
        else:
            pooling = image_pooling
            if pooling == "auto":
                has_pooler = any(n.startswith("pooler") for n, _ in model.named_children())
                pooler_loaded = has_pooler and not any(k.startswith("pooler") for k in missing)
                pooling = "pooler" if pooler_loaded or (has_pooler and random_init) else "cls"
            side["image_tower"] = HFVisionTower(model, pooling)
            side["image_info"]["pooling"] = pooling
        side["image_transform"], side["image_info"]["preprocessing"] = _hf_transform(spec, local, is_dir, vision_cfg)
    if need in ("both", "text"):
        if dual:
            _, text_names = _split_names(model, ("vision", "visual", "image"), ("logit_scale", "logit_bias"))
            side["text_tower"] = _Part(model, text_names, _hf_text)
            side["text_info"]["pooling"] = "model"
        else:
            pooling = text_pooling
            if pooling == "auto":
                pooling = (_st_pooling(local) if is_dir else None) or "cls"
            side["text_tower"] = HFTextTower(model, pooling)
            side["text_info"]["pooling"] = pooling
        tok_tokenizer, max_len = _hf_tokenizer(spec, local, is_dir, text_cfg, tokenizer)
        # SigLIP models were trained (and are documented to be used) with max_length padding
        padding: str | bool = "max_length" if "siglip" in str(getattr(config, "model_type", "")) else True
        side["tokenizer"] = HFTokenize(tok_tokenizer, max_len, padding)
        side["text_info"]["max_length"] = max_len
        if tokenizer:
            side["text_info"]["tokenizer"] = tokenizer
    return side


def _hf_transform(spec: str, local: Path, is_dir: bool, vision_cfg: Any) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    from transformers import AutoImageProcessor

    if not is_dir or (local / "preprocessor_config.json").is_file():
        try:
            proc = AutoImageProcessor.from_pretrained(spec)
            return RGBTransform(HFImageTransform(proc)), f"AutoImageProcessor ({type(proc).__name__})"
        except Exception:
            if is_dir:
                raise GapkitError("unreadable preprocessor_config.json", path=local / "preprocessor_config.json")
    size = getattr(vision_cfg, "image_size", None)
    if size is None:
        raise GapkitError(
            f"{spec}: no image processor (preprocessor_config.json) and no image_size in its config; "
            "cannot tell how to preprocess images"
        )
    return RGBTransform(_config_transform(size)), f"config image_size={size}, ImageNet mean/std"


def _hf_tokenizer(spec: str, local: Path, is_dir: bool, text_cfg: Any, tokenizer: str | None) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    source = tokenizer or spec
    where = "the tokenizer folder" if tokenizer else "the model folder"
    src = Path(source)
    if src.is_dir() and not any(src.glob(g) for g in _TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer (every word unknown) from config.json alone
        raise GapkitError(f"no tokenizer files in {where} (tokenizer.json, vocab.txt, ...); pass one with --tokenizer",
                          path=source)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GapkitError(
            f"no usable tokenizer in {where} ({msg}){_offline_hint()}; pass one with --tokenizer", path=source
        ) from err
    if len(tok) < 100:
        raise GapkitError(f"the tokenizer in {where} has only {len(tok)} tokens; pass a real one with --tokenizer",
                          path=source)
    limits = [int(tok.model_max_length)] if 0 < int(min(tok.model_max_length, 1 << 30)) < (1 << 30) else []
    pos = getattr(text_cfg, "max_position_embeddings", None)
    if pos:
        # RoBERTa-style models reserve padding_idx + 1 positions
        limits.append(int(pos) - (int(getattr(text_cfg, "pad_token_id", 0) or 0) + 1 if "roberta" in str(getattr(text_cfg, "model_type", "")) else 0))
    st_cfg = local / "sentence_bert_config.json" if is_dir else None
    if st_cfg is not None and st_cfg.is_file():
        try:
            limits.append(int(json.loads(st_cfg.read_text())["max_seq_length"]))
        except (KeyError, ValueError, OSError, json.JSONDecodeError):
            pass
    return tok, min(limits) if limits else 512


def _load_side(spec: str, need: str, image_pooling: str, text_pooling: str, tokenizer: str | None,
               reporter: Reporter) -> _Side:
    spec = str(spec).strip()
    if not spec:
        raise GapkitError("empty model spec")
    local = Path(spec)
    if local.is_dir() and (local / "config.json").is_file() and not (local / "open_clip_config.json").is_file():
        return _load_hf(spec, need, image_pooling, text_pooling, tokenizer, reporter)  # no open_clip import
    parsed = _open_clip_parse(spec)
    if parsed is not None:
        if need == "image" and image_pooling not in ("auto",):
            raise GapkitError("--image-pooling applies to transformers vision models, not open_clip towers")
        if need == "text" and text_pooling not in ("auto",):
            raise GapkitError("--text-pooling applies to transformers text models, not open_clip towers")
        return _load_open_clip(spec, *parsed, reporter)
    return _load_hf(spec, need, image_pooling, text_pooling, tokenizer, reporter)


def load_encoders(
    model: str | None = None,
    *,
    image_model: str | None = None,
    text_model: str | None = None,
    image_pooling: str = "auto",
    text_pooling: str = "auto",
    device: str | None = None,
    tokenizer: str | None = None,
    reporter: Reporter | None = None,
) -> Encoders:
    """Build the encoders from a dual-encoder spec (``model``) or two tower specs.

    See the module docstring for the spellings. ``tokenizer`` (a folder or id) overrides the
    text model's own tokenizer (transformers only). Raises GapkitError on a bad spec, a missing
    file, or a download that is impossible (offline).
    """
    reporter = ensure(reporter)
    if image_pooling not in _IMAGE_POOLINGS:
        raise GapkitError(f"--image-pooling must be one of {', '.join(_IMAGE_POOLINGS)}, not {image_pooling!r}")
    if text_pooling not in _TEXT_POOLINGS:
        raise GapkitError(f"--text-pooling must be one of {', '.join(_TEXT_POOLINGS)}, not {text_pooling!r}")
    if model is not None and (image_model is not None or text_model is not None):
        raise GapkitError("give either --model (a dual encoder) or --image-model and --text-model, not both")
    if model is None and (image_model is None or text_model is None):
        raise GapkitError("need --model SPEC, or both --image-model SPEC and --text-model SPEC")
    dev = pick_device(device)
    if model is not None:
        side = _load_side(model, "both", image_pooling, text_pooling, tokenizer, reporter)
        im, tx = side, side
        info: dict[str, Any] = {"model": model, "image_model": None, "text_model": None}
        models = [side["model"]]
    else:
        im = _load_side(image_model, "image", image_pooling, text_pooling, None, reporter)  # type: ignore[arg-type]
        tx = _load_side(text_model, "text", image_pooling, text_pooling, tokenizer, reporter)  # type: ignore[arg-type]
        info = {"model": None, "image_model": image_model, "text_model": text_model}
        models = [im["model"], tx["model"]]
    info.update(
        {
            "image_library": im["library"],
            "text_library": tx["library"],
            "image_pooling": im["image_info"].get("pooling"),
            "text_pooling": tx["text_info"].get("pooling"),
            "image_preprocessing": im["image_info"].get("preprocessing"),
            "text_max_length": tx["text_info"].get("max_length") or tx["text_info"].get("context_length"),
            "random_weights": sorted({s["spec"] for s in (im, tx) if s.get("random")}),
        }
    )
    if tokenizer:
        info["tokenizer"] = tokenizer
    return Encoders(
        image_tower=im["image_tower"],
        text_tower=tx["text_tower"],
        image_transform=im["image_transform"],
        tokenizer=tx["tokenizer"],
        info=info,
        models=models,
        device=dev,
    )


def load_encoders_from_run(run_dir: str | os.PathLike[str], *, device: str | None = None,
                           reporter: Reporter | None = None) -> Encoders:
    """The encoders recorded in ``RUN/encoders.json`` with the weights of ``RUN/encoders.safetensors``
    (an end-to-end ``gapkit finetune`` run), loaded strictly."""
    run = Path(run_dir)
    cfg_path = run / "encoders.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError as err:
        raise GapkitError("no encoders.json: this run did not train encoders", path=run) from err
    except (OSError, json.JSONDecodeError) as err:
        raise GapkitError(f"unreadable encoders.json ({err})", path=cfg_path) from err
    enc = load_encoders(
        cfg.get("model"),
        image_model=cfg.get("image_model"),
        text_model=cfg.get("text_model"),
        image_pooling=cfg.get("image_pooling") or "auto",
        text_pooling=cfg.get("text_pooling") or "auto",
        tokenizer=cfg.get("tokenizer"),
        device="cpu",
        reporter=reporter,
    )
    weights = run / "encoders.safetensors"
    if not weights.is_file():
        raise GapkitError("encoders.json but no encoders.safetensors", path=run)
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as err:
        raise GapkitError(f"unreadable safetensors file ({err})", path=weights) from err
    try:
        enc.load_state_dict(state, strict=True)
    except GapkitError as err:
        raise GapkitError(err.message, path=weights) from err
    enc.info["weights"] = str(weights)
    return enc.to(pick_device(device))
