"""Security defaults: what raylora starts listens on localhost, Ray's token authentication stays on,
no remote code runs, pickled weights load with ``weights_only=True`` only, and credentials in URIs
never reach MLflow params, tags or the console."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from raylora.config import Config
from raylora.files import redact

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = [REPO / "raylora", REPO / "scripts"]
TEXT_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".json", ".toml", ".cfg", ".txt", ".md", ".jinja"}


def _files(*suffixes: str) -> list[Path]:
    wanted = set(suffixes) or TEXT_SUFFIXES
    found = [p for d in SOURCE_DIRS for p in sorted(d.rglob("*")) if p.is_file() and p.suffix in wanted]
    assert found, f"no {wanted} files under {SOURCE_DIRS}"
    return found


def _python_trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in _files(".py")]


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"


# ------------------------------------------------------------------------ what listens where (Ray)


def test_local_cluster_dashboard_listens_on_localhost_and_nothing_disables_auth() -> None:
    from raylora.cluster import local_cluster_options

    cfg = Config()
    cfg.cluster.num_cpus, cfg.cluster.object_store_memory = 3, 1 << 29
    options = local_cluster_options(cfg)
    assert options["dashboard_host"] == "127.0.0.1"
    assert options["include_dashboard"] is True
    assert (options["num_cpus"], options["object_store_memory"]) == (3, 1 << 29)
    # no Ray system config or environment that could turn token authentication off
    assert not {k for k in options if "auth" in k.lower() or "system_config" in k or "env" in k}


def _fake_ray_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``ray.init`` by a recorder (no cluster is started); returns the recorded calls."""
    import ray

    calls: list[dict[str, Any]] = []

    class Context:
        dashboard_url = "127.0.0.1:8265"

    def init(address: str | None = None, **kwargs: Any) -> Context:
        calls.append({"address": address, **kwargs})
        return Context()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def test_init_ray_starts_a_local_cluster_with_those_options_and_leaves_auth_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from raylora.cluster import init_ray, local_cluster_options

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    calls = _fake_ray_init(monkeypatch)
    cfg = Config()
    init_ray(cfg)
    (call,) = calls
    assert call["address"] == "local"  # a new cluster, never a `ray start` one found on the machine
    assert {k: call[k] for k in local_cluster_options(cfg)} == local_cluster_options(cfg)
    assert call["dashboard_host"] == "127.0.0.1"
    assert "RAY_AUTH_MODE" not in call["runtime_env"]["env_vars"]
    assert "_system_config" not in call
    import os

    assert os.environ.get("RAY_AUTH_MODE", "token") == "token"  # never turned off by raylora
    assert "dashboard: http://127.0.0.1:8265" in capsys.readouterr().out


def test_init_ray_connecting_prints_the_address_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from raylora.cluster import init_ray

    calls = _fake_ray_init(monkeypatch)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's own choice: kept, and said
    cfg = Config()
    cfg.cluster.address = "ray://alice:s3cret@head.example.com:10001"
    init_ray(cfg)
    assert calls[0]["address"] == cfg.cluster.address and "dashboard_host" not in calls[0]
    out = capsys.readouterr().out
    assert "ray://alice:***@head.example.com:10001" in out and "s3cret" not in out
    assert "token authentication is off" in out


def test_runtime_env_never_carries_the_auth_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from raylora.cluster import runtime_env

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not any("AUTH" in k for k in runtime_env()["env_vars"])


