"""The merged champion as an MLflow Model: registered with the caption pyfunc, loaded with
``mlflow.pyfunc.load_model`` and served with ``mlflow models serve``; its captions equal
``raylora.caption``'s on the same real COCO images."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.test_merge import COCO_IMAGES, make_demo_adapter, quiet

REPO = Path(__file__).resolve().parent.parent
SERVE_TIMEOUT = 240  # seconds for `mlflow models serve` to answer /ping (imports, download, model load)


def b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


NOT_AN_IMAGE = base64.b64encode(b"Quarterly numbers, not a picture: " + bytes(range(256))).decode("ascii")
NOT_DECODABLE = "row {row}: image is not a decodable JPEG, PNG, WEBP, BMP, GIF or TIFF image (PIL: cannot identify image file)"
NO_ROWS = "no rows were given: send one row per image, in column 'image'"


def echoes_nothing(message: str) -> bool:
    """The message quotes neither the request's data nor a Python object's repr."""
    return not any(
        s in message for s in ("Quarterly", NOT_AN_IMAGE[:12], "Failed to predict data", "object at 0x")
    )


def test_a_bad_image_is_named_without_quoting_it(tmp_path: Path) -> None:
    """What a refused image is told: its row and what PIL says is wrong, not what PIL quotes of the
    input (the file object's repr, header bytes, a file name)."""
    from raylora.serving import InputError, pil_reason, read_image

    with pytest.raises(InputError) as e:
        read_image(NOT_AN_IMAGE, 3, allow_paths=False)
    assert str(e.value) == NOT_DECODABLE.format(row=3)
    truncated = Path(COCO_IMAGES[0]).read_bytes()[:3000]
    with pytest.raises(InputError) as e:
        read_image(truncated, 0, allow_paths=False)
    message = str(e.value)
    assert (
        message.startswith("row 0: image is not a decodable") and "(PIL: image file is truncated" in message
    )
    assert echoes_nothing(message) and "\\x" not in message
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(InputError) as e:
        read_image(str(text), 0, allow_paths=True)
    assert str(e.value) == NOT_DECODABLE.format(row=0)  # the file's name is not repeated either

    assert pil_reason(SyntaxError("not a TIFF file (header b'II*\\x00\\xff' not valid)")) == (
        "not a TIFF file (header not valid)"
    )
    assert pil_reason(OSError("cannot read 'secret.png': it can't be <_io.BytesIO object at 0x7f>.")) == (
        "cannot read: it can't be"
    )


def test_a_refusal_keeps_its_message() -> None:
    """MLflow's scoring server prefixes the message of an error raised by predict with the whole input
    DataFrame ("Failed to predict data '<repr>'"); the caption model's refusals keep theirs."""
    from raylora.serving import RequestError

    e = RequestError.invalid_parameter_value("row 0: no image")
    e.message = f"Failed to predict data '{NOT_AN_IMAGE}'. \nError: {e.message}"  # what the server does
    assert e.message == str(e) == "row 0: no image"
    assert json.loads(e.serialize_as_json())["message"] == "row 0: no image"
    assert e.get_http_status_code() == 400


@pytest.fixture(scope="module")
def champion(demo_root: Path, tracking_uri: str, tmp_path_factory) -> dict:
    """A demo adapter registered as champion of a fresh name, merged and registered with --register."""
    from raylora import registry, tracking
    from raylora.config import Config
    from raylora.merge import merge_adapter

    tmp = tmp_path_factory.mktemp("serving")
    cfg = Config()
    cfg.tracking.uri = tracking_uri
    cfg.tracking.experiment = "test-serving"
    _, exp_id = tracking.setup(cfg)
    adapter = make_demo_adapter(demo_root / "base", tmp / "adapter", seed=3)
    run_id = tracking.create_run(exp_id, "train", uri=tracking_uri)
    tracking.log_artifacts(run_id, adapter, "adapter", tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri)
    name = f"test-serve-{uuid.uuid4().hex[:6]}"
    registry.register_version(name, tracking.artifact_uri(run_id, "adapter"), run_id, metric_value=0.9)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYLORA_CACHE", str(tmp / "cache"))  # the adapter's download goes there
        t0 = time.time()
        report = merge_adapter(
            f"models:/{name}@champion",
            tmp / "merged",
            verify_images=COCO_IMAGES[:1],
            register=True,
            log=quiet,
        )
    print(f"merge + register with the caption model: {time.time() - t0:.1f}s")
    return {
        "name": name,
        "uri": f"models:/{name}-merged@champion",
        "merged": tmp / "merged",
        "adapter_run_id": run_id,
        "report": report,
    }


@pytest.fixture(scope="module")
def cli_captions(champion: dict) -> list[str]:
    """``python -m raylora.caption --model <merged dir> IMG IMG`` (its main, in this process)."""
    from raylora.caption import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--model", str(champion["merged"]), *COCO_IMAGES[:2]]) == 0
    lines = out.getvalue().strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == COCO_IMAGES[:2]
    return [line.split("\t", 1)[1] for line in lines]


def test_registered_as_a_pyfunc_caption_model(champion: dict, tmp_path: Path) -> None:
    import mlflow
    from PIL import Image

    from raylora import registry
    from raylora.sources import resolve_source

    reg = champion["report"]["registered"]
    assert reg["name"] == f"{champion['name']}-merged" and reg["version"] == 1 and reg["alias_moved"]
    version, tags = registry.champion(reg["name"])
    assert version == 1 and tags["raylora.kind"] == "merged" and float(tags["cider"]) == 0.9
    assert tags["adapter_model"] == champion["name"] and tags["adapter_version"] == "1"
    assert tags["adapter_run_id"] == champion["adapter_run_id"]
    assert registry.version_info(reg["name"], 1)["source"] == reg["model_uri"].rstrip("/")

    info = mlflow.models.get_model_info(champion["uri"])
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code
    assert pyfunc["config"]["allow_local_paths"] is False
    assert [c.name for c in info.signature.inputs.inputs] == ["image"]
    assert not info.signature.inputs.inputs[0].required  # predict, not MLflow, answers its absence
    assert {p.name: p.default for p in info.signature.params.params} == {
        "prompt": "Provide a one-sentence caption for the provided image.",
        "max_new_tokens": 30,
        "num_beams": 1,
    }

    local = Path(mlflow.artifacts.download_artifacts(champion["uri"], dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "serving_model.py" in files and not [f for f in files if f.endswith((".pkl", ".pickle"))]
    weights = local / pyfunc["artifacts"]["model"]["path"]
    assert (weights / "model.safetensors").read_bytes() == (
        champion["merged"] / "model.safetensors"
    ).read_bytes()
    example = json.loads((local / "input_example.json").read_text())
    assert example["inputs"]["columns"] == ["image"] and example["params"]["max_new_tokens"] == 30
    with Image.open(io.BytesIO(base64.b64decode(example["inputs"]["data"][0][0]))) as im:
        assert im.format == "JPEG" and max(im.size) <= 160
    source = resolve_source(champion["uri"], cache_dir=tmp_path / "cache")  # raylora.caption --model URI
    assert source.adapter_dir is None and (source.base_dir / "model.safetensors").is_file()


def test_pyfunc_predict_equals_caption_cli(champion: dict, cli_captions: list[str], monkeypatch) -> None:
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(champion["uri"])
    first, second = COCO_IMAGES[:2]
    mixed = pd.DataFrame({"image": [b64(first), Path(second).read_bytes()]})  # base64 and raw bytes
    assert model.predict(mixed) == cli_captions
    print(f"caption of {Path(first).name}: {cli_captions[0]!r}")

    short = model.predict(pd.DataFrame({"image": [b64(first)]}), params={"max_new_tokens": 3})[0]
    assert short and len(short) < len(cli_captions[0]) and cli_captions[0].startswith(short)

    with pytest.raises(MlflowException, match="file paths are refused.*allow_local_paths"):
        model.predict(pd.DataFrame({"image": [first]}))
    with pytest.raises(MlflowException, match="row 1: not base64-encoded image data"):
        model.predict(pd.DataFrame({"image": [b64(first), "not an image!"]}))
    with pytest.raises(MlflowException) as e:
        model.predict(pd.DataFrame({"image": [b64(first), NOT_AN_IMAGE]}))
    assert e.value.message == NOT_DECODABLE.format(row=1)
    with pytest.raises(MlflowException) as e:
        model.predict(pd.DataFrame())
    assert e.value.message == NO_ROWS
    with pytest.raises(MlflowException, match="max_new_tokens must be 1..512"):
        model.predict(pd.DataFrame({"image": [b64(first)]}), params={"max_new_tokens": 0})

    allowed = mlflow.pyfunc.load_model(champion["uri"], model_config={"allow_local_paths": True})
    assert allowed.predict(pd.DataFrame({"image": [first]})) == cli_captions[:1]
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"allow_local_paths": True}))
    assert (
        mlflow.pyfunc.load_model(champion["uri"]).predict(pd.DataFrame({"image": [first]}))
        == cli_captions[:1]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def mlflow_serve(model_uri: str, log: Path, env: dict[str, str]):
    """``mlflow models serve`` in its own process group; yields its base URL once /ping answers."""
    port = _free_port()
    cmd = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVE_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "no /ping answer"
                pytest.fail(
                    f"mlflow models serve: {state} after {SERVE_TIMEOUT}s; output:\n{log.read_text()[-5000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the uvicorn server it starts
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_mlflow_models_serve(
    champion: dict, cli_captions: list[str], tracking_uri: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_PYFUNC_INFERENCE_CONFIG", None)
    first = COCO_IMAGES[0]
    t0 = time.time()
    with mlflow_serve(champion["uri"], tmp_path / "serve.log", env) as url:
        started = time.time() - t0
        status, body = _post(
            f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[b64(first)]]}}
        )
        assert status == 200, body
        assert body["predictions"] == cli_captions[:1]

        records = {"dataframe_records": [{"image": b64(first)}], "params": {"max_new_tokens": 3}}
        status, body = _post(f"{url}/invocations", records)
        assert status == 200, body
        short = body["predictions"][0]
        assert short and len(short) < len(cli_captions[0]) and cli_captions[0].startswith(short)

        status, body = _post(
            f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[first]]}}
        )
        assert status == 400 and "allow_local_paths" in body["message"], body
        assert echoes_nothing(body["message"]), body

        # a bad image: its row and what is wrong, not the request's bytes or an object's repr
        bad = {"dataframe_split": {"columns": ["image"], "data": [[b64(first)], [NOT_AN_IMAGE]]}}
        status, body = _post(f"{url}/invocations", bad)
        assert status == 400 and body["message"] == NOT_DECODABLE.format(row=1), body
        # no rows: said so (MLflow would answer "Model is missing inputs ['image']")
        status, body = _post(f"{url}/invocations", {"dataframe_records": []})
        assert status == 400 and body["message"] == NO_ROWS, body
        status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": []}})
        assert status == 400 and body["message"] == NO_ROWS, body

        status, body = _post(f"{url}/invocations", records)  # still serving
        assert status == 200 and body["predictions"] == [short], body
    print(
        f"mlflow models serve answered /ping after {started:.1f}s; 7 requests in {time.time() - t0 - started:.1f}s"
    )
