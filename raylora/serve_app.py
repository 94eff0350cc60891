"""The Ray Serve application of ``raylora serve``: an OpenAI-compatible HTTP API (FastAPI ingress) in
front of replicas that each hold one base model and load adapters on demand
(:class:`raylora.serve_api.CaptionReplica`). Concurrent requests are batched across clients and
adapters (``@serve.batch``; ``serve.max_batch_size``, ``serve.batch_wait_timeout_s``). Metrics (Ray
metrics, on the dashboard's Serve view and in the Prometheus export): ``raylora_serve_requests``
(by model and HTTP status), ``raylora_serve_latency_ms`` (by model).

No ``from __future__ import annotations`` here: FastAPI reads the routes' parameter types at run time
(a postponed ``Request`` annotation makes every route answer 422).
"""

import asyncio
import hmac
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics

from raylora.config import ServeConfig
from raylora.serve_api import APIError, CaptionReplica, CaptionRequest, completion, parse_chat_request

APP_NAME = "raylora"
api = FastAPI(title="raylora", description="Captions from every adapter of one base model (OpenAI API)")


@serve.deployment(name="CaptionServer")
@serve.ingress(api)
class CaptionServer:
    def __init__(self, base: str, adapters: dict[str, str], cfg: ServeConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.replica = CaptionReplica(base, adapters, cfg)
        self.caption_batch.set_max_batch_size(cfg.max_batch_size)
        self.caption_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.requests = metrics.Counter(
            "raylora_serve_requests", description="chat completions answered", tag_keys=("model", "status")
        )
        self.latency = metrics.Histogram(
            "raylora_serve_latency_ms",
            description="chat completion latency",
            boundaries=[10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
            tag_keys=("model",),
        )

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def _refuse(self, e: APIError, model: str = "") -> JSONResponse:
        self.requests.inc(tags={"model": model or "-", "status": str(e.status)})
        return JSONResponse(e.body(), status_code=e.status)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return self._refuse(APIError(401, "a valid API key is required (Authorization: Bearer KEY)"))
        now = int(time.time())
        data = [
            {"id": m, "object": "model", "created": now, "owned_by": "raylora"} for m in self.replica.models()
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        if not self._authorized(request):
            return self._refuse(APIError(401, "a valid API key is required (Authorization: Bearer KEY)"))
        body: Any = None
        try:
            raw = await request.body()
            if len(raw) > self.cfg.max_image_bytes * 4 // 3 + (1 << 20):
                raise APIError(413, "the request is too large (serve.max_image_bytes)")
            try:
                body = json.loads(raw)
            except ValueError:
                raise APIError(400, "the request body is not JSON") from None
            parsed = parse_chat_request(body, self.cfg, self.replica.models())
            result = await self.caption_batch(parsed)
            if isinstance(result, APIError):
                raise result
        except APIError as e:
            return self._refuse(e, str(body.get("model", "")) if isinstance(body, dict) else "")
        caption, tokens = result
        self.requests.inc(tags={"model": parsed.model, "status": "200"})
        self.latency.observe((time.perf_counter() - t0) * 1000, tags={"model": parsed.model})
        return JSONResponse(completion(parsed, caption, tokens))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def caption_batch(self, requests: list[CaptionRequest]) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self.replica.caption, requests)


def application(base: str, adapters: dict[str, str], cfg: ServeConfig, api_key: str | None) -> Any:
    """The bound application: replicas, autoscaling and resources from ``cfg``."""
    import os

    # the replicas resolve models:/ URIs and cache downloads as this process would
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "RAYLORA_CACHE", "HF_HOME") if os.environ.get(k)}
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": cfg.cpus_per_replica,
            "num_gpus": cfg.gpus_per_replica,
            "runtime_env": {"env_vars": env},
        },
        "max_ongoing_requests": max(16, cfg.max_batch_size * 2),
    }
    if cfg.max_replicas > 0:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.max_batch_size,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return CaptionServer.options(**options).bind(base, adapters, cfg, api_key)
