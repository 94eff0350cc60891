"""Typed config: YAML files, base chains, key=value overrides and their errors."""

from __future__ import annotations

import pytest

from raylora.config import ConfigError, config_from_dict, load_config, parse_override

SHIPPED = [
    "demo",
    "internvl2_1b_coco",
    "internvl2_2b_coco",
    "internvl2_4b_coco",
    "internvl2_8b_coco",
    "internvl2_26b_coco",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.lora.rank > 0


def test_recipe_values():
    c = load_config("internvl2_2b_coco")
    assert (c.train.global_batch_size, c.train.per_device_batch_size, c.cluster.num_workers) == (512, 4, 8)
    assert (c.train.lr, c.train.warmup_ratio, c.train.weight_decay, c.train.grad_clip, c.train.seed) == (
        4e-5,
        0.03,
        0.01,
        1.0,
        42,
    )
    assert (c.train.adam_beta1, c.train.adam_beta2, c.train.adam_eps) == (0.9, 0.999, 1e-8)
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (128, 256, 0.05)
    assert (c.data.image_size, c.data.min_num, c.data.max_num, c.data.use_thumbnail) == (448, 1, 6, True)
    assert (c.model.max_seq_length, c.model.gradient_checkpointing, c.train.zero_stage, c.train.epochs) == (
        4096,
        True,
        1,
        1,
    )
    assert c.train.group_by_length and not c.lora.vision_lora and not c.lora.train_projector
    big = load_config("internvl2_26b_coco")
    assert big.train.zero_stage == 3 and big.train.lr == 2e-5 and big.lora.rank == 128  # inherited


def test_overrides_parse_as_yaml():
    cfg = load_config(
        "demo",
        ["train.lr=1e-4", "lora.rank=8", "lora.target_modules=[q_proj, v_proj]", "cluster.address=null"],
    )
    assert cfg.train.lr == 1e-4 and cfg.lora.rank == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.cluster.address is None
    assert parse_override("lora.rank=4") == ("lora.rank", 4)
    # YAML reads 4e-5 as text; the float field makes it a number
    assert load_config("demo", ["train.lr=4e-5"]).train.lr == 4e-5


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.learning_rate=1e-4"])
    assert "train.learning_rate" in str(e.value) and "train.lr" in str(e.value)
    with pytest.raises(ConfigError, match="valid top-level keys"):
        load_config("demo", ["trian.lr=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="lora.rank: expected an integer"):
        load_config("demo", ["lora.rank=big"])
    with pytest.raises(ConfigError, match="train.group_by_length: expected true or false"):
        load_config("demo", ["train.group_by_length=3"])


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-4\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        "base: " + str(load_config.__globals__["CONFIG_DIR"] / "demo.yaml") + "\nlora:\n  rnak: 4\n"
    )
    with pytest.raises(ConfigError, match="unknown.yaml: unknown key 'lora.rnak'"):
        load_config(unknown)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config("demo", ["train.zero_stage=4"])
    from raylora.cli import load

    with pytest.raises(ConfigError, match="model.template"):  # checked where the commands load configs
        load("demo", ["model.template=chatml"])


def test_round_trip():
    cfg = load_config("internvl2_2b_coco", ["train.lr=2e-5"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() != load_config("internvl2_2b_coco").fingerprint()


# ------------------------------------------------------------------- the recipe-or-demo default

NOTICE = "running the built-in demo config (tune_configs/demo.yaml) with"


@pytest.mark.parametrize(
    "present, why",
    [
        ((), "pretrained/InternVL2-2B and data/coco not found:"),
        (
            ("data/coco",),
            "pretrained/InternVL2-2B not found (data/coco is there, but the recipe needs both):",
        ),
        (
            ("pretrained/InternVL2-2B",),
            "data/coco not found (pretrained/InternVL2-2B is there, but the recipe needs both):",
        ),
    ],
    ids=["both missing", "model missing", "data missing"],
)
@pytest.mark.parametrize(
    "overrides, parts",
    [
        ([], "the demo's model and the demo's data"),
        (
            ["data.train=/d/train.jsonl", "data.root=/d"],
            "the demo's model and your data (data.train=/d/train.jsonl)",
        ),
        (["model.path=/m/InternVL2-1B"], "your model (model.path=/m/InternVL2-1B) and the demo's data"),
        (
            ["model={path: /m/x}", "data.train=/d/t.jsonl"],
            "your model (model.path=/m/x) and your data (data.train=/d/t.jsonl)",
        ),
    ],
    ids=["nothing given", "data given", "model given", "both given"],
)
def test_demo_default_says_whose_model_and_data(
    tmp_path, monkeypatch, capsys, present, why, overrides, parts
):
    """Without the recipe's model and data in the working directory the demo config runs: the line
    says which of the recipe paths are missing and whether model and data are the demo's or the user's."""
    from raylora.cli import default_config_name

    monkeypatch.chdir(tmp_path)
    for path in present:
        (tmp_path / path).mkdir(parents=True)
    assert default_config_name(overrides) == "demo"
    out = capsys.readouterr().out.strip()
    assert out == f"[raylora] {why} {NOTICE} {parts}"


def test_recipe_default_when_its_model_and_data_are_there(tmp_path, monkeypatch, capsys):
    from raylora.cli import default_config_name

    monkeypatch.chdir(tmp_path)
    for path in ("pretrained/InternVL2-2B", "data/coco"):
        (tmp_path / path).mkdir(parents=True)
    assert default_config_name(["data.train=/d/train.jsonl"]) == "internvl2_2b_coco"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=-1",
        "train.lr=0",
        "train.lr=.nan",
        "train.warmup_ratio=1.5",
        "train.adam_beta1=1.0",
        "train.adam_beta2=-0.1",
        "train.adam_eps=0",
        "train.weight_decay=-0.01",
        "train.grad_clip=-1",
        "lora.dropout=1.0",
        "lora.alpha=0",
        "train.max_steps=0",
        "train.epochs=-1",
        "train.global_batch_size=7",
        "train.per_device_batch_size=0",
        "train.log_every_n_steps=0",
        "train.checkpoint_every_n_steps=0",
        "train.num_to_keep=0",
        "eval.every_n_steps=-2",
        "eval.max_new_tokens=0",
        "eval.max_num=0",
        "model.max_seq_length=0",
        "data.max_packed_tokens=-1",
        "data.max_num=0",
        "data.image_size=0",
        "data.val_size=0",
        "cluster.cpus_per_worker=0",
        "sweep.reduction_factor=1",
        "sweep.rank=[0, 8]",
    ],
)
def test_bad_values_are_refused_where_the_config_is_parsed(override):
    """Every value a config can get wrong is an error naming the key, the value, where it was set and
    what it must be, raised by load_config (before any cluster, data or model work)."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    message = str(e.value)
    assert message.startswith(f"{key} must be") and "(set in command line)" in message, message


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad_lr.yaml"
    bad.write_text(
        "base: " + str(load_config.__globals__["CONFIG_DIR"] / "demo.yaml") + "\ntrain:\n  lr: -1\n"
    )
    with pytest.raises(
        ConfigError, match=r"train.lr must be a positive number, got -1.0 \(set in .*bad_lr.yaml\)"
    ):
        load_config(bad)


def test_batch_arithmetic_is_checked_with_the_config():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.global_batch_size=7"])
    assert "a multiple of train.per_device_batch_size 4 x cluster.num_workers 2 = 8" in str(e.value)
    assert load_config("demo", ["train.global_batch_size=16"]).train.global_batch_size == 16


def test_a_library_below_its_floor_is_one_line_at_import(monkeypatch):
    """transformers 5.17 (as on a GPU machine's image) makes forward_loss raise IndexError deep in the
    model; raylora says so when it is imported, naming the package, both versions and the fix."""
    import subprocess
    import sys

    from raylora import versions

    real = versions.version
    monkeypatch.setattr(versions, "version", lambda p: "5.17.0" if p == "transformers" else real(p))
    (line,) = versions.too_old()
    assert line.startswith("raylora needs transformers>=5.21.0 (logits_to_keep as a 2-D boolean mask")
    assert "5.17.0 is installed: pip install -U 'transformers>=5.21.0'" in line
    with pytest.raises(versions.VersionError, match="transformers>=5.21.0"):
        versions.check_versions()
    monkeypatch.setattr(versions, "version", lambda p: "2.11.0+cu130" if p == "torch" else real(p))
    assert versions.too_old() == []  # a CUDA build's local version counts as its release
    # a command: one error line, exit 2 (a fake transformers metadata first on the path)
    code = (
        "import importlib.metadata as m, sys; real = m.version\n"
        "m.version = lambda p: '5.17.0' if p == 'transformers' else real(p)\n"
        "sys.argv = ['-m']; import raylora\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: raylora needs transformers>=5.21.0 (logits_to_keep as a 2-D boolean mask "
        "(raylora.loss)); 5.17.0 is installed: pip install -U 'transformers>=5.21.0'"
    ]
