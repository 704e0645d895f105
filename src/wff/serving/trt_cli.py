"""``wff trt check`` and ``wff trt build``: thin click commands over wff.serving.trt and its trt_* modules."""

from __future__ import annotations

from pathlib import Path

import click

from wff.cli import WffError, json_option, write_json
from wff.serving.trt import DEFAULT_PRECISION, DEFAULT_WORKSPACE_MIB, TIMING_CACHE_NAME, build_plans, trtexec_command
from wff.serving.trt_cache import PLAN_CACHE_ENV
from wff.serving.trt_preflight import MODEL_STEPS, PlanError, preflight
from wff.serving.trt_runtime import (
    TRITON_TENSORRT_BACKEND,
    TensorRTUnavailable,
    same_release,
    tensorrt_module_version,
    triton_tensorrt_version,
)
from wff.serving.trt_verify import DEFAULT_VERIFY_BATCH, PRECISIONS, TOLERANCES

_REPOSITORY = click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
_MODELS = click.option("--model", "models", multiple=True, type=click.Choice(MODEL_STEPS),
                       help="Only this model (repeatable); default: detector and classifier.")


def parse_atol(values: tuple[str, ...]) -> dict[str, float]:
    """``("detector_boxes=1.5", ...)`` -> ``{"detector_boxes": 1.5}``; raises click.BadParameter."""
    parsed = {}
    for item in values:
        name, sep, number = item.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if not sep or not name or not value >= 0:
            raise click.BadParameter(f"{item!r}: expected OUTPUT=NON_NEGATIVE_NUMBER, e.g. detector_boxes=1.5", param_hint="--atol")
        parsed[name] = value
    return parsed


@click.group()
def trt() -> None:
    """TensorRT plans for a --target tensorrt repository (build inside the NGC tritonserver container)."""


@trt.command("check")
@_REPOSITORY
@_MODELS
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULT_PRECISION, show_default=True,
              help="Only for the printed trtexec equivalent.")
def check(repository: Path, models: tuple[str, ...], precision: str) -> None:
    """Preflight without TensorRT: profile shapes from config.pbtxt and TensorRT 10 op support of model.onnx."""
    try:
        checked = preflight(repository, models or MODEL_STEPS)
    except PlanError as e:
        raise WffError(str(e)) from e
    problems = 0
    for spec, issues in checked:
        click.echo(f"{spec.step}: max_batch_size {spec.max_batch_size}, opt batch {spec.opt_batch}")
        for p in spec.inputs:
            click.echo(f"  {p.name}: min {list(p.min)}  opt {list(p.opt)}  max {list(p.max)}")
        command = trtexec_command(spec, precision, DEFAULT_WORKSPACE_MIB, repository / TIMING_CACHE_NAME)
        click.echo("  trtexec equivalent: " + " ".join(command))
        for issue in issues:
            click.echo(click.style(f"  TensorRT: {issue}", fg="red"), err=True)
        problems += len(issues)
    if problems:
        raise WffError(f"{problems} TensorRT issue(s); see above")
    click.echo("ok: every op is in TensorRT 10's ONNX support matrix and the graphs are static but for the batch")


@trt.command("build")
@_REPOSITORY
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULT_PRECISION, show_default=True,
              help="fp16 (tolerance {}) or strict fp32 with TF32 off (tolerance {}).".format(
                  *(f"atol {TOLERANCES[p].default_atol:g}, boxes {TOLERANCES[p].atol['detector_boxes']:g} px" for p in ("fp16", "fp32"))))
@click.option("--workspace-mib", type=click.IntRange(min=1), default=DEFAULT_WORKSPACE_MIB, show_default=True,
              help="Builder workspace memory limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Timing cache file, read if present and updated [default: REPOSITORY/{TIMING_CACHE_NAME}].")
@_MODELS
@click.option("--samples", type=click.Path(exists=True, path_type=Path),
              help="Verification inputs: a patient folder of DICOM series, or an npz with arrays named after the model inputs "
                   "(detector_image, classifier_clip); default: a synthetic patient, prepared as served.")
@click.option("--verify-batch", type=click.IntRange(min=1), default=DEFAULT_VERIFY_BATCH, show_default=True,
              help="Samples per model for the verification (then sample 0 alone at batch 1).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with ONNX Runtime.")
@click.option("--atol", multiple=True, metavar="OUTPUT=VALUE", help="Override one output's tolerance (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild plans that are up to date.")
@click.option("--plan-cache", type=click.Path(file_okay=False, path_type=Path), envvar=PLAN_CACHE_ENV, show_envvar=True,
              help="Folder of verified plans shared between servers: a plan for this ONNX, TensorRT, precision and GPU model "
                   "is copied from it instead of built, and a newly built one is stored there.")
@json_option("the build and verification report of every plan")
def build(repository: Path, precision: str, workspace_mib: int, timing_cache: Path | None, models: tuple[str, ...],
          samples: Path | None, verify_batch: int, no_verify: bool, atol: tuple[str, ...], force: bool,
          plan_cache: Path | None, json_out: str | None) -> None:
    """Build model.plan (+ model.plan.json) for the detector and classifier of REPOSITORY and verify them."""
    overrides = parse_atol(atol)
    try:
        reports = build_plans(repository, precision, workspace_mib, timing_cache, models or MODEL_STEPS, samples,
                              verify_batch, not no_verify, overrides, force, plan_cache)
    except (PlanError, TensorRTUnavailable, ValueError) as e:
        raise WffError(str(e)) from e
    if json_out:
        write_json(reports, json_out)
    if json_out == "-":
        return
    for r in reports:
        v = r.get("verification")
        verdict = "not verified" if v is None else ("verified" if v["passed"] else "FAILED")
        diffs = "" if v is None else ", ".join(f"{k} {d:.3g}" if d is not None else f"{k} -" for k, d in v["max_abs_diff"].items())
        click.echo(f"{r['model']}: {r['plan']} (TensorRT {r['tensorrt_version']}, {r['builder']['precision']}, "
                   f"{r['builder']['build_seconds']} s) {verdict}" + (f"; max abs diff {diffs}" if diffs else ""))


@trt.command("versions")
def versions() -> None:
    """TensorRT Python package vs the libnvinfer of Triton's TensorRT backend; fails when they differ."""
    try:
        module = tensorrt_module_version()
    except TensorRTUnavailable as e:
        raise WffError(str(e)) from e
    server = triton_tensorrt_version()
    click.echo(f"TensorRT Python package: {module}")
    if server is None:
        click.echo(f"Triton TensorRT backend: not found at {TRITON_TENSORRT_BACKEND} (not the NGC container?); nothing to compare")
        return
    click.echo(f"Triton TensorRT backend links libnvinfer {server}")
    if not same_release(module, server):
        raise WffError(f"TensorRT {module} would build plans that Triton's TensorRT {server} cannot load")
