"""The Ray cluster a command runs on: connect to one (``cluster.address`` / ``RAY_ADDRESS``) or
start a local one, with the environment every Ray process of raylora needs; and the preflight
checks that answer in seconds, before any model loads, what would otherwise fail an hour in (or
wait forever): a job larger than the cluster, storage the nodes do not share, an embedded MLflow
store on a multi-node cluster.

A local cluster's dashboard listens on 127.0.0.1 only. Ray's token authentication (on by default for
a new local cluster since Ray 2.60) stays on: raylora never disables it, and when it connects to an
existing cluster with a token at hand (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or
``RAY_AUTH_TOKEN``) it sends it, unless the environment sets ``RAY_AUTH_MODE`` itself.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylora.config import Config
from raylora.console import quiet_env, verbose
from raylora.files import read_text, redact, remove_dir, write_text
from raylora.monitoring import state_tracking_env
from raylora.telemetry import telemetry_env

# ray is imported inside the functions: it takes seconds, and config errors should not wait for it.


STORE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)


def runtime_env() -> dict[str, Any]:
    """Environment for every Ray process: a persistent DeepSpeed op cache, quiet tokenizers, Ray
    Train's state tracking (the dashboard's Train view; also for a sweep trial's trainer), the
    console's verbosity (raylora.console)."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 would tee every worker print through its logger (shown twice)
    env = {
        "TORCH_EXTENSIONS_DIR": extensions,
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **state_tracking_env(),
        **quiet_env(),
        **telemetry_env(),  # nothing sent home from the workers either (raylora.telemetry)
    }
    # object storage's endpoint and region (never its credentials: nodes bring their own, from their
    # environment or instance role)
    for key in ("RAYLORA_CACHE", "MLFLOW_TRACKING_URI", "HF_HOME", *STORE_ENV):
        if os.environ.get(key):
            env[key] = os.environ[key]
    # Every Ray process connects its own subprocesses and Ray's state API calls to this cluster, not
    # to whichever one it finds (Ray Train's placement-group cleaner otherwise stops on "Found
    # multiple active Ray instances" when two clusters run on one machine, and leaks the group).
    return {"env_vars": env, "worker_process_setup_hook": _pin_ray_address()}


def _pin_ray_address() -> Callable[[], None]:
    """Ray's ``worker_process_setup_hook``: ``RAY_ADDRESS`` is the cluster this worker belongs to.
    A closure, so Ray ships it by value: it runs before a worker can import raylora."""

    def pin_ray_address() -> None:
        import os

        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    return pin_ray_address


def local_cluster_options(cfg: Config) -> dict[str, Any]:
    """``ray.init`` keywords for a new local cluster: its size and a dashboard on localhost only."""
    return {
        "num_cpus": cfg.cluster.num_cpus,
        "object_store_memory": cfg.cluster.object_store_memory,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",  # Ray's default too; written here so that it stays visible
    }


