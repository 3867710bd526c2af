"""Encoders: every spec spelling gives the model's own encoding, preprocessing and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gapkit.encoders import Encoders, load_encoders, load_encoders_from_run, pick_device, to_rgb
from gapkit.errors import GapkitError
from gapkit.progress import Reporter
from tests.tiny_models import minilm_path, tiny_hf_bert, tiny_hf_clip, tiny_hf_vit, tiny_open_clip, tiny_open_clip_config

LONG_CAPTION = " ".join(["the left lower lobe shows a spiculated mass with pleural retraction"] * 20)  # 220 words


class Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("models")
    return {
        "oc": tiny_open_clip(tmp),
        "oc_json": str(tiny_open_clip_config(tmp)),
        "vit": tiny_hf_vit(tmp),
        "vit_noproc": tiny_hf_vit(tmp, with_processor=False),
        "bert": tiny_hf_bert(tmp),
        "bert_random": tiny_hf_bert(tmp, with_weights=False),
        "bert_notok": tiny_hf_bert(tmp, with_tokenizer=False, with_weights=False),
        "clip": tiny_hf_clip(tmp),
    }


@pytest.fixture(scope="module")
def images(medpix: Path) -> list[Image.Image]:
    rows = [json.loads(line) for line in (medpix / "dev" / "metadata.jsonl").read_text().splitlines()[:3]]
    return [Image.open(medpix / "dev" / r["file_name"]) for r in rows]


def _enc_images(enc: Encoders, imgs: list[Image.Image]) -> torch.Tensor:
    with torch.inference_mode():
        return enc.encode_image(torch.stack([enc.image_transform(im) for im in imgs]))


def test_open_clip_local_dir_equals_open_clip(models: dict[str, str], images: list[Image.Image]) -> None:
    import open_clip

    enc = load_encoders(models["oc"], device="cpu")
    model, _, preprocess = open_clip.create_model_and_transforms(models["oc"])
    tok = open_clip.get_tokenizer(models["oc"])
    model.eval()
    texts = ["axial CT of the chest", LONG_CAPTION]
    with torch.inference_mode():
        want_im = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in images]))
        want_tx = model.encode_text(tok(texts))
        got_tx = enc.encode_text(enc.tokenize(texts))
    torch.testing.assert_close(_enc_images(enc, images), want_im, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_tx, want_tx, atol=1e-5, rtol=1e-5)
    assert enc.tokenize([LONG_CAPTION]).shape == (1, 77)  # truncated to the context length
    assert (enc.image_dim, enc.text_dim) == (32, 32)
    spec = enc.spec()
    assert spec["model"] == models["oc"] and spec["image_dim"] == 32 and spec["random_weights"] == []
    # the towers hold disjoint weights: image_tower.visual.* and the text parts, no logit scale
    keys = enc.state_dict().keys()
    assert all(k.startswith("image_tower.visual.") for k in keys if k.startswith("image_tower."))
    assert "text_tower.token_embedding.weight" in keys and not any("logit_scale" in k for k in keys)


def test_random_spelling_is_seeded_and_noted(models: dict[str, str]) -> None:
    notes = Notes()
    a = load_encoders(f"{models['oc_json']}:random", device="cpu", reporter=notes)
    b = load_encoders(models["oc_json"], device="cpu")  # a config file alone means random too
    assert any("random weights" in n for n in notes.notes)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.spec()["random_weights"] == [f"{models['oc_json']}:random"]
    # and different from the checkpoint in the local-dir folder (seeded differently)
    c = load_encoders(models["oc"], device="cpu").state_dict()
    assert not torch.equal(c["image_tower.visual.conv1.weight"], sa["image_tower.visual.conv1.weight"])


def test_bad_and_offline_specs_fail_clearly(models: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(GapkitError, match=r"ViT-B-32:random"):
        load_encoders("ViT-B-32")  # no tag: says how to ask for weights
    with pytest.raises(GapkitError, match=r"cannot load open_clip model .*HF_HUB_OFFLINE"):
        load_encoders("ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(GapkitError, match=r"google/vit-base-patch16-224.*HF_HUB_OFFLINE"):
        load_encoders(image_model="google/vit-base-patch16-224", text_model=models["bert"])
    with pytest.raises(GapkitError, match=r"hf-hub:.*HF_HUB_OFFLINE"):
        load_encoders("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    with pytest.raises(GapkitError, match="no such checkpoint file"):
        load_encoders("ViT-B-32:/nowhere/ckpt.safetensors")
    with pytest.raises(GapkitError, match="no config.json"):
        load_encoders(image_model=str(tmp_path), text_model=models["bert"])
    with pytest.raises(GapkitError, match="not a dual image-text encoder"):
        load_encoders(models["bert"])
    with pytest.raises(GapkitError, match="either --model"):
        load_encoders(models["oc"], image_model=models["vit"])
    with pytest.raises(GapkitError, match="--image-pooling"):
        load_encoders(image_model=models["vit"], text_model=models["bert"], image_pooling="max")


def test_hf_towers_pooling_equals_manual(models: dict[str, str], images: list[Image.Image]) -> None:
    from transformers import AutoModel, AutoTokenizer, ViTImageProcessor

    vit = AutoModel.from_pretrained(models["vit"]).eval()
    bert = AutoModel.from_pretrained(models["bert"]).eval()
    proc = ViTImageProcessor.from_pretrained(models["vit"])
    tok = AutoTokenizer.from_pretrained(models["bert"])
    pixels = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    texts = ["short", "a much longer caption about the abdomen with contrast"]
    with torch.inference_mode():
        vout = vit(pixel_values=pixels)
        single = [bert(**tok([t], return_tensors="pt")).last_hidden_state[0] for t in texts]
    want_image = {"pooler": vout.pooler_output, "cls": vout.last_hidden_state[:, 0], "mean": vout.last_hidden_state.mean(1)}
    want_text = {"cls": torch.stack([h[0] for h in single]), "mean": torch.stack([h.mean(0) for h in single])}
    for ip, tp in (("pooler", "cls"), ("cls", "mean"), ("mean", "cls")):
        enc = load_encoders(image_model=models["vit"], text_model=models["bert"], image_pooling=ip, text_pooling=tp, device="cpu")
        torch.testing.assert_close(_enc_images(enc, images), want_image[ip], atol=1e-5, rtol=1e-4)
        with torch.inference_mode():  # padded batch == each text alone: the mean ignores padding
            got = enc.encode_text(enc.tokenize(texts))
        torch.testing.assert_close(got, want_text[tp], atol=1e-5, rtol=1e-4)
    enc = load_encoders(image_model=models["vit"], text_model=models["bert"], device="cpu")
    spec = enc.spec()
    assert (spec["image_pooling"], spec["text_pooling"]) == ("pooler", "cls")
    assert (spec["image_dim"], spec["text_dim"]) == (48, 40)  # dims may differ
    assert spec["image_preprocessing"].startswith("AutoImageProcessor")
    assert enc.tokenize([LONG_CAPTION])["input_ids"].shape[1] == 64  # BERT's 64 positions


def test_minilm_text_tower_mean_pooling(models: dict[str, str]) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    enc = load_encoders(image_model=models["vit"], text_model=path, device="cpu")
    assert enc.spec()["text_pooling"] == "mean" and enc.text_dim == 384
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = "Contrast enhanced chest CT shows diffuse increased interstitial markings."
    with torch.inference_mode():
        want = model(**tok([text], return_tensors="pt")).last_hidden_state[0].mean(0)
        got = enc.encode_text(enc.tokenize([text, LONG_CAPTION]))
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)
    # sentence-transformers' known behaviour: similar sentences are closer than unrelated ones
    with torch.inference_mode():
        e = torch.nn.functional.normalize(enc.encode_text(enc.tokenize(
            ["a CT scan of the chest", "chest computed tomography", "a recipe for apple pie"])), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
    assert enc.tokenize([LONG_CAPTION])["input_ids"].shape[1] == 256  # its max_seq_length


def test_config_only_folder_is_random_and_needs_a_tokenizer(models: dict[str, str]) -> None:
    notes = Notes()
    enc = load_encoders(image_model=models["vit_noproc"], text_model=models["bert_random"], device="cpu", reporter=notes)
    assert any("random weights" in n for n in notes.notes)
    assert models["bert_random"] in enc.spec()["random_weights"]
    assert enc.spec()["image_preprocessing"] == "config image_size=32, ImageNet mean/std"
    assert enc.image_transform(Image.new("RGB", (100, 60))).shape == (3, 32, 32)
    with pytest.raises(GapkitError, match="--tokenizer"):
        load_encoders(image_model=models["vit"], text_model=models["bert_notok"])
    enc = load_encoders(image_model=models["vit"], text_model=models["bert_notok"], tokenizer=minilm_path())
    assert enc.text_dim == 40


def test_hf_dual_clip_equals_get_features(models: dict[str, str], images: list[Image.Image]) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    enc = load_encoders(models["clip"], device="cpu")
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    proc = CLIPImageProcessor.from_pretrained(models["clip"])
    tok = AutoTokenizer.from_pretrained(models["clip"])
    with torch.inference_mode():
        px = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        want_im = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        t = tok(["a chest x-ray"], return_tensors="pt")
        want_tx = model.text_projection(model.text_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output)
        got_tx = enc.encode_text(enc.tokenize(["a chest x-ray"]))
    torch.testing.assert_close(_enc_images(enc, images), want_im, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_tx, want_tx, atol=1e-5, rtol=1e-4)
    assert (enc.image_dim, enc.text_dim) == (24, 24)
    # one tower of a dual model, with an open_clip tower on the other side
    mixed = load_encoders(image_model=models["clip"], text_model=models["oc"], device="cpu")
    assert (mixed.image_dim, mixed.text_dim) == (24, 32)


def test_image_modes_are_converted() -> None:
    grad = (np.arange(64 * 48).reshape(48, 64) * 1.3).astype(np.uint16)  # up to ~4000: 12-bit scan
    img16 = Image.fromarray(grad)
    assert img16.mode.startswith("I;16")
    rgb = np.asarray(to_rgb(img16))
    assert rgb.shape == (48, 64, 3) and rgb.min() == 0 and rgb.max() == 255  # rescaled, not clipped
    assert len(np.unique(rgb[..., 0])) > 200
    pal = Image.new("P", (10, 10))
    pal.putpalette([255, 0, 0] * 256)
    assert to_rgb(pal).getpixel((0, 0)) == (255, 0, 0)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent: white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (5, 5), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_transforms_accept_every_mode(models: dict[str, str]) -> None:
    enc = load_encoders(models["oc"], device="cpu")
    for img in (Image.new("L", (40, 30)), Image.new("I;16", (40, 30)), Image.new("P", (40, 30)), Image.new("RGBA", (40, 30))):
        assert enc.image_transform(img).shape == (3, 32, 32)


def test_state_dict_round_trip_and_run_folder(models: dict[str, str], tmp_path: Path, images: list[Image.Image]) -> None:
    from safetensors.torch import save_file

    trained = load_encoders(image_model=models["vit"], text_model=models["oc"], device="cpu")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "encoders.safetensors"))
    (tmp_path / "encoders.json").write_text(json.dumps({"model": None, "image_model": models["vit"], "text_model": models["oc"]}))
    loaded = load_encoders_from_run(tmp_path, device="cpu")
    fresh = load_encoders(image_model=models["vit"], text_model=models["oc"], device="cpu")
    want = _enc_images(trained, images)
    torch.testing.assert_close(_enc_images(loaded, images), want)
    assert not torch.allclose(_enc_images(fresh, images), want)
    with pytest.raises(GapkitError, match="do not fit"):
        fresh.load_state_dict({"image_tower.nope": torch.zeros(1)} | trained.state_dict())


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(None).type in ("cpu", "mps")
        with pytest.raises(GapkitError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(GapkitError, match="unknown device"):
        pick_device("tpu9")
