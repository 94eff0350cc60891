"""``raylora serve`` (or ``python -m raylora.serve``): every adapter of one base model behind an
OpenAI-compatible API, as a Ray Serve application on the current Ray cluster (or a local one).

    raylora serve --adapter styleA=outputs/demo/adapter --adapter best=models:/raylora-demo-lora@champion
    raylora serve --registered raylora-demo-lora          # every version and alias of a registered model
    raylora serve --stop                                   # shut the application down

Clients speak OpenAI's chat completions: ``POST /v1/chat/completions`` with ``model`` = an adapter's
NAME (or the base model's name, for no adapter) and the image as a ``data:image/...;base64,`` URL;
``GET /v1/models`` lists them. ``--base`` defaults to the base model the adapters record. The server
binds 127.0.0.1 unless ``--host`` says otherwise, and then requires an API key (``RAYLORA_API_KEY``
or ``serve.api_key_file``). Replicas, autoscaling, resources and batching come from the config's
``serve`` section (``raylora serve serve.num_replicas=2 ...``). Ctrl-C stops the application.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from raylora.cli import model_spec
from raylora.config import Config, ServeConfig, load_config
from raylora.console import add_verbose_flag, run_command, verbose
from raylora.files import redact
from raylora.serve_api import base_of, parse_adapters, registered_adapters

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def api_key(cfg: ServeConfig) -> str | None:
    """The key clients must send: ``RAYLORA_API_KEY``, else the file ``serve.api_key_file``; required
    when the server listens beyond this machine."""
    key = os.environ.get("RAYLORA_API_KEY")
    if not key and cfg.api_key_file:
        key = Path(cfg.api_key_file).expanduser().read_text().strip()
    if not key and cfg.host not in LOCAL_HOSTS:
        raise ValueError(
            f"serve.host={cfg.host} listens beyond this machine: set RAYLORA_API_KEY (or serve.api_key_file) "
            "to the key clients send as 'Authorization: Bearer KEY'"
        )
    return key or None


def start(cfg: Config, adapters: dict[str, str], base: str | None, log: object = print) -> str:
    """Deploy the application (connecting to ``RAY_ADDRESS`` or starting a local cluster); its URL."""
    from ray import serve

    from raylora.cluster import init_ray
    from raylora.serve_app import APP_NAME, application

    s = cfg.serve
    key = api_key(s)
    base = base_of(adapters, base)
    init_ray(cfg)
    if not verbose():  # Ray Serve's INFO lines (deploying, "ready at") say what the [serve] lines say
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options=http_options(s))
    serve.run(application(base, adapters, s, key), name=APP_NAME, route_prefix="/")
    url = f"http://{s.host}:{s.port}/v1"
    log(f"[serve] {len(adapters)} adapter(s) on {base}: {', '.join(adapters) or '(none)'}")
    log(f"[serve] OpenAI-compatible API at {url} (GET /v1/models, POST /v1/chat/completions)")
    return url


def http_options(s: ServeConfig) -> dict[str, object]:
    """Where Ray Serve's HTTP proxy listens: ``serve.host`` (127.0.0.1 unless the user says otherwise;
    anywhere else needs an API key, :func:`api_key`) and ``serve.port``."""
    return {"host": s.host, "port": s.port}


def running() -> bool:
    """Whether the application is deployed on the connected cluster."""
    from ray import serve

    from raylora.serve_app import APP_NAME

    return APP_NAME in serve.status().applications


def stop(cfg: Config) -> None:
    """Delete the application from the Ray cluster it runs on (``RAY_ADDRESS``, or the local cluster a
    ``raylora serve`` on this machine started: that command then ends)."""
    from ray import serve

    from raylora.cluster import init_ray
    from raylora.serve_app import APP_NAME

    if not cfg.cluster.address and not os.environ.get("RAY_ADDRESS"):
        cfg.cluster.address = "auto"
    init_ray(cfg)
    serve.delete(APP_NAME)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="raylora serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="an adapter clients ask for as NAME: SPEC a folder or models:/NAME@ALIAS (repeat for more)",
    )
    p.add_argument("--registered", metavar="NAME", help="serve every version (NAME/N) and alias (NAME@ALIAS)")
    p.add_argument("--base", metavar="MODEL", help="the base model (default: the one the adapters record)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; elsewhere needs RAYLORA_API_KEY)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--config", default=None, help="a config for the serve section (default: built-in defaults)"
    )
    p.add_argument("--stop", action="store_true", help="stop the running application and exit")
    p.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. serve.num_replicas=2 serve.max_adapters=8"
    )
    add_verbose_flag(p)
    args = p.parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.stop:
            stop(cfg)
            print("[serve] stopped")
            return
        if args.host:
            cfg.serve.host = args.host
        if args.port:
            cfg.serve.port = args.port
        adapters = parse_adapters(args.adapter)
        if args.registered:
            adapters.update(registered_adapters(args.registered))
        base = model_spec(args.base) if args.base else None
        start(cfg, adapters, base)
        print(f"[serve] running; Ctrl-C (or raylora serve --stop) stops it; specs: {redact(str(adapters))}")
        from ray import serve

        try:
            while running():  # until Ctrl-C here, or raylora serve --stop elsewhere
                time.sleep(2)
        except KeyboardInterrupt:
            pass
        serve.shutdown()
        print("[serve] stopped")

    return run_command(body, command="serve", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
