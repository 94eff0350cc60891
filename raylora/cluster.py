"""The Ray cluster a command runs on: connect to one (``cluster.address`` / ``RAY_ADDRESS``) or
start a local one, with the environment every Ray process of raylora needs.

A local cluster's dashboard listens on 127.0.0.1 only, and Ray's token authentication (on by
default for a new local cluster since Ray 2.60) is left alone: raylora never sets ``RAY_AUTH_MODE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raylora.config import Config
from raylora.files import redact

# ray is imported inside the functions: it takes seconds, and config errors should not wait for it.


def runtime_env() -> dict[str, Any]:
    """Environment for every Ray process: a persistent DeepSpeed op cache, quiet tokenizers."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 would tee every worker print through its logger (shown twice)
    env = {
        "TORCH_EXTENSIONS_DIR": extensions,
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    for key in ("RAYLORA_CACHE", "MLFLOW_TRACKING_URI", "HF_HOME"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {"env_vars": env}


def local_cluster_options(cfg: Config) -> dict[str, Any]:
    """``ray.init`` keywords for a new local cluster: its size and a dashboard on localhost only."""
    return {
        "num_cpus": cfg.cluster.num_cpus,
        "object_store_memory": cfg.cluster.object_store_memory,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",  # Ray's default too; written here so that it stays visible
    }


def init_ray(cfg: Config) -> None:
    """Connect to ``cluster.address`` / RAY_ADDRESS, or start a local cluster; print the dashboard URL."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(), "log_to_driver": True}
    if address is None:
        kwargs.update(local_cluster_options(cfg))
    ctx = ray.init(address=address, **kwargs)
    url = getattr(ctx, "dashboard_url", None)
    print(
        f"[ray] cluster {'at ' + redact(address) if address else 'started locally'}; dashboard: http://{url}"
        if url
        else "[ray] connected",
        flush=True,
    )
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("[ray] token authentication is off (RAY_AUTH_MODE=disabled in the environment)", flush=True)