def test_nothing_binds_to_every_interface() -> None:
    wildcard = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _files()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "0.0.0.0" in line
    ]
    assert not wildcard, wildcard
    loopback = {"127.0.0.1", "localhost", "::1"}
    bad = []
    for path, tree in _python_trees():
        for node in ast.walk(tree):
            pairs: list[tuple[str, ast.AST]] = []
            if isinstance(node, ast.keyword) and node.arg:
                pairs.append((node.arg, node.value))
            elif isinstance(node, ast.Dict):
                pairs += [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
            for name, value in pairs:
                if not (isinstance(name, str) and (name == "host" or name.endswith("_host"))):
                    continue
                if path.name == "serve.py" and ast.unparse(value) == "s.host":
                    continue  # serve.host: 127.0.0.1 by default, elsewhere only with an API key (below)
                if not (isinstance(value, ast.Constant) and value.value in loopback):
                    bad.append(f"{_where(path, value)} {name}={ast.unparse(value)}")
    assert not bad, bad


def test_raylora_serve_binds_loopback_unless_told_and_then_needs_a_key(monkeypatch) -> None:
    """The one configurable bind address (``serve.host``): 127.0.0.1 by default; any other needs an
    API key (tests/test_serve.py checks the key is asked for)."""
    from raylora.config import ServeConfig
    from raylora.serve import api_key, http_options

    assert http_options(ServeConfig())["host"] == "127.0.0.1"
    monkeypatch.delenv("RAYLORA_API_KEY", raising=False)
    elsewhere = ServeConfig()
    elsewhere.host = "192.0.2.10"  # a documentation address (RFC 5737)
    with pytest.raises(ValueError, match="RAYLORA_API_KEY"):
        api_key(elsewhere)


def test_every_ray_init_keeps_the_dashboard_on_localhost() -> None:
    """A ``ray.init`` that starts a cluster has no dashboard or one on 127.0.0.1 (``init_ray``'s own
    call passes ``local_cluster_options``, checked above)."""
    calls = [
        (path, node)
        for path, tree in _python_trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "ray.init"
    ]
    assert len(calls) >= 3  # raylora.cluster and the benchmarks
    bad = []
    for path, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        if None in kw:  # ray.init(**options): raylora.cluster.init_ray
            continue
        off = isinstance(kw.get("include_dashboard"), ast.Constant) and kw["include_dashboard"].value is False
        local = (
            isinstance(kw.get("dashboard_host"), ast.Constant) and kw["dashboard_host"].value == "127.0.0.1"
        )
        if not (off or local):
            bad.append(_where(path, call))
    assert not bad, bad


def _auth_mode_writes(tree: ast.Module) -> list[ast.AST]:
    """Places that set RAY_AUTH_MODE to anything but "token" (turning authentication on is fine):
    environ[...] = ..., setdefault/putenv/update, env dict keys."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            key = node.slice
            if isinstance(key, ast.Constant) and key.value == "RAY_AUTH_MODE":
                found.append(node)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in {"setdefault", "putenv"}:
            token = (
                len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "token"
            )
            if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "RAY_AUTH_MODE":
                if not token:
                    found.append(node)
        elif isinstance(node, ast.Dict):
            found += [k for k in node.keys if isinstance(k, ast.Constant) and k.value == "RAY_AUTH_MODE"]
        elif isinstance(node, ast.keyword) and node.arg == "RAY_AUTH_MODE":  # dict(RAY_AUTH_MODE=...)
            found.append(node)
    return found


def test_raylora_never_turns_ray_auth_off() -> None:
    probe = ast.parse(
        "os.environ['RAY_AUTH_MODE'] = 'disabled'\nos.environ.setdefault('RAY_AUTH_MODE', 'disabled')\n"
        "env = {'RAY_AUTH_MODE': 'disabled'}\nenv.update(RAY_AUTH_MODE='disabled')\n"
    )
    assert len(_auth_mode_writes(probe)) == 4  # the check sees each way of setting it
    bad = [_where(p, n) for p, tree in _python_trees() for n in _auth_mode_writes(tree)]
    bad += [
        f"{p.relative_to(REPO)}:{i}"
        for p in _files(".sh", ".yaml", ".yml", ".json", ".toml")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"RAY_AUTH_MODE\s*[=:]\s*(?!token\b)", line)
    ]
    assert not bad, bad


# ------------------------------------------------------------------------------------ no remote code


def _truthy_remote_code(tree: ast.Module) -> list[ast.AST]:
    """``trust_remote_code`` given anything but a literal False/None (keyword or dict entry)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            value = node.value
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code":
                    if not (isinstance(v, ast.Constant) and not v.value):
                        found.append(v)
            continue
        elif isinstance(node, ast.Assign) and any(
            getattr(t, "id", getattr(t, "attr", None)) == "trust_remote_code" for t in node.targets
        ):
            value = node.value
        else:
            continue
        if not (isinstance(value, ast.Constant) and not value.value):
            found.append(value)
    return found


REMOTE_CODE_TEXT = re.compile(r"trust[_-]remote[_-]code\s*[=:]?\s*(true|1|yes)\b|--trust-remote-code", re.I)


def test_no_remote_code_anywhere() -> None:
    probe = ast.parse(
        "f(x, trust_remote_code=True)\nf(trust_remote_code = 1)\nf(**{'trust_remote_code': True})\n"
        "trust_remote_code = True\nf(trust_remote_code=flag)\nf(trust_remote_code=False)\n"
    )
    assert len(_truthy_remote_code(probe)) == 5  # all but the literal False
    assert REMOTE_CODE_TEXT.search("trust_remote_code: true") and REMOTE_CODE_TEXT.search(
        "--trust-remote-code"
    )
    bad = [_where(p, n) for p, tree in _python_trees() for n in _truthy_remote_code(tree)]
    bad += [
        f"{p.relative_to(REPO)}:{i}"
        for p in _files(*(TEXT_SUFFIXES - {".py"}))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if REMOTE_CODE_TEXT.search(line)
    ]
    assert not bad, bad


def test_every_torch_load_is_weights_only() -> None:
    calls = []
    for path, tree in _python_trees():
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and "torch" in ast.unparse(func.value):
                calls.append((path, node))
    assert any(p.name == "convert.py" for p, _ in calls)  # the check sees the converter's loads
    unsafe = [
        _where(p, n)
        for p, n in calls
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in n.keywords
        )
    ]
    assert not unsafe, unsafe


