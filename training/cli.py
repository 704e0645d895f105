"""``wff train``: the training protocol of wff.training.train as a command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from wff.config import PROFILES, Profile, get_profile, profile_from_dict


def apply_overrides(profile: Profile, overrides: tuple[str, ...]) -> Profile:
    """``section.key=value`` overrides (value parsed as JSON, else kept as text)."""
    data = profile.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or section not in data or field not in data[section]:
            raise click.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE with a key of the profile, e.g. detector.epochs=2", param_hint="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        data[section][field] = value
    return profile_from_dict(data, where="--set")


def progress_printer(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Artifacts folder [runs/<profile>].")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a profile value (repeatable).")
@click.option("--detectors-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset: reuse its fold and final detectors (same image, detector "
                   "and CV settings required) and train only the classifiers.")
@click.option("--final-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset: reuse its final detector and classifier (same image, "
                   "detector, classifier settings and train.seed required) and train only the cross-validation folds.")
def train(dataset: Path, profile_name: str, out: Path | None, device: str, overrides: tuple[str, ...], detectors_from: Path | None,
          final_from: Path | None) -> None:
    """Train detector and sequence classifier, choose the fusion weights by cross-validation,
    export ONNX and write the artifacts the server needs."""
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
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    report = json.loads((out / "train_report.json").read_text())
    click.echo(json.dumps({"artifacts": str(out), "cv": report["cv"]["out_of_fold"], "onnx_parity": report["onnx_parity"]}, indent=2))


@click.command("refit-fusion")
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="fusion.KEY=VALUE",
              help="Fusion setting to change, e.g. fusion.calibrate=true or fusion.cv_metric=acc (repeatable).")
def refit_fusion(artifacts: Path, overrides: tuple[str, ...]) -> None:
    """Choose the fusion weights, voting threshold and calibration of a trained run again from its
    out-of-fold components (cv_components.json), with some fusion settings changed; nothing is
    trained. Rewrites fusion.json, profile.json and train_report.json in ARTIFACTS; rebuild the
    model repository (wff repo build) to serve the new choice."""
    from wff.config import load_profile
    from wff.training.train import refit_fusion as refit

    try:
        others = [o for o in overrides if not o.startswith("fusion.")]
        if others:
            raise ValueError(f"{others}: refit-fusion changes fusion.* settings only")
        current = load_profile(artifacts / "profile.json")
        before, after = current.to_dict()["fusion"], apply_overrides(current, overrides).to_dict()["fusion"]
        fusion_changes = {k: v for k, v in after.items() if v != before[k]}
        settings = refit(artifacts, fusion_changes, progress=progress_printer)
    except (ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps({"artifacts": str(artifacts), **settings.to_dict()}, indent=2))


@click.command("export-folds")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path))
def export_folds(dataset: Path, artifacts: Path) -> None:
    """Export the cross-validation fold models of a trained run (ARTIFACTS/folds/fold<k>/*.pt) to ONNX
    beside them, each checked against PyTorch on its training patients from DATASET, so that
    serving.members=folds can serve them. wff train does this itself; this is for runs trained before."""
    from wff.training.train import export_fold_models

    try:
        parity = export_fold_models(dataset, artifacts, progress=progress_printer)
    except (ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps({"artifacts": str(artifacts), "fold_onnx_parity": parity}, indent=2))


@click.command("parity")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, help="labels.csv split to compare on.")
@click.option("--json", "json_out", metavar="FILE|-", help="Write the summary as JSON to FILE, or stdout with -.")
def parity(dataset: Path, artifacts: Path, split: str, json_out: str | None) -> None:
    """Compare a trained run's ONNX models (ONNX Runtime) with its PyTorch checkpoints on every patient
    of a split: detector and classifier outputs on the same inputs, and every strategy's decision.
    Exit status 1 when a difference exceeds the tolerance or a decision changes."""
    from wff.training.parity import format_parity, split_parity

    try:
        summary = split_parity(dataset, artifacts, split, progress=progress_printer)
    except (ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if json_out == "-":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_parity(summary))
        if json_out:
            Path(json_out).write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(0 if summary["passed"] else 1)
