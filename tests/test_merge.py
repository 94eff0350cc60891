"""raylora.merge and raylora.caption on a demo adapter (the demo base + a perturbed LoRA, no Ray).

The merged checkpoint must load with nothing but transformers, match base + adapter logits, and be
published atomically; the caption CLI must work on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COCO_VAL = Path(__file__).parent / "fixtures" / "coco" / "val2014"
COCO_IMAGES = sorted(str(p) for p in COCO_VAL.glob("*.jpg"))
FP32_TOL = 1e-4


def make_demo_adapter(base_dir: Path, out: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """A demo-config LoRA on the demo base with random lora_B (not a no-op), saved like training does."""
    import torch

    from raylora.config import load_config
    from raylora.demo import demo_image_settings
    from raylora.model import apply_lora, load_base_model
    from raylora.sources import complete_adapter_dir

    torch.manual_seed(seed)  # lora_A's init
    model = apply_lora(load_base_model(base_dir), load_config("demo"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    complete_adapter_dir(out, base_dir, demo_image_settings(base_dir))
    return out


def prompt_logits(model, settings, images: list[str]):
    """fp32 logits of raylora's caption prompts for ``images`` (last 32 positions, repeated until stable)."""
    from raylora.generation import GenerationSettings, prompt_batch
    from raylora.merge import stable_logits

    batch = prompt_batch(settings.conversation_tokenizer(), settings, images, GenerationSettings().prompt)
    return stable_logits(model, batch)[0]


def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def demo_adapter(demo_root: Path, tmp_path_factory) -> Path:
    return make_demo_adapter(demo_root / "base", tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def merged(demo_adapter: Path, tmp_path_factory) -> tuple[Path, dict]:
    from raylora.merge import merge_adapter

    out = tmp_path_factory.mktemp("merged") / "demo-merged"
    report = merge_adapter(demo_adapter, out, "fp32", verify_images=COCO_IMAGES[:2], log=quiet)
    return out, report


def test_merge_report_and_files(merged: tuple[Path, dict], demo_adapter: Path) -> None:
    out, report = merged
    assert report["max_abs_diff"] <= report["tolerance"] <= 2e-4
    assert report["adapter_effect"] > 100 * report["tolerance"]  # the adapter is not a no-op
    assert report["processor_prompt_matches"]
    assert report["caption"]["text"].strip()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"processor_config.json", "chat_template.jinja", "raylora.json"} <= names
    assert not list(out.rglob("*.py"))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    rec = json.loads((out / "raylora.json").read_text())
    assert rec["template"] == "Hermes-2" and rec["merged_from"]["adapter"] == str(demo_adapter)
    proc_cfg = json.loads((out / "processor_config.json").read_text())
    assert proc_cfg["image_seq_length"] == 16 and proc_cfg["image_processor"]["size"]["height"] == 112
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"]  # the template's end token, so plain generate() stops


