"""End-to-end fine-tuning (gapkit finetune Mode 2): encoders + heads trained on a paired dataset.

Everything runs on the CPU with tiny models built in code (tests/tiny_models.py) and, for the main
test, 200 real MedPix pairs at 64 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from gapkit import metrics
from gapkit.cli import app
from gapkit.endtoend import find_blocks, finetune_end_to_end, set_trainable, split_by_image
from gapkit.errors import GapkitError
from gapkit.finetune import TrainConfig, read_metrics
from gapkit.progress import Reporter
from gapkit.store import open_set
from tests.tiny_models import tiny_hf_bert, tiny_hf_clip, tiny_hf_vit

#: a tiny open_clip ViT at 64 px (16 patches of 16 px), 2 blocks per tower
TINY64 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


#: the same at 32 px (16 patches of 8 px), for the toy datasets
TINY32 = dict(TINY64, vision_cfg=dict(TINY64["vision_cfg"], image_size=32, patch_size=8))


def _tiny_clip_spec(tmp_path: Path, name: str = "gapkit-e2e-tiny64", cfg: dict | None = None) -> str:
    path = Path(tmp_path) / f"{name}.json"
    path.write_text(json.dumps(cfg or TINY64))
    return f"{path}:random"


def _toy_dataset(root: Path, n: int = 24, size: int = 32) -> Path:
    """An imagefolder of ``n`` coloured squares, each captioned with its colour and a group."""
    root.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    names = list(colours)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as fh:
        for i in range(n):
            c = names[i % len(names)]
            arr = np.full((size, size, 3), 255, dtype=np.uint8)
            s = int(rng.integers(4, size // 2))
            arr[s : s + size // 3, s : s + size // 3] = colours[c]
            Image.fromarray(arr).save(root / f"img{i:03d}.png")
            fh.write(json.dumps({"file_name": f"img{i:03d}.png", "text": f"a {c} square number {i}",
                                 "label": c, "group": f"g{i // 3}"}) + "\n")
    return root


class _Crash(Reporter):
    """Raises after the note of epoch ``after`` (the checkpoint of that epoch is on disk by then)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def note(self, message: str) -> None:
        if message.startswith(f"epoch {self.after},"):
            raise KeyboardInterrupt("simulated crash")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoders.safetensors"))


# --------------------------------------------------------------------------------------------
# the test: MedPix, tiny open_clip, trains, resumes, closes the gap
# --------------------------------------------------------------------------------------------


def test_medpix_trains_resumes_and_closes_the_gap(medpix: Path, tmp_path: Path) -> None:
    spec = _tiny_clip_spec(tmp_path)
    cfg = TrainConfig(loss="clip+atp+cu", epochs=4, batch_size=32, lr=1e-3, val_fraction=0.25, seed=0,
                      patience=0, early_stop="val_loss")
    opts = {"limit": 200}
    run = tmp_path / "run"

    # crash after epoch 2 (its checkpoint is on disk), then --resume to the end
    with pytest.raises(KeyboardInterrupt):
        finetune_end_to_end(medpix / "train", run, cfg, model=spec, dataset_options=opts, reporter=_Crash(after=2))
    assert not (run / "encoders.safetensors").exists()
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1, 2]
    with pytest.raises(GapkitError, match="--resume"):
        finetune_end_to_end(medpix / "train", run, cfg, model=spec, dataset_options=opts)
    summary = finetune_end_to_end(medpix / "train", run, cfg, model=spec, dataset_options=opts, resume=True)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[4]["train_loss"] < rows[1]["train_loss"]

    # the written embedding sets, measured independently of the trainer's own numbers
    before, after = open_set(run / "val_before"), open_set(run / "val")
    assert before.n_images == after.n_images >= 40  # 25 % of 200 images held out by image
    assert [m["id"] for m in before.image_meta] == [m["id"] for m in after.image_meta]
    assert {m["label"] for m in after.image_meta} <= {"Head", "Thorax", "Abdomen", "Spine and Muscles",
                                                     "Reproductive and Urinary System"}
    g0, g1 = metrics.gap(*before.pairs()), metrics.gap(*after.pairs())
    c0, c1 = metrics.cos_true_pairs(*before.pairs()), metrics.cos_true_pairs(*after.pairs())
    assert g1 < g0 - 0.2, (g0, g1)
    assert c1 > c0 + 0.1, (c0, c1)
    assert summary["before"]["gap"] == pytest.approx(g0, abs=1e-4)
    assert summary["after"]["gap"] == pytest.approx(g1, abs=1e-4)

    # validation images are not among the training images
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    assert open_set(run / "train").n_images == len(split["train"]) == 200 - before.n_images

    # a finished run resumed again does nothing and returns the same summary
    assert finetune_end_to_end(medpix / "train", run, cfg, model=spec, dataset_options=opts,
                               resume=True)["after"] == summary["after"]

    # `gapkit embed --heads RUN` rebuilds the trained encoders and reproduces RUN/val
    from gapkit.embed import embed

    embed(medpix / "train", tmp_path / "re", heads=run, limit=200, batch_size=64)
    re = open_set(tmp_path / "re")
    row_of = {m["id"]: r for r, m in enumerate(re.image_meta)}
    rows_val = [row_of[m["id"]] for m in after.image_meta]
    np.testing.assert_allclose(np.asarray(re.images)[rows_val], np.asarray(after.images), rtol=1e-4, atol=1e-4)


