"""The demo's assets: the shipped base weights, and the pre-training that made them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def test_the_demo_base_is_the_shipped_weights(demo_root: Path):
    """The same base on every machine: the cached base holds the shipped tensors bit for bit."""
    import torch
    from safetensors.torch import load_file

    from raylora.demo import SHIPPED_BASE, shipped_base_mismatch

    assert shipped_base_mismatch(demo_root / "tokenizer", 1000) is None
    cached = load_file(demo_root / "base" / "model.safetensors")
    shipped = load_file(SHIPPED_BASE / "model.safetensors")
    assert cached.keys() == shipped.keys()
    assert all(torch.equal(cached[k], shipped[k]) for k in shipped)
    info = json.loads((demo_root / "base" / "raylora_demo_base.json").read_text())
    assert info["shipped"] is True and info["steps"] == 1000


def test_shipped_weights_are_refused_for_another_tokenizer_or_step_count(demo_root: Path, tmp_path: Path):
    from raylora.demo import shipped_base_mismatch

    assert "500 asked" in shipped_base_mismatch(demo_root / "tokenizer", 500)
    other = tmp_path / "tokenizer"
    shutil.copytree(demo_root / "tokenizer", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: other embeddings
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert "another tokenizer" in shipped_base_mismatch(other, 1000)


def test_pretraining_the_base_here_lowers_its_loss(demo_root: Path, tmp_path: Path):
    """``--pretrain`` (and a tokenizer the shipped weights do not fit) runs the pre-training that
    made the shipped weights: a few steps of it from the random model lower the loss."""
    from raylora.demo import build_random_model, pretrain_base, save_model_dir

    model = build_random_model(demo_root / "tokenizer")
    save_model_dir(model, demo_root / "tokenizer", tmp_path)
    lines: list[str] = []
    info = pretrain_base(model, demo_root / "data", tmp_path, steps=8, log=lines.append)
    first, last = (float(line.split(" loss ")[1].split()[0]) for line in (lines[0], lines[-1]))
    assert info["steps"] == 8 and lines[-1].startswith("[demo] base pre-training step 8/8")
    assert last < first - 0.5, lines