def token_available() -> bool:
    """A Ray authentication token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ~/.ray)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def token_auth_on() -> bool:
    """This process talks to Ray with token authentication (``RAY_AUTH_MODE``, else Ray's own mode)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # a Ray without token authentication
        return False
    return is_token_auth_enabled()


def dashboard_line(url: str, address: str | None) -> str:
    """The line that names the cluster and its dashboard, and how to get in (never the token)."""
    where = "at " + redact(address) if address else "started locally"
    login = " (it asks for a token: paste what `ray get-auth-token` prints)" if token_auth_on() else ""
    return f"[ray] cluster {where}; dashboard: http://{url}{login}"


def use_token_auth() -> None:
    """Connecting to an existing cluster, Ray turns token authentication on only for a cluster it
    found by itself: with a token at hand (and RAY_AUTH_MODE unset), turn it on here too, the way
    Ray does (it sets RAY_AUTH_MODE=token and refreshes its cached config)."""
    if not token_available() or "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def console_options() -> dict[str, Any]:
    """``ray.init`` keywords for the console: by default the workers' output stays in their log files
    (the Ray session's ``logs/`` folder; training progress reaches the driver through its own channel,
    errors as exceptions) and Ray's driver-side logging shows warnings and errors only; ``--verbose``
    streams every worker's output to the console, Ray's defaults."""
    if verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def init_ray(cfg: Config) -> None:
    """Connect to ``cluster.address`` / RAY_ADDRESS, or start a local cluster; print the dashboard URL
    and how to authenticate there."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env(), **console_options()}
    if address is None:  # "local": a new cluster, even when a `ray start` one runs on this machine
        kwargs.update(local_cluster_options(cfg))
    else:
        use_token_auth()
    ctx = ray.init(address=address or "local", **kwargs)
    url = getattr(ctx, "dashboard_url", None)
    print(dashboard_line(url, address) if url else "[ray] connected", flush=True)
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("[ray] token authentication is off (RAY_AUTH_MODE=disabled in the environment)", flush=True)


# ---------------------------------------------------------------------------------------- preflight


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def validation_resources(cfg: Config) -> dict[str, float]:
    """What the asynchronous validation task of a run takes (none when validation is inline or off)."""
    e = cfg.eval
    if e.validation != "async" or e.every_n_steps < 0 or not cfg.data.val:
        return {"CPU": 0.0, "GPU": 0.0}
    return {"CPU": e.validation_cpus, "GPU": e.validation_gpus}


def job_resources(cfg: Config) -> tuple[dict[str, float], dict[str, float]]:
    """(one training worker's bundle, the whole job's need): each worker with its decode actors, and
    the validation task."""
    c = cfg.cluster
    bundle = {"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker if c.use_gpu else 0.0}
    per_worker_cpu = c.cpus_per_worker + cfg.data.decode_actors * cfg.data.decode_cpus
    validation = validation_resources(cfg)
    total = {
        "CPU": c.num_workers * per_worker_cpu + validation["CPU"],
        "GPU": c.num_workers * bundle["GPU"] + validation["GPU"],
    }
    return bundle, total


def check_resources(cfg: Config, nodes: list[dict[str, Any]]) -> None:
    """An error, now, when the cluster can never hold the job (Ray would wait forever); with
    ``cluster.autoscale`` one line saying what it waits for instead."""
    bundle, total = job_resources(cfg)
    have = {k: sum(n["Resources"].get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    fits_a_node = any(all(n["Resources"].get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes)
    if fits_a_node and all(have[k] + 1e-9 >= v for k, v in total.items()):
        return
    c = cfg.cluster
    gpu = f" + {bundle['GPU']:g} GPU" if bundle["GPU"] else ""
    gpus = f", {total['GPU']:g} GPUs" if total["GPU"] else ""
    validation = validation_resources(cfg)
    validator = (
        f" + a validation task ({validation['CPU']:g} CPU, {validation['GPU']:g} GPU)"
        if any(validation.values())
        else ""
    )
    need = (
        f"{c.num_workers} workers x ({c.cpus_per_worker:g} CPU + {cfg.data.decode_actors} decode actor(s) x "
        f"{cfg.data.decode_cpus:g} CPU{gpu}){validator} = {total['CPU']:g} CPUs{gpus}"
    )
    cluster = f"{have['CPU']:g} CPUs, {have['GPU']:g} GPUs on {len(nodes)} node(s)"
    if c.autoscale:
        print(
            f"[ray] the job needs {need}; the cluster has {cluster}: waiting for the autoscaler", flush=True
        )
        return
    raise RuntimeError(
        f"the job needs {need}, but the cluster has {cluster}"
        + ("" if fits_a_node else f" and no node holds one worker ({bundle})")
        + ": lower cluster.num_workers, cluster.cpus_per_worker / gpus_per_worker or data.decode_cpus"
        + (", or validate on the training ranks (eval.validation=inline)" if validator else "")
        + ", add nodes, or set cluster.autoscale=true if an autoscaler can add them"
    )


def check_tracking_reachable_from_nodes(tracking_uri: str, nodes: list[dict[str, Any]]) -> None:
    """A file-based MLflow store is on this machine only: workers on other nodes cannot log to it."""
    if len(nodes) < 2 or tracking_uri.startswith(("http://", "https://", "databricks")):
        return
    raise RuntimeError(
        f"MLflow tracking store {tracking_uri} is a file on this machine, but the cluster has "
        f"{len(nodes)} nodes whose workers log to it: start an MLflow server (scripts/local_cluster.sh "
        "up starts one for a rehearsal; mlflow server --backend-store-uri ... --host ...) and set "
        "MLFLOW_TRACKING_URI=http://HOST:PORT"
    )


def _visit(probe: str, node_id: str) -> bool:
    """On one node: can it read the driver's marker? Then leave its own."""
    seen = read_text(f"{probe}/driver") == "raylora"
    write_text(f"{probe}/{node_id}", "raylora")
    return seen


def check_shared_storage(storage: str, nodes: list[dict[str, Any]]) -> None:
    """``cluster.storage_path`` must be one folder for every node: a task on each node reads the
    driver's marker and writes its own, which the driver then reads back."""
    if len(nodes) < 2:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = f"{storage.rstrip('/')}/.raylora-shared-{uuid.uuid4().hex[:8]}"
    write_text(f"{probe}/driver", "raylora")
    visit = ray.remote(num_cpus=0, max_retries=0)(_visit)
    try:
        refs = {
            n["NodeID"]: visit.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(probe, n["NodeID"])
            for n in nodes
        }
        saw = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
        apart = [node for node, seen in saw.items() if not seen or read_text(f"{probe}/{node}") != "raylora"]
    finally:
        remove_dir(probe)
    if apart:
        where = ", ".join(f"{n[:12]}" for n in apart)
        raise RuntimeError(
            f"cluster.storage_path {storage} is not shared: node(s) {where} cannot see what this driver "
            "writes there (or the other way round), so checkpoints would be lost or never found; use a "
            "path every node mounts (NFS) or an object store URI (s3://..., gs://...)"
        )


def preflight(cfg: Config, storage: str, tracking_uri: str) -> None:
    """Every check that needs the cluster, before any data or model work."""
    nodes = alive_nodes()
    check_resources(cfg, nodes)
    check_tracking_reachable_from_nodes(tracking_uri, nodes)
    check_shared_storage(storage, nodes)