def load_encoders_state(spec: str) -> dict[str, torch.Tensor]:
    from gapkit.encoders import load_encoders

    return {k: v.clone() for k, v in load_encoders(spec, device="cpu").state_dict().items()}


# --------------------------------------------------------------------------------------------
# which parameters train
# --------------------------------------------------------------------------------------------


def test_unlock_last_finds_the_blocks_of_each_architecture(tmp_path: Path) -> None:
    from gapkit.encoders import load_encoders

    enc = load_encoders(_tiny_clip_spec(tmp_path), device="cpu")
    assert find_blocks(enc.image_tower)[0] == "visual.transformer.resblocks"
    assert find_blocks(enc.text_tower)[0] == "transformer.resblocks"
    counts = set_trainable(enc.image_tower, enc.text_tower, unlock_last=1)
    train_im = {n for n, p in enc.image_tower.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in train_im)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in train_im)
    assert {"visual.ln_post.weight", "visual.proj"} <= train_im
    assert not {"visual.conv1.weight", "visual.positional_embedding", "visual.ln_pre.weight"} & train_im
    train_tx = {n for n, p in enc.text_tower.named_parameters() if p.requires_grad}
    assert {"ln_final.weight", "text_projection"} <= train_tx
    assert "token_embedding.weight" not in train_tx
    assert 0 < counts["image"]["trainable"] < counts["image"]["parameters"]

    enc = load_encoders(image_model=tiny_hf_vit(tmp_path), text_model=tiny_hf_bert(tmp_path), device="cpu")
    assert find_blocks(enc.image_tower)[0] == "model.layers"  # transformers 5 ViT (4.x: encoder.layer)
    assert find_blocks(enc.text_tower)[0] == "model.encoder.layer"
    set_trainable(enc.image_tower, enc.text_tower, unlock_last=1, freeze="text")
    train_im = {n for n, p in enc.image_tower.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.layers.1.") for n in train_im)
    assert not any(n.startswith(("model.layers.0.", "model.embeddings.")) for n in train_im)
    assert "model.layernorm.weight" in train_im
    assert not any(p.requires_grad for p in enc.text_tower.parameters())

    enc = load_encoders(tiny_hf_clip(tmp_path), device="cpu")
    assert find_blocks(enc.image_tower)[0] == "vision_model.encoder.layers"
    assert find_blocks(enc.text_tower)[0] == "text_model.encoder.layers"
    set_trainable(enc.image_tower, enc.text_tower, unlock_last=1)
    train = {n for t in (enc.image_tower, enc.text_tower) for n, p in t.named_parameters() if p.requires_grad}
    assert {"visual_projection.weight", "text_projection.weight", "vision_model.post_layernorm.weight",
            "text_model.final_layer_norm.weight"} <= train
    assert not any(".layers.0." in n or "embeddings" in n or "pre_layrnorm" in n for n in train), sorted(train)

    with pytest.raises(GapkitError, match="block list"):
        set_trainable(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), unlock_last=1)
    with pytest.raises(GapkitError, match="freeze"):
        set_trainable(enc.image_tower, enc.text_tower, freeze="both")


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])}


