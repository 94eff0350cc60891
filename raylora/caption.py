"""Caption images with any model raylora can resolve, using the evaluation protocol.

    python -m raylora.caption --model merged/demo img1.jpg img2.jpg
    python -m raylora.caption --model outputs/demo/adapter photos/*.jpg
    python -m raylora.caption --model models:/raylora-demo-lora@champion --batch-size 4 img.jpg

``--model`` is a merged or base checkpoint dir, a PEFT adapter dir, or an MLflow URI
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/adapter``). Greedy decoding (or
beam search with ``--num-beams N``) of 8 to 30 new tokens after the prompt "Provide a one-sentence
caption for the provided image.", dynamic tiling up to 6 tiles (plus thumbnail) at the model's tile
size, the template the model was trained with. Prints one ``path<TAB>caption`` line per image, in
order, on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raylora.cli import model_spec
from raylora.console import add_verbose_flag, run_command
from raylora.generation import GenerationSettings, generate_captions
from raylora.sources import load_model, resolve_source


def caption_images(
    model_spec: str,
    images: list[str],
    batch_size: int = 8,
    max_num: int = 6,
    prompt: str | None = None,
    dtype: str = "fp32",
    base: str | None = None,
    num_beams: int = 1,
) -> list[str]:
    """Captions of ``images`` (in order) by the model ``model_spec`` resolves to (``num_beams`` 1:
    greedy, the evaluation protocol; more: beam search)."""
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
    source = resolve_source(model_spec, base=base)
    model = load_model(source, dtype=dtype, merge=True)
    settings = source.image_settings(max_num)
    gen = GenerationSettings(batch_size=batch_size, num_beams=num_beams)
    if prompt:
        gen = GenerationSettings(prompt=prompt, batch_size=batch_size, num_beams=num_beams)
    return generate_captions(model, settings.conversation_tokenizer(), settings, images, gen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raylora.caption",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, metavar="DIR_OR_URI", help="checkpoint dir, adapter dir, MLflow URI or demo"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--max-num", type=int, default=6, help="max tiles per image (default 6)")
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        metavar="N",
        help="1: greedy decoding, the evaluation protocol (default); N > 1: beam search with N beams",
    )
    p.add_argument("--prompt", default=None, help=f"default: {GenerationSettings().prompt!r}")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "auto"), default="fp32", help="compute dtype")
    p.add_argument(
        "--base", metavar="DIR", help="base checkpoint of an adapter (default: the one it records)"
    )
    add_verbose_flag(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_num < 1 or args.num_beams < 1:
        p.error("--batch-size, --max-num and --num-beams must be at least 1")

    def body() -> None:
        t0 = time.time()
        captions = caption_images(
            model_spec(args.model),
            args.images,
            args.batch_size,
            args.max_num,
            args.prompt,
            args.dtype,
            args.base,
            args.num_beams,
        )
        for path, caption in zip(args.images, captions):
            print(f"{path}\t{caption}", flush=True)
        print(f"[caption] {len(captions)} images in {time.time() - t0:.1f}s", file=sys.stderr)

    return run_command(body, command="caption", verbose_flag=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
