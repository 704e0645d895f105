"""``wff train`` and the model-development tools of ``wff dev`` (parity, refit-fusion)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wff.cli import WffError, apply_overrides, json_option, progress_printer, write_json
from wff.config import PROFILES, get_profile


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="small", show_default=True,
              help="Training profile: small (CPU) or paper (the paper's models, for a GPU).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Artifacts folder [runs/<profile>].")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a profile value (repeatable).")
@click.option("--detectors-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset: reuse its fold and final detectors (same image, detector "
                   "and CV settings required) and train only the classifiers.")
@click.option("--final-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset: reuse its final detector and classifier (same image, "
                   "detector, classifier settings and train.seed required) and train only the cross-validation folds.")
@json_option("the summary (artifacts folder, out-of-fold metrics, ONNX parity)")
def train(dataset: Path, profile_name: str, out: Path | None, device: str, overrides: tuple[str, ...], detectors_from: Path | None,
          final_from: Path | None, json_out: str | None) -> None:
    """Train detector and sequence classifier, choose the fusion weights by cross-validation,
    export ONNX and write the artifacts the server needs."""
    from wff.ensemble.metrics import format_table
    from wff.training.train import run_training

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    profile = apply_overrides(get_profile(profile_name), overrides)
    out = out or Path("runs") / profile.name
    try:
        run_training(dataset, out, profile, device=device, progress=progress_printer, detectors_from=detectors_from, final_from=final_from)
    except (ValueError, FileNotFoundError) as e:
        raise WffError(str(e)) from e
    report = json.loads((out / "train_report.json").read_text())
    summary = {"artifacts": str(out), "cv": report["cv"]["out_of_fold"], "onnx_parity": report["onnx_parity"]}
    if json_out:
        write_json(summary, json_out)
    if json_out != "-":
        parity = summary["onnx_parity"]
        click.echo(f"artifacts: {out}")
        click.echo("cross-validation, out of fold:")
        click.echo(format_table(summary["cv"]))
        click.echo(f"ONNX Runtime vs PyTorch: detector max |diff| {parity['detector_max_abs_diff']:.2g}, "
                   f"classifier {parity['classifier_max_abs_diff']:.2g}")


@click.command("refit-fusion")
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="fusion.KEY=VALUE",
              help="Fusion setting to change, e.g. fusion.cv_metric=expected_acc (repeatable).")
@json_option("the new fusion settings")
def refit_fusion(artifacts: Path, overrides: tuple[str, ...], json_out: str | None) -> None:
    """Choose the fusion weights and voting threshold of a trained run again from its
    out-of-fold components (cv_components.json), with some fusion settings changed; nothing is
    trained. Rewrites fusion.json, profile.json and train_report.json in ARTIFACTS; rebuild the
    model repository (wff repo build) to serve the new choice."""
    from wff.config import load_profile
    from wff.ensemble.metrics import format_table
    from wff.training.train import refit_fusion as refit

    others = [o for o in overrides if not o.startswith("fusion.")]
    if others:
        raise click.BadParameter(f"{others}: refit-fusion changes fusion.* settings only", param_hint="--set")
    try:
        current = load_profile(artifacts / "profile.json")
        before, after = current.to_dict()["fusion"], apply_overrides(current, overrides).to_dict()["fusion"]
        fusion_changes = {k: v for k, v in after.items() if v != before[k]}
        settings = refit(artifacts, fusion_changes, progress=progress_printer)
    except (ValueError, FileNotFoundError) as e:
        raise WffError(str(e)) from e
    if json_out:
        write_json({"artifacts": str(artifacts), **settings.to_dict()}, json_out)
    if json_out != "-":
        weights = " / ".join(f"{w:g}" for w in settings.served_weights)
        click.echo(f"fusion.json rewritten in {artifacts}: served strategy {settings.served_strategy}, weights {weights}, "
                   f"voting threshold {settings.det_threshold:g}, vote threshold {settings.vote_threshold():g}")
        click.echo("cross-validation, out of fold:")
        click.echo(format_table(settings.cv["out_of_fold"]))


@click.command("parity")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, help="labels.csv split to compare on.")
@json_option("the summary")
def parity(dataset: Path, artifacts: Path, split: str, json_out: str | None) -> None:
    """Compare a trained run's ONNX models (ONNX Runtime) with its PyTorch checkpoints on every patient
    of a split: detector and classifier outputs on the same inputs, and every strategy's decision.
    Exit status 1 when a difference exceeds the tolerance or a decision changes."""
    from wff.training.parity import format_parity, split_parity

    try:
        summary = split_parity(dataset, artifacts, split, progress=progress_printer)
    except (ValueError, FileNotFoundError) as e:
        raise WffError(str(e)) from e
    if json_out:
        write_json(summary, json_out)
    if json_out != "-":
        click.echo(format_parity(summary))
    if not summary["passed"]:
        raise WffError(f"the ONNX models in {artifacts} do not reproduce its PyTorch checkpoints on the {split} split within the "
                       "tolerance (see the summary); check that each .onnx file is the export of the .pt beside it")
