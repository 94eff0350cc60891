"""``raylora serve``: two adapters of the demo (one a folder, one from the MLflow registry) behind the
OpenAI-compatible API on Ray Serve, called by the real ``openai`` client: each adapter's caption equals
``raylora caption``'s, 16 concurrent requests across both are answered, bad inputs are 4xx and the
server keeps answering."""

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
    """Adapter ``a``: a folder; adapter ``b``: registered, served as models:/NAME@champion."""
    from mlflow.tracking import MlflowClient

    from raylora import registry, tracking
    from raylora.config import Config

    root = tmp_path_factory.mktemp("serve")
    a = make_demo_adapter(demo_root / "base", root / "a", seed=1, scale=0.2)
    b = make_demo_adapter(demo_root / "base", root / "b", seed=2, scale=0.2)
    cfg = Config()
    cfg.tracking.uri, cfg.tracking.experiment = tracking_uri, "test-serve"
    _, experiment = tracking.setup(cfg)
    run = MlflowClient(tracking_uri).create_run(experiment, run_name="b")
    tracking.log_artifacts(run.info.run_id, b, "adapter", tracking_uri)
    name = f"serve-{uuid.uuid4().hex[:6]}"
    registry.register_version(
        name,
        tracking.artifact_uri(run.info.run_id, "adapter", tracking_uri),
        run.info.run_id,
        metric_value=1.0,
    )
    return {"a": str(a), "b": f"models:/{name}@champion"}


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

    listed = {m.id for m in server.models.list().data}
    assert {"a", "b", "base"} <= listed
    images = {p: data_url(p.read_bytes()) for p in IMAGES}
    expected = {name: caption_images(spec, [str(p) for p in IMAGES]) for name, spec in adapters.items()}
    assert expected["a"] != expected["b"]  # two different adapters
    for name in adapters:
        for i, p in enumerate(IMAGES):
            reply = ask(server, name, images[p])
            assert reply.choices[0].message.content == expected[name][i], (name, p.name)
            assert reply.model == name and reply.object == "chat.completion"
    jobs = [(name, 0) for name in adapters] * 8  # 16 concurrent requests, both adapters mixed
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
        "not an image": (openai.BadRequestError, dict(model="a", url=data_url(b"just some text bytes"))),
        "unknown model": (openai.NotFoundError, dict(model="nope", url=good)),
        "no image": (openai.BadRequestError, dict(model="a", url=None)),
        "bomb": (openai.BadRequestError, dict(model="a", url=data_url(bomb.getvalue(), "png"))),
        "local path": (openai.BadRequestError, dict(model="a", url=str(IMAGES[0]))),
        "remote url": (openai.BadRequestError, dict(model="a", url="http://127.0.0.1:9/x.jpg")),
    }
    for what, (error, kw) in bad.items():
        with pytest.raises(error) as raised:
            ask(server, kw["model"], kw["url"])
        assert 400 <= raised.value.status_code < 500, what
        assert raised.value.body["message"], what
        assert ask(server, "a", good).choices[0].message.content, f"no answer after {what}"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer from 1 to 64"):
        ask(server, "a", good, max_tokens=10_000)
    assert ask(server, "base", good).choices[0].message.content  # the base model, no adapter


def test_listening_beyond_this_machine_needs_an_api_key(monkeypatch, tmp_path):
    from raylora.config import ServeConfig
    from raylora.serve import api_key

    monkeypatch.delenv("RAYLORA_API_KEY", raising=False)
    assert api_key(ServeConfig()) is None  # 127.0.0.1: no key needed
    with pytest.raises(ValueError, match="RAYLORA_API_KEY"):
        api_key(ServeConfig(host="0.0.0.0"))
    (tmp_path / "key").write_text("s3cret-key-value\n")
    assert api_key(ServeConfig(host="0.0.0.0", api_key_file=str(tmp_path / "key"))) == "s3cret-key-value"
