"""``wff data``: dataset commands (``wff data synth``: write a synthetic spine MRI DICOM dataset)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from wff.cli import WffError, json_option, write_json
from wff.config import LOCATIONS
from wff.records import load_records
from wff.training.synth import SIZES, class_counts, generate_patients


@click.group()
def data() -> None:
    """Datasets: synthetic generation."""


def _scaled(size: str, n_train: int | None, n_test: int | None) -> tuple[int, int]:
    """--train/--test override the counts of --size; the class proportions per split stay the paper's."""
    default_train, default_test = SIZES[size]
    return (default_train if n_train is None else n_train), (default_test if n_test is None else n_test)


def summarize(out_dir: Path, n_train: int, n_test: int, seconds: float) -> dict:
    files = [f for f in out_dir.rglob("*") if f.is_file()]
    records = load_records(out_dir)
    return {
        "out_dir": str(out_dir),
        "patients": {
            split: dict(zip(("benign", "malignant"), class_counts(n, split))) for split, n in (("train", n_train), ("test", n_test))
        },
        # tumour locations as Table 2 counts them: a patient with two locations counts at each
        "locations": {loc: sum(loc in r.locations for r in records) for loc in LOCATIONS},
        "patients_with_two_or_more_locations": sum(len(r.locations) > 1 for r in records),
        "series": sum(1 for d in out_dir.glob("*/*") if d.is_dir()),
        "dicom_files": sum(f.suffix == ".dcm" for f in files),
        "labelme_files": sum(f.suffix == ".json" for f in files),
        "megabytes": round(sum(f.stat().st_size for f in files) / 1e6, 1),
        "seconds": round(seconds, 1),
    }


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.Choice(sorted(SIZES)), default="paper", show_default=True,
              help="paper: 445 train (180 benign / 265 malignant) + 140 test (90 / 50); demo: 120 + 60; tiny: 8 + 6.")
@click.option("--train", "n_train", type=click.IntRange(min=2), default=None, help="Training patients (overrides --size, same class mix).")
@click.option("--test", "n_test", type=click.IntRange(min=2), default=None, help="Test patients (overrides --size, same class mix).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same dataset, byte for byte.")
@json_option("the summary")
def synth(out_dir: Path, size: str, n_train: int | None, n_test: int | None, seed: int, json_out: str | None) -> None:
    """Write a synthetic sagittal spine MRI dataset (DICOM + LabelMe + labels.csv) to OUT_DIR.

    The layout is the one real datasets must have: OUT_DIR/labels.csv and one folder per
    patient with a folder per series (see wff.training.synth).
    """
    n_train, n_test = _scaled(size, n_train, n_test)
    if (out_dir / "labels.csv").exists():
        raise WffError(f"{out_dir} already holds a dataset ({out_dir / 'labels.csv'}); choose an empty folder")
    t0 = time.perf_counter()
    patients = generate_patients(out_dir, n_train, n_test, seed=seed)
    with click.progressbar(patients, length=n_train + n_test, label=f"writing {n_train} + {n_test} patients", file=sys.stderr) as bar:
        for _ in bar:
            pass
    summary = summarize(out_dir, n_train, n_test, time.perf_counter() - t0)
    train, test = summary["patients"]["train"], summary["patients"]["test"]
    click.echo(
        f"wrote {n_train} training ({train['benign']} benign, {train['malignant']} malignant) and {n_test} test "
        f"({test['benign']} benign, {test['malignant']} malignant) patients: {summary['series']} series, "
        f"{sum(summary['locations'].values())} tumour locations, {summary['dicom_files']} DICOM files, "
        f"{summary['labelme_files']} LabelMe files, {summary['megabytes']} MB "
        f"in {summary['seconds']} s to {out_dir}",
        err=True,
    )
    if json_out:
        write_json(summary, json_out)
