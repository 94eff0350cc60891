"""raylora.sources and raylora.registry: model sources (local dirs, MLflow URIs) and adapter registration in a sqlite MLflow store."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.test_merge import COCO_IMAGES, make_demo_adapter, prompt_logits, quiet


@pytest.fixture(scope="module")
def experiment_id(tracking_uri: str) -> str:
    from raylora import tracking
    from raylora.config import Config

    cfg = Config()
    cfg.tracking.uri = tracking_uri
    cfg.tracking.experiment = "test-registry"
    return tracking.setup(cfg)[1]


@pytest.fixture(scope="module")
def adapter_run(demo_root: Path, experiment_id: str, tmp_path_factory) -> tuple[Path, str]:
    """A demo adapter logged under ``adapter/`` of a finished run, as training logs it."""
    from mlflow.tracking import MlflowClient

    adapter = make_demo_adapter(demo_root / "base", tmp_path_factory.mktemp("reg") / "adapter", seed=1)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name="train")
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id, "FINISHED")
    return adapter, run.info.run_id


def test_register_moves_alias_only_when_better(adapter_run: tuple[Path, str]) -> None:
    from raylora import registry, tracking

    _, run_id = adapter_run
    name = f"test-lora-{uuid.uuid4().hex[:6]}"
    assert registry.champion(name) is None
    source = tracking.artifact_uri(run_id, "adapter")
    assert source.endswith("/adapter") and "runs:/" not in source

    v1, moved = registry.register_version(name, source, run_id, tags={"trial_id": "t1"}, metric_value=1.0)
    assert (v1, moved) == (1, True)
    version, tags = registry.champion(name)
    assert version == 1 and tags["trial_id"] == "t1" and float(tags["cider"]) == 1.0
    info = registry.version_info(name, 1)
    assert info["run_id"] == run_id and info["source"] == source

    assert registry.register_version(name, source, run_id, {"trial_id": "t2"}, metric_value=0.5) == (2, False)
    assert registry.champion(name)[0] == 1
    # runs:/ URIs are accepted and stored as the folder's artifact URI
    assert registry.register_version(name, f"runs:/{run_id}/adapter", None, metric_value=2.5) == (3, True)
    assert registry.version_info(name, 3)["source"] == source
    assert registry.register_version(name, source, run_id, {}, metric_value=None) == (4, False)
    assert registry.champion(name)[0] == 3
    assert registry.register_version(name, source, run_id, metric_value=2.5) == (5, False)  # ties keep it


def test_resolve_champion_matches_original_adapter(adapter_run: tuple[Path, str], tmp_path: Path) -> None:
    from raylora import registry, sources, tracking

    adapter, run_id = adapter_run
    name = f"test-lora-{uuid.uuid4().hex[:6]}"
    registry.register_version(name, tracking.artifact_uri(run_id, "adapter"), run_id, metric_value=0.7)

    src = sources.resolve_source(f"models:/{name}@champion", cache_dir=tmp_path)
    assert src.adapter_dir is not None and src.adapter_dir.is_relative_to(tmp_path)
    assert src.origin["name"] == name and src.origin["version"] == "1" and src.origin["run_id"] == run_id
    local = sources.resolve_source(adapter)
    assert (src.base_dir, src.template, src.system_message) == (
        local.base_dir,
        local.template,
        local.system_message,
    )
    assert src.tokenizer_dir == src.adapter_dir
    images = COCO_IMAGES[:1]
    got = prompt_logits(sources.load_model(src), src.image_settings(), images)
    ref = prompt_logits(sources.load_model(local), local.image_settings(), images)
    assert float((got - ref).abs().max()) == 0.0

    by_version = sources.resolve_source(f"models:/{name}/1", cache_dir=tmp_path)
    assert by_version.adapter_dir == src.adapter_dir  # same cached download
    by_run = sources.resolve_source(f"runs:/{run_id}/adapter", cache_dir=tmp_path)
    assert (by_run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_resolve_errors_name_the_spec(tmp_path: Path, tracking_uri: str) -> None:
    from raylora.sources import SourceError, resolve_source

    with pytest.raises(SourceError, match="models:/no-such-model@champion"):
        resolve_source("models:/no-such-model@champion", cache_dir=tmp_path)
    with pytest.raises(SourceError, match="expected models:/NAME@ALIAS"):
        resolve_source("models:/a/b/c", cache_dir=tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="neither a checkpoint dir"):
        resolve_source(str(tmp_path / "empty"))
    bad = tmp_path / "orphan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(SourceError, match="not a checkpoint directory on this machine"):
        resolve_source(str(bad))


def test_template_inference(tmp_path: Path, demo_root: Path) -> None:
    from raylora.sources import infer_template, resolve_source

    for llm, template in (("qwen2", "Hermes-2"), ("llama", "internlm2-chat"), ("phi3", "phi3-chat")):
        d = tmp_path / llm
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({"model_type": "internvl", "text_config": {"model_type": llm}})
        )
        assert infer_template(d) == template
    (tmp_path / "qwen2" / "config.json").write_text(
        json.dumps({"text_config": {"model_type": "qwen2"}, "raylora_template": "internvl2_5"})
    )
    assert infer_template(tmp_path / "qwen2") == "internvl2_5"
    base = resolve_source(demo_root / "base")
    assert base.adapter_dir is None and base.template == "Hermes-2" and base.system_message


def test_merge_register_from_champion(adapter_run: tuple[Path, str], tmp_path: Path, monkeypatch) -> None:
    from raylora import registry, sources, tracking
    from raylora.merge import merge_adapter

    monkeypatch.setenv("RAYLORA_CACHE", str(tmp_path / "raylora-cache"))  # MLflow downloads go there

    _, run_id = adapter_run
    name = f"test-lora-{uuid.uuid4().hex[:6]}"
    registry.register_version(name, tracking.artifact_uri(run_id, "adapter"), run_id, metric_value=1.5)
    report = merge_adapter(
        f"models:/{name}@champion",
        tmp_path / "merged",
        verify_images=COCO_IMAGES[:1],
        register=True,
        log=quiet,
    )
    reg = report["registered"]
    assert reg["name"] == f"{name}-merged" and reg["version"] == 1 and reg["alias_moved"]
    version, tags = registry.champion(f"{name}-merged")
    assert version == 1
    assert (
        tags["adapter_model"] == name and tags["adapter_version"] == "1" and tags["adapter_run_id"] == run_id
    )
    assert float(tags["cider"]) == 1.5
    assert list((tmp_path / "raylora-cache" / "mlflow" / "models").iterdir())
    merged = sources.resolve_source(f"models:/{name}-merged@champion", cache_dir=tmp_path / "cache")
    assert merged.adapter_dir is None and (merged.base_dir / "model.safetensors").is_file()
    assert merged.template == "Hermes-2"
