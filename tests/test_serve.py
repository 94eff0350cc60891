"""``raylora serve``: two registered adapters of the demo (and one as a folder) behind the
OpenAI-compatible API on Ray Serve, called by the real ``openai`` client: each adapter's caption equals
``raylora caption``'s, 16 concurrent requests across both are answered, bad inputs are 4xx and the
server keeps answering; ``--stop`` removes the application."""

from __future__ import annotations

import base64
import io
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import COCO
from tests.test_merge import make_demo_adapter

IMAGES = sorted((COCO / "train2014").glob("*.jpg"))[:1]


def data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def ask(client, model: str, url: str | None, **extra):
    content = [{"type": "text", "text": "Provide a one-sentence caption for the provided image."}]
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        **{"max_tokens": 30, "temperature": 0, **extra},
    )


@pytest.fixture(scope="module")
def adapters(demo_root: Path, tracking_uri: str, tmp_path_factory) -> dict[str, str]:
    """Two demo adapters registered as versions 1 and 2 of one model (2 the champion), served as
    ``raylora serve --registered NAME`` names them, and version 1's folder as ``folder``."""
    from mlflow.tracking import MlflowClient

    from raylora import registry, tracking
    from raylora.config import Config
    from raylora.serve_api import registered_adapters

    root = tmp_path_factory.mktemp("serve")
    cfg = Config()
    cfg.tracking.uri, cfg.tracking.experiment = tracking_uri, "test-serve"
    _, experiment = tracking.setup(cfg)
    name = f"serve-{uuid.uuid4().hex[:6]}"
    folders = []
    for seed in (1, 2):
        folder = make_demo_adapter(demo_root / "base", root / f"seed{seed}", seed=seed, scale=0.2)
        run = MlflowClient(tracking_uri).create_run(experiment, run_name=f"seed{seed}")
        tracking.log_artifacts(run.info.run_id, folder, "adapter", tracking_uri)
        source = tracking.artifact_uri(run.info.run_id, "adapter", tracking_uri)
        registry.register_version(name, source, run.info.run_id, metric_value=float(seed))
        folders.append(folder)
    served = registered_adapters(name, tracking_uri)
    assert sorted(served) == [f"{name}/1", f"{name}/2", f"{name}@champion"]
    return {**served, "folder": str(folders[0])}


@pytest.fixture(scope="module")
def server(ray_cluster, adapters):
    from openai import OpenAI
    from ray import serve

    from raylora.config import Config
    from raylora.serve import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Config()
    cfg.serve.port, cfg.serve.cpus_per_replica, cfg.serve.dtype = port, 0.5, "fp32"
    url = start(cfg, adapters, None, log=lambda *_: None)
    yield OpenAI(base_url=url, api_key="local", max_retries=0, timeout=300)
    serve.shutdown()


def test_each_adapter_answers_the_openai_client_with_its_raylora_caption(server, adapters):
    from raylora.caption import caption_images

    listed = [m.id for m in server.models.list().data]
    assert sorted(listed) == sorted(["base", *adapters])
    images = {p: data_url(p.read_bytes()) for p in IMAGES}
    expected = {name: caption_images(spec, [str(p) for p in IMAGES]) for name, spec in adapters.items()}
    one, two, champion = sorted(n for n in adapters if n != "folder")
    assert expected[one] != expected[two]  # two different adapters
    assert expected[champion] == expected[two] and expected["folder"] == expected[one]
    for name in adapters:
        for i, p in enumerate(IMAGES):
            reply = ask(server, name, images[p])
            assert reply.choices[0].message.content == expected[name][i], (name, p.name)
            assert reply.model == name and reply.object == "chat.completion"
    jobs = [(name, 0) for name in (one, two)] * 8  # 16 concurrent requests, both adapters mixed
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: ask(server, job[0], images[IMAGES[job[1]]]), jobs))
    assert [r.choices[0].message.content for r in replies] == [expected[n][i] for n, i in jobs]


def test_bad_requests_are_4xx_and_the_server_keeps_answering(server):
    import openai
    from PIL import Image

    good = data_url(IMAGES[0].read_bytes())
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 Mpx: over PIL's decompression-bomb limit
    bad = {
        "not an image": (openai.BadRequestError, dict(model="folder", url=data_url(b"just some text bytes"))),
        "unknown model": (openai.NotFoundError, dict(model="nope", url=good)),
        "no image": (openai.BadRequestError, dict(model="folder", url=None)),
        "bomb": (openai.BadRequestError, dict(model="folder", url=data_url(bomb.getvalue(), "png"))),
        "local path": (openai.BadRequestError, dict(model="folder", url=str(IMAGES[0]))),
        "remote url": (openai.BadRequestError, dict(model="folder", url="http://127.0.0.1:9/x.jpg")),
    }
    for what, (error, kw) in bad.items():
        with pytest.raises(error) as raised:
            ask(server, kw["model"], kw["url"])
        assert 400 <= raised.value.status_code < 500, what
        assert raised.value.body["message"], what
        assert ask(server, "folder", good).choices[0].message.content, f"no answer after {what}"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer from 1 to 64"):
        ask(server, "folder", good, max_tokens=10_000)
    assert ask(server, "base", good).choices[0].message.content  # the base model, no adapter


def test_listening_beyond_this_machine_needs_an_api_key(monkeypatch, tmp_path):
    from raylora.config import ServeConfig
    from raylora.serve import api_key

    monkeypatch.delenv("RAYLORA_API_KEY", raising=False)
    assert api_key(ServeConfig()) is None  # 127.0.0.1: no key needed
    elsewhere = ServeConfig()
    elsewhere.host = "192.0.2.10"  # a documentation address (RFC 5737)
    with pytest.raises(ValueError, match="RAYLORA_API_KEY"):
        api_key(elsewhere)
    (tmp_path / "key").write_text("s3cret-key-value\n")
    elsewhere.api_key_file = str(tmp_path / "key")
    assert api_key(elsewhere) == "s3cret-key-value"


def test_serve_stop_removes_the_application(server):
    from ray import serve

    from raylora.serve import main

    assert "raylora" in serve.status().applications
    assert main(["--stop"]) == 0
    assert "raylora" not in serve.status().applications
