"""The scripts: download_coco.sh without network, and the GPU check's stages on the CPU.

Each run gets a PATH made of a temp bin folder holding only the tools the case wants. wget, curl and
unzip there are stand-ins that log their calls: the dry run must never call them, and the real-mode
cases serve files from a local folder. The real-mode cases also put a stand-in huggingface_hub first
on PYTHONPATH, whose snapshot_download writes a config.json instead of contacting the hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "download_coco.sh"
BASH = shutil.which("bash") or "/bin/bash"
COCO_ZIPS = "http://images.cocodataset.org/zips"
INTERNVL_DATA = "https://github.com/OpenGVLab/InternVL/releases/download/data"

# wget -c -O OUT URL | curl ... -o OUT URL: copy SERVER/<basename of URL> to OUT, exit 8 when absent
FETCHER = """
import os, shutil, sys
args = sys.argv[1:]
out = args[args.index("-O" if "-O" in args else "-o") + 1]
url = args[-1]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(f"{os.path.basename(sys.argv[0])[1:-3]} {url}\\n")
src = os.path.join(os.environ.get("STUB_SERVER", "/nonexistent"), url.rsplit("/", 1)[1])
if not os.path.isfile(src):
    sys.exit(8)
shutil.copyfile(src, out)
"""

# unzip -q -o ZIP -d DIR
UNZIP = """
import os, sys, zipfile
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("unzip " + " ".join(args) + "\\n")
dest = args[args.index("-d") + 1]
zipf = [a for a in args if not a.startswith("-") and a != dest][0]
zipfile.ZipFile(zipf).extractall(dest)
"""

FAKE_HUB = """
import json, os
__version__ = "0.0+stand-in"

def snapshot_download(repo_id, local_dir=None, **kwargs):
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(f"snapshot_download {repo_id} {local_dir}\\n")
    if repo_id.endswith("-Missing"):
        raise RuntimeError(f"repository not found: {repo_id}")
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, "config.json"), "w") as f:
        json.dump({"repo": repo_id}, f)
    return local_dir
"""


def _stub(bin_dir: Path, name: str, code: str) -> None:
    py = bin_dir / f"_{name}.py"
    py.write_text(code)
    exe = bin_dir / name
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{py}" "$@"\n')
    exe.chmod(0o755)


def make_bin(tmp_path: Path, tools: set[str]) -> Path:
    """A bin folder with only `tools`: python runs this interpreter; wget, curl, unzip are stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if "python" in tools:
        # a wrapper rather than a symlink, so a virtualenv's interpreter keeps its site-packages
        exe = bin_dir / "python"
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        exe.chmod(0o755)
    for name in {"wget", "curl"} & tools:
        _stub(bin_dir, name, FETCHER)
    if "unzip" in tools:
        _stub(bin_dir, "unzip", UNZIP)
    for name in {"mkdir", "dirname", "mv", "rm"} & tools:  # what the real mode uses besides those
        (bin_dir / name).symlink_to(shutil.which(name))
    return bin_dir