def test_freeze_and_unlock_last_change_what_moves(tmp_path: Path) -> None:
    from gapkit.encoders import load_encoders

    data = _toy_dataset(tmp_path / "toy", n=24)
    spec = _tiny_clip_spec(tmp_path, "gapkit-e2e-tiny32", TINY32)
    init = load_encoders_state(spec)
    cfg = TrainConfig(loss="clip+atp+cu", epochs=1, batch_size=8, lr=1e-2, val_fraction=0.0, seed=0, patience=0)

    finetune_end_to_end(data, tmp_path / "frozen-text", cfg, model=spec, freeze="text")
    w = _weights(tmp_path / "frozen-text")
    assert _changed(w, init, "image_tower.")
    assert not _changed(w, init, "text_tower.")

    finetune_end_to_end(data, tmp_path / "frozen-image", cfg, model=spec, freeze="image")
    w = _weights(tmp_path / "frozen-image")
    assert not _changed(w, init, "image_tower.")
    assert _changed(w, init, "text_tower.")

    finetune_end_to_end(data, tmp_path / "last1", cfg, model=spec, unlock_last=1)
    moved = _changed(_weights(tmp_path / "last1"), init, "")
    assert any(k.startswith("image_tower.visual.transformer.resblocks.1.") for k in moved)
    assert any(k.startswith("text_tower.transformer.resblocks.1.") for k in moved)
    assert {"image_tower.visual.proj", "text_tower.text_projection"} <= moved
    assert not any(".resblocks.0." in k or "embedding" in k or "conv1" in k for k in moved), sorted(moved)


# --------------------------------------------------------------------------------------------
# split, errors, CLI
# --------------------------------------------------------------------------------------------


def test_split_keeps_groups_together_and_is_seeded(tmp_path: Path) -> None:
    from gapkit.datasets import open_dataset

    ds = open_dataset(_toy_dataset(tmp_path / "toy", n=30))
    tr, va = split_by_image(ds.records, 0.3, group_by="group", seed=1)
    assert len(set(tr) | set(va)) == 30 and not set(tr) & set(va)
    g_tr = {ds.records[i].meta["group"] for i in tr}
    g_va = {ds.records[i].meta["group"] for i in va}
    assert not g_tr & g_va
    tr2, va2 = split_by_image(ds.records, 0.3, group_by="group", seed=1)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_by_image(ds.records, 0.3, group_by="group", seed=2)[1])
    with pytest.raises(GapkitError, match="nope"):
        split_by_image(ds.records, 0.3, group_by="nope")