def test_merged_logits_equal_base_plus_adapter(merged: tuple[Path, dict], demo_adapter: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from raylora.sources import load_model, resolve_source

    out, _ = merged
    source = resolve_source(demo_adapter)
    images = COCO_IMAGES[2:4]  # not the images the merge verified on
    ref = prompt_logits(load_model(source), source.image_settings(), images)
    got = prompt_logits(
        AutoModelForImageTextToText.from_pretrained(out).eval(), resolve_source(out).image_settings(), images
    )
    base = prompt_logits(load_model(resolve_source(source.base_dir)), source.image_settings(), images)
    diff = float((got - ref).abs().max())
    print(
        f"merged vs base+adapter max abs logit diff {diff:.3g}; adapter effect {(ref - base).abs().max():.3g}"
    )
    assert diff < FP32_TOL
    assert float((got - base).abs().max()) > 0.1  # not the base weights


SNIPPET = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_dir, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
processor = AutoProcessor.from_pretrained(model_dir)
messages = [{"role": "user", "content": [
    {"type": "image"}, {"type": "text", "text": "Provide a one-sentence caption for the provided image."}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, do_sample=False, min_new_tokens=8, max_new_tokens=30)
caption = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
print(json.dumps({"caption": caption, "raylora_imported": any(m.startswith("raylora") for m in sys.modules),
                  "model": type(model).__name__, "processor": type(processor).__name__}))
"""


def test_plain_transformers_loads_and_captions(merged: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = merged
    env = {**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(out), COCO_IMAGES[0]],
        cwd=tmp_path,  # not the repo: nothing of raylora on the path but the installed package
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["caption"]
    assert not result["raylora_imported"]
    assert result["model"] == "InternVLForConditionalGeneration"
    assert result["processor"] == "InternVLProcessor"


def test_caption_cli_two_images(merged: tuple[Path, dict], capsys) -> None:
    from raylora.caption import main

    out, _ = merged
    assert main(["--model", str(out), "--batch-size", "2", *COCO_IMAGES[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, COCO_IMAGES[:2]):
        path, caption = line.split("\t")
        assert path == image and caption.strip()


def test_caption_cli_errors(capsys, tmp_path: Path) -> None:
    from raylora.caption import main

    assert main(["--model", str(tmp_path / "nope"), COCO_IMAGES[0]]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_refuses_nonempty_output_then_overwrites(demo_adapter: Path, tmp_path: Path, capsys) -> None:
    from raylora.merge import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--adapter", str(demo_adapter), "--output", str(out), "--verify-images", COCO_IMAGES[0]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    assert main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "verification, merged (fp32, reloaded) vs base + adapter" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_crash_mid_save_publishes_nothing(demo_adapter: Path, tmp_path: Path, monkeypatch) -> None:
    from raylora import merge

    real_save = merge.save_merged

    def crashing_save(model, source, out, dtype, record):
        real_save(model, source, out, dtype, record)  # weights and config are on disk ...
        raise RuntimeError("simulated crash")  # ... when the process dies

    monkeypatch.setattr(merge, "save_merged", crashing_save)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge.merge_adapter(demo_adapter, fresh, verify=False, log=quiet)
    assert not fresh.exists()

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge.merge_adapter(demo_adapter, old, overwrite=True, verify=False, log=quiet)
    assert [p.name for p in old.iterdir()] == ["config.json"]  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temp dirs left behind


def test_merge_that_drops_the_adapter_fails_verification(
    demo_adapter: Path, tmp_path: Path, monkeypatch
) -> None:
    """A merge that silently produces the base weights must be caught and not published."""
    from peft.tuners.lora import LoraModel

    from raylora.merge import MergeError, merge_adapter

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kw: self.unload(), raising=False)
    out = tmp_path / "bad"
    with pytest.raises(MergeError, match="verification failed"):
        merge_adapter(demo_adapter, out, verify_images=COCO_IMAGES[:1], log=quiet)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_merge_refuses_full_checkpoint_and_source_inside_output(
    demo_root: Path, demo_adapter: Path, tmp_path: Path
) -> None:
    from raylora.merge import merge_adapter
    from raylora.sources import SourceError

    with pytest.raises(SourceError, match="nothing to merge"):
        merge_adapter(demo_root / "base", tmp_path / "never-written", log=quiet)
    assert not (tmp_path / "never-written").exists()
    with pytest.raises(FileExistsError, match="overlaps"):
        merge_adapter(demo_adapter, demo_adapter.parent, overwrite=True, log=quiet)
    assert (demo_adapter / "adapter_model.safetensors").is_file()


def test_bf16_merge(demo_adapter: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from raylora.merge import merge_adapter

    report = merge_adapter(demo_adapter, tmp_path / "bf16", "bf16", verify_images=COCO_IMAGES[:1], log=quiet)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["fp32 merge (in memory)"]["max_abs_diff"] <= 2e-4
    assert checks["saved bf16 weights vs merged bf16 weights"]["max_abs_diff"] <= 2e-4
    assert report["max_abs_diff"] <= report["tolerance"] < report["adapter_effect"]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_merge_of_an_mlflow_uri_draws_no_download_bars_into_its_log(
    demo_adapter: Path, tmp_path: Path
) -> None:
    """``python -m raylora.merge --model-uri ...`` with its output going to a file (a job's log):
    MLflow's artifact download bars ("Downloading artifacts: 100%|...") are off; --verbose shows them."""
    from raylora import console, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.client(uri).create_experiment(
        "merge-log", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    run_id = tracking.create_run(exp_id, "train", uri=uri)
    tracking.log_artifacts(run_id, demo_adapter, "adapter", uri)
    tracking.end_run(run_id, "FINISHED", uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for key in (*console.QUIET_ENV, console.VERBOSE_ENV):
        env.pop(key, None)

    def merge(name: str, *extra: str) -> str:
        log = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "raylora.merge", "--model-uri", f"runs:/{run_id}/adapter"]
        with log.open("w") as out:
            done = subprocess.run(
                [*cmd, "--output", str(tmp_path / name), "--no-verify", *extra],
                cwd=REPO,
                env={**env, "RAYLORA_CACHE": str(tmp_path / f"{name}-cache")},  # a download each time
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=600,
            )
        text = log.read_text()
        assert done.returncode == 0, text[-3000:]
        assert (tmp_path / name / "model.safetensors").is_file()
        return text

    text = merge("quiet")
    assert "Downloading artifacts" not in text and "%|" not in text, text
    assert "Downloading artifacts" in merge("verbose", "--verbose")