def run(cwd: Path, bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {"PYTHON", "DRY_RUN", "PYTHONPATH"}}
    if os.environ.get("PYTHONPATH"):
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    base.update(PATH=str(bin_dir), STUB_LOG=str(cwd.parent / "calls.log"), **env)
    return subprocess.run(
        [BASH, str(SCRIPT), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def calls(work: Path) -> list[str]:
    log = work.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


ALL = {"python", "wget", "curl", "unzip"}


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path, work: Path):
    r = run(work, make_bin(tmp_path, ALL), "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "OpenGVLab/InternVL2-2B -> pretrained/InternVL2-2B/" in out
    for name in ("train2014", "val2014"):
        assert f"{COCO_ZIPS}/{name}.zip -> data/coco/{name}/" in out
    for name in ("coco_karpathy_test.json", "coco_karpathy_test_gt.json"):
        assert f"{INTERNVL_DATA}/{name} -> data/coco/annotations/{name}" in out
    assert (
        f"{INTERNVL_DATA}/coco_karpathy_train_567k.zip -> data/coco/annotations/coco_karpathy_train_567k.jsonl"
        in out
    )
    assert "data/coco/annotations/coco_karpathy_val.json" in out
    assert "data/coco/annotations/coco_karpathy_val_gt.json" in out
    assert "dataset_coco.json" in out  # how to get the val split, which is not downloadable
    assert list(work.iterdir()) == []  # nothing written, not even empty folders
    assert calls(work) == []  # no wget, curl or unzip run


def test_model_argument_and_env_dry_run(tmp_path: Path, work: Path):
    r = run(work, make_bin(tmp_path, ALL), "InternVL2-1B", DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert "OpenGVLab/InternVL2-1B -> pretrained/InternVL2-1B/" in r.stdout
    assert "InternVL2-2B" not in r.stdout
    assert list(work.iterdir()) == [] and calls(work) == []


def test_curl_is_enough(tmp_path: Path, work: Path):
    r = run(work, make_bin(tmp_path, {"python", "curl", "unzip"}), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "curl" in r.stdout.splitlines()[0]


def test_help_and_bad_options(tmp_path: Path, work: Path):
    bin_dir = make_bin(tmp_path, ALL)
    r = run(work, bin_dir, "--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "MODEL" in r.stdout
    r = run(work, bin_dir, "--resume-download")
    assert r.returncode == 2 and "unknown option: --resume-download" in r.stderr
    for bad in ("OpenGVLab/InternVL2-2B/extra", "../InternVL2-2B", "Qwen/.hidden"):
        r = run(work, bin_dir, "--dry-run", bad)
        assert r.returncode != 0 and "MODEL is ORG/NAME or a NAME under OpenGVLab/" in r.stderr
    assert list(work.iterdir()) == [] and calls(work) == []
    r = run(work, bin_dir, "--dry-run", "Qwen/Qwen2.5-VL-3B-Instruct")  # any org: its name is the folder
    assert (
        r.returncode == 0
        and "hub Qwen/Qwen2.5-VL-3B-Instruct -> pretrained/Qwen2.5-VL-3B-Instruct/" in r.stdout
    )


@pytest.mark.parametrize(
    "tools, named",
    [
        ({"python", "wget", "curl"}, "unzip"),
        ({"python", "unzip"}, "wget or curl"),
        ({"wget", "unzip"}, "python"),
    ],
)
def test_dry_run_names_a_missing_tool(tmp_path: Path, work: Path, tools: set[str], named: str):
    r = run(work, make_bin(tmp_path, tools), "--dry-run")
    assert r.returncode != 0
    assert f"missing tool: {named}" in r.stderr
    assert list(work.iterdir()) == [] and calls(work) == []


def test_dry_run_needs_huggingface_hub(tmp_path: Path, work: Path):
    broken = tmp_path / "nohub" / "huggingface_hub"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('not installed')\n")
    r = run(work, make_bin(tmp_path, ALL), "--dry-run", PYTHONPATH=str(broken.parent))
    assert r.returncode != 0
    assert "missing tool: huggingface_hub" in r.stderr


# ---- real mode, against local stand-ins -----------------------------------------------------------


def _zip(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)


@pytest.fixture
def server(tmp_path: Path) -> Path:
    s = tmp_path / "server"
    s.mkdir()
    _zip(s / "train2014.zip", {"train2014/COCO_train2014_000000000009.jpg": "jpg"})
    _zip(s / "val2014.zip", {"val2014/COCO_val2014_000000000042.jpg": "jpg"})
    _zip(s / "coco_karpathy_train_567k.zip", {"coco_karpathy_train_567k.jsonl": "{}\n"})
    (s / "coco_karpathy_test.json").write_text("[]")
    (s / "coco_karpathy_test_gt.json").write_text("{}")
    return s


@pytest.fixture
def fake_hub(tmp_path: Path) -> str:
    pkg = tmp_path / "fakehub" / "huggingface_hub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_HUB)
    return str(pkg.parent)


REAL = {"python", "unzip", "mkdir", "dirname", "mv", "rm"}


@pytest.mark.parametrize("fetcher", ["wget", "curl"])
def test_real_mode_lays_out_the_tutorial(tmp_path: Path, work: Path, server: Path, fake_hub: str, fetcher):
    ann = work / "data" / "coco" / "annotations"
    ann.mkdir(parents=True)
    val_image = {"split": "val", "filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg"}
    val_image |= {"cocoid": 42, "sentences": [{"raw": "a cat. "}]}
    (ann / "dataset_coco.json").write_text(json.dumps({"images": [val_image]}))
    bin_dir = make_bin(tmp_path, REAL | {fetcher})

    r = run(work, bin_dir, STUB_SERVER=str(server), PYTHONPATH=fake_hub)
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "pretrained/InternVL2-2B/config.json").read_text()) == {
        "repo": "OpenGVLab/InternVL2-2B"
    }
    assert (work / "data/coco/train2014/COCO_train2014_000000000009.jpg").is_file()
    assert (work / "data/coco/val2014/COCO_val2014_000000000042.jpg").is_file()
    for name in ("coco_karpathy_train_567k.jsonl", "coco_karpathy_test.json", "coco_karpathy_test_gt.json"):
        assert (ann / name).is_file()
    assert json.loads((ann / "coco_karpathy_val.json").read_text())[0]["caption"] == ["a cat."]
    assert (ann / "coco_karpathy_val_gt.json").is_file()
    leftovers = [p.name for p in work.rglob("*") if p.suffix in {".zip", ".part"}]
    assert leftovers == []
    assert "python -m raylora.data check data/coco/annotations/coco_karpathy_train_567k.jsonl" in r.stdout
    fetched = [c for c in calls(work) if c.startswith(fetcher)]
    assert len(fetched) == 5

    # a second run skips what is in place: no download but the hub's own check
    r = run(work, bin_dir, STUB_SERVER=str(server), PYTHONPATH=fake_hub)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("(present, skipped)") == 6
    assert [c for c in calls(work) if c.startswith(fetcher)] == fetched


def test_real_mode_failures_say_what_and_how_to_retry(tmp_path: Path, work: Path, fake_hub: str):
    bin_dir = make_bin(tmp_path, REAL | {"wget"})
    r = run(work, bin_dir, STUB_SERVER=str(tmp_path / "empty"), PYTHONPATH=fake_hub)
    assert r.returncode != 0
    assert f"download of {COCO_ZIPS}/train2014.zip failed" in r.stderr
    assert "run the script again to resume" in r.stderr
    assert not (work / "data/coco/train2014").exists()

    r = run(work, bin_dir, "InternVL2-Missing", PYTHONPATH=fake_hub)
    assert r.returncode != 0
    assert (
        "download of hub repo OpenGVLab/InternVL2-Missing into pretrained/InternVL2-Missing failed"
        in r.stderr
    )


@pytest.mark.slow
def test_the_gpu_check_runs_every_stage_on_the_cpu(demo_root, tmp_path):
    """scripts/gpu_check.sh is the first thing run on a GPU: every stage (environment, exactness, the
    recipe's step under torchrun in both layouts, the demo through torchrun, generation and merge)
    runs here on the CPU with narrow models, so a mistake shows before a GPU is lent; each stage is
    recorded in gpu_check.json, which the last line names. A stage that fails is recorded and the
    next one runs."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    env.pop("RAY_ADDRESS", None)
    cmd = ["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--steps", "4", "--demo-steps", "8"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    path = tmp_path / "out" / "gpu_check.json"
    assert done.stdout.strip().splitlines()[-1] == f"[gpu_check] all stages ok: {path}"
    report = json.loads(path.read_text())
    stages = report["stages"]
    assert list(stages) == [
        "environment",
        "demo_assets",
        "exactness",
        "recipe_tutorial",
        "recipe_image_once",
        "demo",
        "generation_merge",
    ]
    assert all(s["status"] == "ok" for s in stages.values()) and report["cpu_dry_run"] is True
    assert stages["environment"]["result"]["below_raylora_floors"] == []
    assert stages["exactness"]["result"]["max_relative_gradient_error"]["sdpa"] <= 1e-4
    for layout in ("tutorial", "image_once"):
        step = stages[f"recipe_{layout}"]["result"]
        assert step["samples_per_s"] > 0 and step["model_tflops_per_s"] > 0 and step["timed_steps"] == 2
        assert step["checkpoint_written"] and "recompute not counted" in step["flops_counted"]
        assert step["attention"].startswith("[train] attention: text model sdpa")
    assert stages["recipe_image_once"]["result"]["units_per_step"] == [4]
    demo = stages["demo"]["result"]
    assert demo["steps"] == 8 and demo["loss_last3"] < demo["loss_first3"] and demo["val_cider"] >= 0
    merge = stages["generation_merge"]["result"]
    assert merge["images_per_s_batch16"] > 0 and merge["merged_max_abs_logit_diff"] < 1e-3

    # a failing stage is recorded with its message, and the stages after it still run
    bad = subprocess.run(
        [
            *cmd[:3],
            "--steps",
            "0",
            "--stages",
            "recipe_tutorial,generation_merge",
            "--out",
            str(tmp_path / "bad"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1
    stages = json.loads((tmp_path / "bad" / "gpu_check.json").read_text())["stages"]
    assert list(stages) == ["environment", "demo_assets", "recipe_tutorial", "generation_merge"]
    assert (
        stages["recipe_tutorial"]["status"] == "error" and "max_steps" in stages["recipe_tutorial"]["error"]
    )
    assert stages["generation_merge"]["status"] == "ok"
