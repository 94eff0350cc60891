"""``python -m raylora.train``: LoRA fine-tuning, Ray Train (V2) + DeepSpeed ZeRO + PEFT LoRA, tracked in
MLflow.

    python -m raylora.train                                 # the recipe if pretrained/ and data/ exist, else the demo
    python -m raylora.train --config internvl2_2b_coco train.lr=2e-5 cluster.num_workers=16
    python -m raylora.train --config demo --output outputs/demo lora.rank=8
    torchrun --nproc-per-node 2 -m raylora.train --config demo   # the same recipe without Ray
    python -m raylora.train --no-ray --config demo                # one plain process (debugging)

What every worker runs is :mod:`raylora.recipe` (:class:`~raylora.recipe.LoRAFinetuneRecipe`); the
driver (planning, data check, MLflow, the trainer, the outputs) is :mod:`raylora.driver`.
"""

from __future__ import annotations

import sys
from typing import Any

from raylora.cli import config_from_args, config_parser
from raylora.console import run_command
from raylora.driver import launched_by_torchrun, run, run_local


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m raylora.train", __doc__, "train.lr=1e-4 lora.rank=16")
    parser.add_argument("--output", help="output directory (default: the config's output_dir)")
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="run the recipe in this process without Ray (one rank; under torchrun this is automatic)",
    )
    args = parser.parse_args(argv)

    def body() -> dict[str, Any] | None:
        cfg = config_from_args(args)
        if args.no_ray or launched_by_torchrun():
            return run_local(cfg, args.output)
        return run(cfg, args.output)  # logs errors under the output folder once run has made it

    return run_command(body, command="train", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
