"""``wff data synth``: write a synthetic spine MRI DICOM dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from wff.training.synth import SIZES, synthesize_dataset


@click.group()
def data() -> None:
    """Datasets: synthetic generation."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.Choice(sorted(SIZES)), default="paper", show_default=True,
              help="paper: 445 train / 140 test patients; demo: 120 / 60; tiny: 8 / 6.")
@click.option("--train", "n_train", type=int, default=None, help="Training patients (overrides --size).")
@click.option("--test", "n_test", type=int, default=None, help="Test patients (overrides --size).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", default=None, metavar="FILE|-", help="Write a JSON summary.")
def synth(out_dir: Path, size: str, n_train: int | None, n_test: int | None, seed: int, json_out: str | None) -> None:
    """Write a synthetic sagittal spine MRI dataset (DICOM + LabelMe + labels.csv) to OUT_DIR."""
    default_train, default_test = SIZES[size]
    n_train, n_test = n_train or default_train, n_test or default_test
    if (out_dir / "labels.csv").exists():
        raise click.BadParameter(f"{out_dir} already holds a dataset (labels.csv); choose an empty folder", param_hint="OUT_DIR")
    t0 = time.perf_counter()
    try:
        synthesize_dataset(out_dir, n_train, n_test, seed=seed, progress=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    files = [f for f in out_dir.rglob("*") if f.is_file()]
    summary = {
        "out_dir": str(out_dir),
        "train_patients": n_train,
        "test_patients": n_test,
        "dicom_files": sum(f.suffix == ".dcm" for f in files),
        "labelme_files": sum(f.suffix == ".json" for f in files),
        "megabytes": round(sum(f.stat().st_size for f in files) / 1e6, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    click.echo(f"wrote {summary['train_patients']} + {summary['test_patients']} patients, {summary['dicom_files']} DICOM files, "
               f"{summary['megabytes']} MB in {summary['seconds']} s to {out_dir}", err=True)
    if json_out == "-":
        click.echo(json.dumps(summary, indent=2))
    elif json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2) + "\n")