# ---------------------------------------------------- a malicious pytorch_model.bin is refused


def _plant_marker(path: str) -> None:
    """What the malicious pickle calls when it is unpickled: it leaves a file behind."""
    Path(path).write_text("this ran while unpickling a checkpoint")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_plant_marker, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_bin_checkpoint_is_refused_before_any_code_runs(
    tmp_path: Path, zip_format: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from raylora import convert
    from tests.test_convert import build_native, write_original_checkpoint

    src, marker = tmp_path / "orig", tmp_path / "pwned"
    write_original_checkpoint(src, build_native("qwen2", vit_6b=False, seed=3), "qwen2", False, "bin")
    shard = src / "pytorch_model-00001-of-00002.bin"
    weights = torch.load(shard, weights_only=True)
    evil = {**weights, "language_model.model.norm.extra": _Payload(marker)}
    torch.save(evil, shard, _use_new_zipfile_serialization=zip_format)

    torch.load(shard, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.is_file()
    marker.unlink()

    with pytest.raises(convert.ConversionError, match=r"refused to load: its pickle holds more than tensors"):
        convert.convert_checkpoint(src, tmp_path / "native")
    assert not marker.exists()
    assert not (tmp_path / "native").exists()
    assert convert.main([str(src), str(tmp_path / "native-cli")]) == 1
    err = capsys.readouterr().err
    assert "_plant_marker" in err and "safetensors" in err  # names what it found and what to use
    assert not marker.exists()


# --------------------------------------------------------------------------- credentials are redacted


@pytest.mark.parametrize(
    "value, expected",
    [
        ("http://mlflow.example.com:5000", "http://mlflow.example.com:5000"),  # no userinfo
        ("https://alice@mlflow.example.com/x", "https://alice@mlflow.example.com/x"),  # user only
        ("https://alice:s3cret@mlflow.example.com", "https://alice:***@mlflow.example.com"),
        ("http://alice:s3cret@10.0.0.5:5000/api", "http://alice:***@10.0.0.5:5000/api"),  # with a port
        ("http://host:5000/runs/a@b", "http://host:5000/runs/a@b"),  # a port, then '@' in the path
        ("http://alice:s3cret@[fd00::2]:5000/x", "http://alice:***@[fd00::2]:5000/x"),  # IPv6 host
        ("http://[fd00::2]:5000/a@b", "http://[fd00::2]:5000/a@b"),
        ("s3://KEY:SECRET@bucket/x", "s3://KEY:***@bucket/x"),
        ("s3://AKIA:ab/cd+ef@bucket/x", "s3://AKIA:***@bucket/x"),  # a secret with an unencoded '/'
        ("http://u:p%40ss@h/x", "http://u:***@h/x"),
        ("ray://alice:s3cret@head:10001", "ray://alice:***@head:10001"),
        (
            "postgresql://mlflow:pw@db/mlflow?sslmode=require",
            "postgresql://mlflow:***@db/mlflow?sslmode=require",
        ),
        ("https://h/x?token=abc&lr=1", "https://h/x?token=***&lr=1"),  # query strings
        ("https://h/x?api_key=abc;page=2#top", "https://h/x?api_key=***;page=2#top"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&versionId=3",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&versionId=3",
        ),
        (
            "https://acct.blob.core.windows.net/c?sv=2022&sig=abc&Password=x",
            "https://acct.blob.core.windows.net/c?sv=2022&sig=***&Password=***",
        ),
        ("/data/me@host/coco/train.jsonl", "/data/me@host/coco/train.jsonl"),  # a plain path with '@'
        ("sqlite:////home/me/mlflow/mlflow.db", "sqlite:////home/me/mlflow/mlflow.db"),
        ("models:/raylora-coco-lora@champion", "models:/raylora-coco-lora@champion"),
        ("runs:/0123abcd/adapter", "runs:/0123abcd/adapter"),
        ("['s3://k:v@b/x', 'http://u:p@h']", "['s3://k:***@b/x', 'http://u:***@h']"),  # URIs in a text
        ("AWS_SECRET_ACCESS_KEY=abc HF_TOKEN=xyz", "AWS_SECRET_ACCESS_KEY=*** HF_TOKEN=***"),
        ("data.max_packed_tokens=2048", "data.max_packed_tokens=2048"),
        ("4e-05", "4e-05"),
        ("", ""),
    ],
)
def test_redact(value: str, expected: str) -> None:
    assert redact(value) == expected


def test_redact_hides_the_values_of_secret_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_0123456789abcdef")
    monkeypatch.setenv("MONKEY_PATH", "/opt/monkey/path")  # not a secret's name
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "short")  # too short to hide everywhere
    text = "pretrained/hf_0123456789abcdef/x /opt/monkey/path short"
    assert redact(text) == "pretrained/***/x /opt/monkey/path short"


CREDENTIALED = {
    "tracking.uri": "https://alice:s3cret@mlflow.example.com:5000/?token=abc",
    "cluster.address": "ray://alice:s3cret@head.example.com:10001?token=abc",
    "cluster.storage_path": "s3://alice:s3cret@bucket.example.com/runs?token=abc",
}


def test_params_and_tags_in_the_store_carry_no_credentials(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from raylora import registry, tracking

    cfg = Config()
    cfg.tracking.uri = CREDENTIALED["tracking.uri"]
    cfg.cluster.address = CREDENTIALED["cluster.address"]
    cfg.cluster.storage_path = CREDENTIALED["cluster.storage_path"]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment_id = client.create_experiment("security", artifact_location=(tmp_path / "a").as_uri())
    run_dir = f"{cfg.cluster.storage_path}/demo"
    tags = {"run_dir": run_dir, "tracking": cfg.tracking.uri, "base_model": "s3://KEY:s3cret@bucket/model"}
    run_id = tracking.create_run(experiment_id, "demo", tags=tags, params=cfg.flat(), uri=store)
    version, _ = registry.register_version(
        "security-lora", (tmp_path / "a").as_uri(), run_id, tags=tags, metric_value=1.0, tracking_uri=store
    )

    run = client.get_run(run_id)
    stored = {**run.data.params, **{f"tag:{k}": v for k, v in run.data.tags.items()}}
    stored.update(
        {f"version:{k}": v for k, v in client.get_model_version("security-lora", version).tags.items()}
    )
    assert set(cfg.flat()) <= set(run.data.params)
    leaks = {k: v for k, v in stored.items() if "s3cret" in v or "abc" in v}
    assert not leaks, leaks
    # still readable: who and where
    assert run.data.params["tracking.uri"] == "https://alice:***@mlflow.example.com:5000/?token=***"
    assert run.data.params["cluster.address"] == "ray://alice:***@head.example.com:10001?token=***"
    assert run.data.params["cluster.storage_path"] == "s3://alice:***@bucket.example.com/runs?token=***"
    # a query value runs to the end of the URI (or a '#'): the run name after it goes with it
    assert run.data.tags["run_dir"] == "s3://alice:***@bucket.example.com/runs?token=***"
    assert stored["version:base_model"] == "s3://KEY:***@bucket/model"


def test_printed_tracking_uris_carry_no_credentials() -> None:
    from raylora import tracking

    uri = CREDENTIALED["tracking.uri"]
    shown = [
        tracking.run_url(uri, "1", "r1"),
        tracking.run_web_url("https://alice:s3cret@mlflow.example.com:5000", "1", "r1"),
        tracking.ui_command("postgresql://mlflow:s3cret@db/mlflow?password=abc"),
        tracking.run_url("postgresql://mlflow:s3cret@db/mlflow", "1", "r1"),
    ]
    assert shown[1] == "https://alice:***@mlflow.example.com:5000/#/experiments/1/runs/r1"
    assert "mlflow ui --backend-store-uri postgresql://mlflow:***@db/mlflow?password=***" == shown[2]
    assert not [s for s in shown if "s3cret" in s or "abc" in s], shown
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking("http://alice:s3cret@127.0.0.1:9/?token=abc")  # nothing listens on port 9
    assert "alice:***@127.0.0.1:9" in str(e.value) and "s3cret" not in str(e.value)


def test_tracking_server_check_sends_the_uri_credentials_as_basic_auth() -> None:
    """MLflow's client accepts ``https://user:password@host``; the pre-flight health check does too."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from raylora import tracking

    seen: list[tuple[str, str | None]] = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"alice:s3cret/+").decode()
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        tracking.check_tracking(f"http://alice:s3cret%2F%2B@127.0.0.1:{port}/")
        assert seen[-1][0] == "/health"
        with pytest.raises(RuntimeError, match="401") as e:
            tracking.check_tracking(f"http://alice:wrong-pw@127.0.0.1:{port}")
        assert "alice:***@127.0.0.1" in str(e.value) and "wrong-pw" not in str(e.value)
        tracking.check_tracking(f"http://alice:s3cret%2F%2B@127.0.0.1:{port}/mlflow?x=1")
        assert seen[-1][0] == "/mlflow/health?x=1"
    finally:
        server.shutdown()
        server.server_close()


def test_redact_survives_a_thread_changing_the_environment() -> None:
    """MLflow's telemetry thread set and unset a variable while redact iterated os.environ
    (KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'): redaction reads a snapshot."""
    import threading

    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            name = f"RAYLORA_TEST_CHURN_{i % 50}"
            os.environ[name] = "x" * 16
            os.environ.pop(name, None)
            i += 1

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(20000):
            assert redact("https://alice:pw@host/x") == "https://alice:***@host/x"
    finally:
        stop.set()
        thread.join()


def test_telemetry_is_off_unless_the_user_opts_in() -> None:
    """MLflow's telemetry, Ray's usage stats and the hub's telemetry are switched off, through each
    library's own switch, in raylora's processes and its Ray processes; RAYLORA_TELEMETRY=1 opts in,
    DO_NOT_TRACK always wins, a value the user set stays."""
    code = (
        "import json, os, raylora\n"
        "from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY\n"
        "from raylora.cluster import runtime_env\n"
        "print(json.dumps({'mlflow': MLFLOW_DISABLE_TELEMETRY.get(),"
        " 'ray': os.environ.get('RAY_USAGE_STATS_ENABLED'), 'hub': os.environ.get('HF_HUB_DISABLE_TELEMETRY'),"
        " 'workers': runtime_env()['env_vars'].get('MLFLOW_DISABLE_TELEMETRY')}))"
    )
    switches = ("MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED", "HF_HUB_DISABLE_TELEMETRY")

    def probe(**env: str) -> dict:
        base = {
            k: v for k, v in os.environ.items() if k not in (*switches, "DO_NOT_TRACK", "RAYLORA_TELEMETRY")
        }
        out = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert probe() == {"mlflow": True, "ray": "0", "hub": "1", "workers": "true"}
    assert probe(RAYLORA_TELEMETRY="1") == {"mlflow": False, "ray": None, "hub": None, "workers": None}
    assert probe(RAYLORA_TELEMETRY="1", DO_NOT_TRACK="1")["workers"] == "true"
    assert probe(MLFLOW_DISABLE_TELEMETRY="false")["workers"] == "false"
