"""Merge a LoRA adapter into its base model: a plain transformers checkpoint, verified before it is published.

    python -m raylora.merge --adapter outputs/demo/adapter --output merged/demo
    python -m raylora.merge --model-uri models:/raylora-coco-lora@champion --output merged/coco --dtype bf16 --register

The output loads with ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)`` (no remote code, no raylora): safetensors weights, config,
generation config (stops at the template's end token), tokenizer with the training chat template,
image + video processor config (transformers' InternVL processor needs a video processor, hence
torchvision), and ``raylora.json`` (template, system message, provenance, verification numbers).

Verification (on by default), on the caption prompt with a few real images (demo validation
images, synthetic scenes, or ``--verify-images``); logits in fp32 at the last 32 positions, each
pass repeated until two agree bit for bit (the first forward pass of a process is occasionally off
by ~3e-3 on these CPUs). The max abs difference between the merged checkpoint *reloaded from disk*
and the unmerged base + adapter must stay within the tolerance, else the merge fails (exit 1,
nothing published):

* fp32 weights: 1e-4, or 1e-5 x max |logit| when larger (measured on the demo: ~2e-5);
* bf16 weights: 5e-2 x max(1, max |logit|), the cost of rounding every weight to bf16 (measured on
  the demo's fp32 base: up to 0.41 with logits up to 12.4). Two tight checks make up for the loose
  one: the fp32 merge in memory vs base + adapter (fp32 tolerance), and the reloaded checkpoint
  vs the bf16-rounded merged weights it was saved from (fp32 tolerance).

The adapter's own effect (base vs base + adapter) is reported: a merge that silently produced the
base weights would be off by that much. Then the reloaded model captions one image.

Everything is written into a temp dir next to ``--output`` and renamed at the end: the output
either does not exist or is complete. A non-empty output is refused without ``--overwrite``.

``--register`` logs the merged dir as an MLflow Model that captions images (a pyfunc model with the
weights as its artifact ``model``, see :mod:`raylora.serving`) in a new MLflow run, tagged with the
adapter's registry name, version and run, and registers it as ``<name>-merged``; its ``champion``
alias moves when the merged adapter is the adapter champion (else by the adapter's ``cider`` tag).
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` take ``models:/<name>-merged@champion``.

Exit codes: 0 done, 1 verification failed (nothing published), 2 bad arguments, source or output,
3 published but not registered.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raylora import registry, tracking
from raylora.config import Config
from raylora.console import add_verbose_flag, run_command
from raylora.demo import demo_dir, draw_scenes
from raylora.families import IMAGE_COLUMNS, checkpoint_chat_template, family_of_model, named_templates
from raylora.files import atomic_dir
from raylora.generation import GenerationSettings, generate_captions, prompt_batch
from raylora.model import RECORD
from raylora.sources import ModelSource, SourceError, load_model, resolve_source

# torch and transformers are imported inside the functions: --help and argument errors stay fast.

FP32_TOLERANCE = 1e-4  # absolute, or 1e-5 x max |logit| when that is larger
FP32_RELATIVE_TOLERANCE = 1e-5
BF16_RELATIVE_TOLERANCE = 5e-2  # x max(1, max |logit|)
VERIFY_POSITIONS = 32  # logits compared at the last N positions of every prompt
DTYPES = ("fp32", "bf16")


class MergeError(RuntimeError):
    """The merge cannot be done or its verification failed; nothing was published."""


class RegistrationError(RuntimeError):
    """The merged checkpoint was published but could not be logged/registered in MLflow."""


# --------------------------------------------------------------------------------------- output


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output(output: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that is a file, non-empty without ``overwrite``, or would swallow a source dir."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a directory")
    for p in protected:
        if p is not None and _is_within(p, output):  # replacing output would delete the source
            raise FileExistsError(
                f"output {output} overlaps the model being merged ({p}); choose another output directory"
            )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output {output} is not empty; pass --overwrite (overwrite=True) to replace it, "
            "or choose another directory (it was left untouched)"
        )


# ---------------------------------------------------------------------------------- verification


def verification_images(paths: list[str] | None, scratch: Path, count: int = 2) -> list[str]:
    """``paths`` if given; else the cached demo validation images; else synthetic demo scenes."""
    if paths:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"verification image(s) not found: {', '.join(missing)}")
        return [str(p) for p in paths]
    val = demo_dir() / "data" / "val"
    if (demo_dir() / "COMPLETE").exists() and val.is_dir():
        found = sorted(str(p) for p in val.glob("*.jpg"))[:count]
        if len(found) == count:
            return found
    return draw_scenes(count, scratch)


def _logits(model: Any, batch: dict[str, Any]) -> Any:
    """fp32 logits at the last VERIFY_POSITIONS positions; padding positions set to 0."""
    import torch

    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = torch.from_numpy(batch["attention_mask"])
    images = {k: torch.from_numpy(batch[k]) for k in (*IMAGE_COLUMNS, "input_ids") if k in batch}
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=mask,
            logits_to_keep=VERIFY_POSITIONS,
            **family_of_model(model).model_inputs(images, dtype),
        )
    logits = out.logits.float()
    keep = mask[:, -logits.shape[1] :].unsqueeze(-1).bool()
    return torch.where(keep, logits, torch.zeros_like(logits))


def stable_logits(model: Any, batch: dict[str, Any], attempts: int = 3) -> tuple[Any, int]:
    """Logits repeated until two consecutive passes agree exactly; returns (logits, passes).

    On this project's CPU machines the first forward pass of a process is occasionally off by ~3e-3
    (measured against fp64: about 1 run in 6, subsequent passes agree bit for bit), which would
    fail an fp32 check that is otherwise met by 100x.
    """
    prev = _logits(model, batch)
    for n in range(2, attempts + 1):
        cur = _logits(model, batch)
        if float((cur - prev).abs().max()) == 0.0:
            return cur, n
        prev = cur
    return prev, attempts


def tolerance_for(dtype: str, ref_logits: Any) -> float:
    """The allowed max abs logit difference for weights saved in ``dtype`` (see the module doc)."""
    if dtype == "fp32":
        return max(FP32_TOLERANCE, FP32_RELATIVE_TOLERANCE * float(ref_logits.abs().max()))
    return BF16_RELATIVE_TOLERANCE * max(1.0, float(ref_logits.abs().max()))


class MergeVerifier:
    """The checks a merge passes before it is published, one method each, in the order they run.

    Every check records itself in ``report["checks"]``; a failed logit check raises MergeError
    (the caller publishes nothing). See the module doc for the tolerances.
    """

    def __init__(
        self,
        source: ModelSource,
        images: list[str],
        dtype: str,
        output: Path,
        tolerance: float | None,
        log: Any,
    ):
        self.source, self.images, self.dtype, self.output, self.log = source, images, dtype, output, log
        self.tolerance = tolerance
        self.settings = source.image_settings()
        self.conv_tok = self.settings.conversation_tokenizer()
        self.prompt = GenerationSettings().prompt
        self.batch = prompt_batch(self.conv_tok, self.settings, images, self.prompt)
        self.report: dict[str, Any] = {"verify_images": images, "checks": []}
        self.expected = None  # bf16: what the reloaded checkpoint must reproduce (the rounded weights)

    def check(self, what: str, got: Any, ref: Any, tol: float) -> float:
        """max |got - ref| against ``tol``, recorded and logged; MergeError when above it."""
        diff = float((got - ref).abs().max())
        self.report["checks"].append({"check": what, "max_abs_diff": diff, "tolerance": tol})
        self.log(f"[merge] verification, {what}: max abs logit difference {diff:.3g} (tolerance {tol:.3g})")
        if not math.isfinite(diff) or diff > tol:
            raise MergeError(
                f"verification failed ({what}): max abs logit difference {diff:.3g} > tolerance {tol:.3g}; "
                f"nothing was written to {self.output}"
            )
        return diff

    def reference_logits(self, model: Any) -> None:
        """Base + adapter, unmerged: the logits every later check compares with; the adapter's effect."""
        self.ref, self.report["reference_passes"] = stable_logits(model, self.batch)
        with model.disable_adapter():
            base = _logits(model, self.batch)
        self.report["adapter_effect"] = float((self.ref - base).abs().max())

    def bf16_rounding(self, merged: Any) -> None:
        """bf16 output only: the fp32 merge itself (tight), then round the weights to bf16 in place."""
        import torch

        if self.dtype != "bf16":
            return
        in_memory, _ = stable_logits(merged, self.batch)
        self.check("fp32 merge (in memory)", in_memory, self.ref, tolerance_for("fp32", self.ref))
        with torch.no_grad():
            for p in merged.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(torch.bfloat16).float())
        self.expected, _ = stable_logits(merged, self.batch)

    def reloaded_model(self, out: Path) -> None:
        """The checkpoint as saved, reloaded with plain transformers, against base + adapter."""
        import torch
        from transformers import AutoModelForImageTextToText

        self.reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
        got, self.report["merged_passes"] = stable_logits(self.reloaded, self.batch)
        if self.expected is not None:
            what = "saved bf16 weights vs merged bf16 weights"
            self.check(what, got, self.expected, tolerance_for("fp32", self.expected))
        tol = self.tolerance if self.tolerance is not None else tolerance_for(self.dtype, self.ref)
        diff = self.check(f"merged ({self.dtype}, reloaded) vs base + adapter", got, self.ref, tol)
        self.report.update(max_abs_logit=float(self.ref.abs().max()), max_abs_diff=diff, tolerance=tol)
        effect = self.report["adapter_effect"]
        self.log(f"[merge] the adapter itself moves logits by up to {effect:.3g}")
        if effect <= tolerance_for("fp32", self.ref):
            self.log(
                "[merge] WARNING: the adapter does not change the base model's logits (lora_B all zeros?): "
                "the merged model is the base model"
            )

    def processor_prompt(self, out: Path) -> None:
        """AutoProcessor of the output builds the same prompt tokens as raylora's training code."""
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(out)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        with Image.open(self.images[0]) as im:
            plain = processor(images=[im.convert("RGB")], text=[text], return_tensors="np")
        units = self.settings.image_input(self.images[0]).units
        ok = plain["input_ids"][0].tolist() == self.conv_tok.encode_prompt(self.prompt, [units]).tolist()
        self.report["processor_prompt_matches"] = ok
        if not ok:
            self.log(
                "[merge] WARNING: AutoProcessor's prompt tokens differ from raylora's for the same image"
            )

    def sample_caption(self, out: Path) -> None:
        """The reloaded model captions the first image with the evaluation protocol."""
        settings = self.source.image_settings(tokenizer_dir=out)
        caption = generate_captions(
            self.reloaded,
            settings.conversation_tokenizer(),
            settings,
            self.images[:1],
            GenerationSettings(batch_size=1),
        )[0]
        self.report["caption"] = {"image": self.images[0], "text": caption}
        self.log(f"[merge] caption of {self.images[0]} by the reloaded merged model: {caption!r}")
        del self.reloaded