def test_cli_end_to_end_and_errors(tmp_path: Path) -> None:
    data = _toy_dataset(tmp_path / "toy", n=24)
    spec = _tiny_clip_spec(tmp_path, "gapkit-e2e-cli", TINY32)
    runner = CliRunner()
    base = ["finetune", str(data), "--model", spec, "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25",
            "--quiet"]
    # bf16 autocast runs on a CPU too (the GPU path's mixed precision, minus the GradScaler)
    res = runner.invoke(app, base + ["-o", str(tmp_path / "run"), "--json", "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc["before"]) >= {"gap", "cos_true_pairs", "i2t_R@1"} and doc["after"]
    for name in ("encoders.safetensors", "encoders.json", "heads.safetensors", "heads.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "encoders.json").read_text())["model"] == spec
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == "bf16"

    res = runner.invoke(app, base + ["-o", str(tmp_path / "bad"), "--freeze", "both"])
    assert res.exit_code == 2
    assert "freeze" in res.output and "Traceback" not in res.output

    # a broken image: one line naming the file, no traceback
    (data / "img005.png").write_bytes(b"not a png")
    res = runner.invoke(app, base + ["-o", str(tmp_path / "broken")])
    assert res.exit_code == 2, res.output
    assert "img005.png" in res.output and "Traceback" not in res.output

    # resuming with other settings is refused, naming them
    res = runner.invoke(app, base[:-1] + ["-o", str(tmp_path / "run"), "--resume", "--loss", "clip", "--quiet"])
    assert res.exit_code == 2 and "loss" in res.output


# --------------------------------------------------------------------------------------------
# the same training, reached three other ways: after a crash and --resume, with gradient
# accumulation, and on two processes (torch.distributed, gloo): all equal one uninterrupted run
# --------------------------------------------------------------------------------------------

REF_CFG = dict(loss="clip+atp+cu", epochs=2, batch_size=8, lr=2e-3, val_fraction=0.25, seed=1, patience=0,
               schedule=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, dict]:
    """(toy dataset, uninterrupted run folder, model spec, its summary)."""
    tmp = tmp_path_factory.mktemp("e2e-ref")
    data = _toy_dataset(tmp / "toy", n=24)
    spec = _tiny_clip_spec(tmp, "gapkit-e2e-ref", TINY32)
    summary = finetune_end_to_end(data, tmp / "ref", TrainConfig(**REF_CFG), model=spec)
    return data, tmp / "ref", spec, summary


def _assert_same_training(ref: Path, other: Path, tol: float = 1e-5) -> None:
    a, b = _weights(ref), _weights(other)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            # the key bias [D:2D] has an exactly zero gradient (it shifts every logit of a softmax
            # row alike), so AdamW's g/sqrt(v) turns rounding noise into full-size steps: skip it
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, rtol=10 * tol, atol=tol, msg=k)
    h1 = load_file(str(ref / "heads.safetensors"))
    h2 = load_file(str(other / "heads.safetensors"))
    for k in h1:
        torch.testing.assert_close(h1[k], h2[k], rtol=10 * tol, atol=tol, msg=k)
    la = [r["train_loss"] for r in read_metrics(ref)[1:]]
    lb = [r["train_loss"] for r in read_metrics(other)[1:]]
    assert len(la) == len(lb) == REF_CFG["epochs"]
    np.testing.assert_allclose(la, lb, rtol=10 * tol)
    ra = json.loads((ref / "result.json").read_text())["after"]
    rb = json.loads((other / "result.json").read_text())["after"]
    assert ra == pytest.approx(rb, abs=10 * tol)


def test_resume_equals_an_uninterrupted_run(reference: tuple, tmp_path: Path) -> None:
    data, ref, spec, _ = reference
    with pytest.raises(KeyboardInterrupt):
        finetune_end_to_end(data, tmp_path / "crash", TrainConfig(**REF_CFG), model=spec, reporter=_Crash(after=1))
    finetune_end_to_end(data, tmp_path / "crash", TrainConfig(**REF_CFG), model=spec, resume=True)
    _assert_same_training(ref, tmp_path / "crash", tol=1e-6)
    # the comparison can fail: training moved the weights away from the initial ones
    assert not torch.equal(_weights(ref)["image_tower.visual.proj"], load_encoders_state(spec)["image_tower.visual.proj"])


def test_grad_accum_gives_the_same_training_as_one_batch(reference: tuple, tmp_path: Path) -> None:
    data, ref, spec, _ = reference
    finetune_end_to_end(data, tmp_path / "acc", TrainConfig(**REF_CFG), model=spec, grad_accum=2)
    assert json.loads((tmp_path / "acc" / "run.json").read_text())["grad_accum"] == 2
    _assert_same_training(ref, tmp_path / "acc", tol=5e-5)


def _ddp_worker(rank: int, world: int, port: int, args: tuple) -> None:
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    data, out, spec = args
    finetune_end_to_end(data, out, TrainConfig(**REF_CFG), model=spec)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_train_like_one(reference: tuple, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    data, ref, spec, _ = reference
    mp.start_processes(_ddp_worker, args=(2, _free_port(), (data, tmp_path / "two", spec)),
                       nprocs=2, join=True, start_method="spawn")
    run_json = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run_json["world_size"] == 2 and run_json["batch_size"] == REF_CFG["batch_size"]
    _assert_same_training(ref, tmp_path / "two", tol=5e-5)