# ------------------------------------------------------------------------------------------ save


def save_merged(model: Any, source: ModelSource, out: Path, dtype: str, record: dict[str, Any]) -> None:
    """Weights, config, generation config, tokenizer + chat template, processor files, raylora.json."""
    import torch
    from transformers import AutoTokenizer

    settings = source.image_settings()
    jinja = settings.template.jinja(settings.system_message, settings.family.image_tokens.jinja_item)
    own = checkpoint_chat_template(source.tokenizer_dir) or checkpoint_chat_template(source.base_dir)
    if settings.template.name not in named_templates() and settings.system_message is None and own:
        jinja = own  # trained on the checkpoint's own template with its default system prompt: kept verbatim
    tok = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    tok.chat_template = jinja
    stop_ids = settings.conversation_tokenizer().stop_token_ids()

    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.config.use_cache = True
    gen = model.generation_config
    gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")

    try:
        settings.family.save_processor(out, source.base_dir, tok, jinja)
    except ImportError as e:  # transformers' video processors are torchvision-based
        raise MergeError(f"transformers' processor for this model needs torchvision: {e}") from None
    (out / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    stray = sorted(p.name for p in out.rglob("*.py"))
    if stray:
        raise MergeError(f"python files in the merged checkpoint: {stray}")


# ----------------------------------------------------------------------------------------- merge


def merge_adapter(
    spec: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "fp32",
    overwrite: bool = False,
    verify: bool = True,
    *,
    base: str | None = None,
    verify_images: list[str] | None = None,
    tolerance: float | None = None,
    register: bool = False,
    name: str | None = None,
    experiment: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Merge the adapter of ``spec`` (dir or MLflow URI) into its base and save it at ``output``.

    Returns a report: paths, dtype, ``max_abs_diff`` / ``tolerance`` / ``adapter_effect`` (max abs
    logit change the adapter makes on the base), a caption, timings, and the registry version with
    ``register``. Raises MergeError (verification failed; nothing published), SourceError,
    FileExistsError, FileNotFoundError, RegistrationError (published, not registered).
    """
    t0 = time.time()
    output = Path(output).expanduser()
    source = merge_source(spec, output, dtype, overwrite, base, verify_images, register and not name)
    report: dict[str, Any] = {
        "spec": str(spec),
        "output": str(output),
        "base_dir": str(source.base_dir),
        "adapter_dir": str(source.adapter_dir),
        "template": source.template,
        "dtype": dtype,
    }
    log(f"[merge] base {source.base_dir} + adapter {source.adapter_dir} (template {source.template})")
    with (
        tempfile.TemporaryDirectory(prefix="raylora-merge-") as scratch,
        atomic_dir(output, overwrite) as tmp,
    ):
        verifier = None
        if verify:
            images = verification_images(verify_images, Path(scratch))
            verifier = MergeVerifier(source, images, dtype, output, tolerance, log)
        report.update(merge_and_save(source, tmp, dtype, verifier, log))
    report["files"] = sorted(p.name for p in output.iterdir())
    report["seconds"] = round(time.time() - t0, 1)
    log(f"[merge] wrote {output} ({len(report['files'])} files, {report['seconds']}s)")
    if register:
        try:
            report["registered"] = register_merged(output, source, report, name=name, experiment=experiment)
        except Exception as e:
            raise RegistrationError(
                f"the merged checkpoint {output} is complete, but registering it failed: {e}; "
                "re-run with --overwrite --register, or register it later with raylora.merge.register_merged"
            ) from e
        r = report["registered"]
        log(
            f"[merge] registered {r['name']} version {r['version']} (run {r['run_id']}); "
            f"alias champion {'moved to it' if r['alias_moved'] else 'kept on a better version'}"
        )
    return report


def merge_source(
    spec: str | os.PathLike,
    output: Path,
    dtype: str,
    overwrite: bool,
    base: str | None,
    verify_images: list[str] | None,
    needs_name: bool,
) -> ModelSource:
    """The adapter to merge, after every check that can fail before any work is done."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_output(output, overwrite)
    missing = [p for p in verify_images or [] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"verification image(s) not found: {', '.join(map(str, missing))}")
    source = resolve_source(spec, base=base)
    if source.adapter_dir is None:
        raise SourceError(f"{spec}: a full checkpoint ({source.base_dir}), not an adapter: nothing to merge")
    check_output(output, overwrite, (source.adapter_dir, source.base_dir))
    if needs_name and not source.origin.get("name"):
        raise ValueError("register needs a registry name (--name) when the adapter is not a models:/ URI")
    return source


def merge_and_save(
    source: ModelSource, out: Path, dtype: str, verifier: MergeVerifier | None, log: Any
) -> dict[str, Any]:
    """Load base + adapter in fp32, merge, save into ``out``; the verifier's checks around each step."""
    import torch

    t0 = time.time()
    model = load_model(source, dtype=torch.float32)  # merge in fp32, cast at save time
    timings = {"seconds_load": round(time.time() - t0, 1)}
    if verifier:
        verifier.reference_logits(model)
    t1 = time.time()
    merged = model.merge_and_unload(safe_merge=True)
    del model
    if verifier:
        verifier.bf16_rounding(merged)
    record = {
        "template": source.template,
        "system_message": source.system_message,
        "merged_from": {
            "spec": source.spec,
            "base_model": str(source.base_dir),
            "adapter": str(source.adapter_dir),
            **{k: v for k, v in source.origin.items() if k != "tracking_uri"},
        },
        "dtype": dtype,
    }
    save_merged(merged, source, out, dtype, record)
    del merged
    gc.collect()
    timings["seconds_merge_save"] = round(time.time() - t1, 1)
    if not verifier:
        log("[merge] WARNING: verification skipped; the merged logits were not compared")
        return timings
    t2 = time.time()
    verifier.reloaded_model(out)
    verifier.processor_prompt(out)
    verifier.sample_caption(out)
    return {**timings, **verifier.report, "seconds_verify": round(time.time() - t2, 1)}


def adapter_lineage(source: ModelSource, name: str, uri: str) -> dict[str, Any]:
    """What the registry knows of the adapter being merged: its version, run, tags, champion status."""
    version = source.origin.get("version") if source.origin.get("name") == name else None
    lineage: dict[str, Any] = {"version": version, "run_id": source.origin.get("run_id") or None}
    lineage["tags"] = registry.get_version(name, version, uri=uri).tags if version else {}
    held = registry.champion(name, tracking_uri=uri) if version else None
    lineage["is_champion"] = held is not None and held[0] == int(version)
    return lineage


def example_image(report: dict[str, Any], scratch: Path) -> str:
    """The caption model's input example: the first verification image still on disk, else a demo one."""
    for path in report.get("verify_images") or []:
        if Path(path).is_file():
            return str(path)
    return verification_images(None, scratch, count=1)[0]


def log_merged_model(
    output: Path, run_id: str, uri: str, report: dict[str, Any], link: dict[str, Any]
) -> Any:
    """``output`` as the run's caption model (:func:`raylora.serving.log_caption_model`) and the merge's
    numbers as its metrics; the run FINISHED, or FAILED (and the error raised)."""
    from raylora.serving import log_caption_model  # imports mlflow: only when registering

    try:
        with tempfile.TemporaryDirectory(prefix="raylora-example-") as scratch:
            info = log_caption_model(
                output,
                run_id,
                uri,
                example_image(report, Path(scratch)),
                metadata={"template": report.get("template"), **{k: v for k, v in link.items() if v}},
            )
        keys = ("max_abs_diff", "adapter_effect", "tolerance")
        metrics = {f"merge_{k}": float(report[k]) for k in keys if report.get(k) is not None}
        tracking.MetricLogger(uri, run_id).log(metrics, 0)
    except BaseException:
        tracking.end_run(run_id, "FAILED", uri)
        raise
    tracking.end_run(run_id, "FINISHED", uri)
    return info


def register_merged(
    output: Path,
    source: ModelSource,
    report: dict[str, Any],
    name: str | None = None,
    experiment: str | None = None,
    metric_key: str = "cider",
) -> dict[str, Any]:
    """Log ``output`` as an MLflow Model that captions images (pyfunc, :mod:`raylora.serving`) in a new
    run and register it as ``<adapter name>-merged``.

    The alias ``champion`` moves to it when its adapter holds the adapter's champion alias, else by
    ``metric_key`` (copied from the adapter's version tags) like any adapter registration.
    """
    adapter_name = name or source.origin["name"]
    uri = tracking.current_uri()
    adapter = adapter_lineage(source, adapter_name, uri)
    if adapter["run_id"]:
        experiment_id = tracking.client(uri).get_run(adapter["run_id"]).info.experiment_id
    else:
        cfg = Config()
        cfg.tracking.uri = uri
        if experiment:
            cfg.tracking.experiment = experiment
        _, experiment_id = tracking.setup(cfg)
    link = {
        "raylora.kind": "merged",
        "adapter_model": adapter_name,
        "adapter_version": adapter["version"],
        "adapter_run_id": adapter["run_id"],
        "adapter_source": report["spec"],
        "dtype": report["dtype"],
    }
    run_name = f"merge-{adapter_name}" + (f"-v{adapter['version']}" if adapter["version"] else "")
    run_id = tracking.create_run(experiment_id, run_name, tags={k: v for k, v in link.items() if v}, uri=uri)
    info = log_merged_model(output, run_id, uri, report, link)
    metric = registry.metric_tag(adapter["tags"], metric_key)
    version, moved = registry.register_version(
        f"{adapter_name}-merged",
        info.model_uri,
        run_id,
        tags={**link, "max_abs_diff": report.get("max_abs_diff")},
        metric_key=metric_key,
        metric_value=metric,
        force_alias=adapter["is_champion"] or metric is None,
        tracking_uri=uri,
        model_id=info.model_id,
    )
    return {
        "name": f"{adapter_name}-merged",
        "version": version,
        "alias_moved": moved,
        "run_id": run_id,
        "model_uri": info.model_uri,
    }


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raylora.merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--adapter", metavar="DIR", help="PEFT adapter dir (or a training output dir with adapter/)"
    )
    src.add_argument(
        "--model-uri",
        metavar="URI",
        help="MLflow URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/adapter",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="directory of the merged checkpoint")
    p.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="weight dtype of the output (default fp32)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--base", metavar="DIR", help="base checkpoint (default: the one the adapter records)")
    p.add_argument("--verify-images", nargs="+", metavar="IMG", help="images for the logit check and caption")
    p.add_argument("--tolerance", type=float, help="max abs logit difference allowed (default: by dtype)")
    p.add_argument("--no-verify", action="store_true", help="skip the logit check and the sample caption")
    p.add_argument(
        "--register",
        action="store_true",
        help="log the merged dir to MLflow and register it as <name>-merged",
    )
    p.add_argument(
        "--name", help="registry name of the adapter (default: NAME of --model-uri models:/NAME...)"
    )
    p.add_argument("--experiment", help="MLflow experiment of the merge run when the adapter has no run")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    return run_command(
        lambda: merge_adapter(
            args.adapter or args.model_uri,
            args.output,
            args.dtype,
            args.overwrite,
            verify=not args.no_verify,
            base=args.base,
            verify_images=args.verify_images,
            tolerance=args.tolerance,
            register=args.register,
            name=args.name,
            experiment=args.experiment,
        ),
        codes=[(MergeError, 1), (RegistrationError, 3)],
        command="merge",
        verbose_flag=args.verbose,
    )


if __name__ == "__main__":
    sys.exit(main())
