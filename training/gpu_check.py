"""The paper profile on one GPU, short, in one call: ``python -m wff.training.gpu_check`` (scripts/gpu_check.sh).

1. synthesise a small dataset (``--train`` / ``--test`` patients);
2. train the paper profile's detector and classifier at the profile's full resolution
   (``image.size``), each capped at ``--steps`` optimiser steps, without cross-validation
   and without export (what is measured is the models, not the artifacts);
3. time the trained models per test patient in PyTorch, for each precision: the detector on
   all slices of the patient in one batch (:class:`DetectorGraph`, as served), then the
   classifier on one clip per series (the clips cut from the fp32 detections with the serving
   crop). ``fp16`` and ``bf16`` run under ``torch.autocast``. Inputs are on the device before
   the clock starts; the clock stops after ``torch.cuda.synchronize()``. Every test patient is
   run once to warm up, then ``--rounds`` times timed; p50 / p95 are over those samples.

Writes ``gpu_check.json`` (card, versions, commit, training steps and seconds, timings) and
``gpu_check.txt`` (the table) to ``--out``. ``--tiny`` shrinks the inputs (64-pixel slices,
4-slice clips, 2 steps, 4 + 2 patients, the first 4 slices of each timed once, one CPU thread) so the same code runs on a CPU in a test.
scripts/gpu_check.sh runs it on a machine without the package installed. It is a module rather than a
``wff`` command: a measurement made once per card, not a step of using the models.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import click
import numpy as np

from wff.cli import WffError, apply_overrides, progress_printer
from wff.config import PAPER, Profile
from wff.loadtest.bench import percentile_ms

PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# the paper profile shrunk so that a CPU runs the same code in seconds (cf. tests/test_paper_smoke.py)
TINY = {
    "image": {"size": 64},
    "detector": {"batch_size": 2, "rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 32, "top_k": 8},
    "classifier": {"clip_len": 4, "crop_size": 16, "batch_size": 2},
}
JSON_NAME, TABLE_NAME = "gpu_check.json", "gpu_check.txt"


def source_commit(root: Path) -> str:
    """The checkout's commit: ``WFF_COMMIT`` when set (a copy without .git), else ``git rev-parse``, else unknown."""
    if os.environ.get("WFF_COMMIT"):
        return os.environ["WFF_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def summarize_ms(samples: Sequence[float]) -> dict:
    """p50 / p95 / mean in milliseconds of per-patient seconds (percentiles as wff bench takes them)."""
    return {"p50_ms": round(percentile_ms(samples, 50), 2), "p95_ms": round(percentile_ms(samples, 95), 2),
            "mean_ms": round(float(np.mean(samples)) * 1000.0, 2), "samples": len(samples)}


class Clock:
    """Wall time of a callable on ``device``, synchronised before and after on CUDA."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0


def precision_context(precision: str, device: str):
    """``torch.autocast`` for fp16 / bf16 on ``device``; nothing for fp32."""
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, AUTOCAST_DTYPES[precision]))


def time_model(model, batches: Sequence, clock: Clock, precision: str, device: str, rounds: int) -> list[float] | str:
    """Seconds of ``model`` on each batch (one per patient), ``rounds`` times after one warm-up pass over all of
    them, under ``precision``; the error as text when the model fails (an op without a kernel for the dtype,
    out of memory)."""
    import torch

    try:
        with torch.inference_mode(), precision_context(precision, device):
            for batch in batches:  # warm-up: every shape once
                model(batch)
            return [clock(lambda: model(batch)) for _ in range(rounds) for batch in batches]
    except (RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def time_models(graph, classifier, inputs: Sequence[tuple], device: str, precisions: Sequence[str], rounds: int,
                progress: Callable[[str], None]) -> dict:
    """Per-patient times of ``graph`` (all slices of a patient, one batch) and ``classifier`` (one clip per
    series) for each precision; ``inputs`` are (slices, clips) tensors on ``device``. A model that fails under
    a precision is recorded with its error instead of its times."""
    import torch

    clock = Clock(device)
    results = {}
    for precision in precisions:
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
        row, samples = {}, {}
        for name, model, batches in (("detector", graph, [s for s, _ in inputs]), ("classifier", classifier, [c for _, c in inputs])):
            out = time_model(model, batches, clock, precision, device, rounds)
            if isinstance(out, str):
                row[name] = {"error": out}
                progress(f"{precision} {name}: failed: {out}")
            else:
                samples[name] = out
                row[name] = summarize_ms(out)
                progress(f"{precision} {name}: p50 {row[name]['p50_ms']} ms, p95 {row[name]['p95_ms']} ms per patient")
        if len(samples) == 2:  # sample i of both is the same patient and round
            row["detector_plus_classifier"] = summarize_ms([a + b for a, b in zip(samples["detector"], samples["classifier"])])
        if clock.cuda:
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results[precision] = row
    return results


def patient_inputs(patients, graph, profile: Profile, device: str, max_slices: int = 0) -> list[tuple]:
    """(slices, clips) per patient on ``device``: the clips cut by the serving crop from fp32 detections.
    ``max_slices`` > 0 keeps only each patient's first slices (--tiny: a CPU takes seconds per slice)."""
    import torch

    from wff.ensemble.crop import crop_patient

    inputs = []
    with torch.inference_mode():
        for p in patients:
            keep = slice(0, max_slices or None)
            array, series = p.prepared.slices[keep], p.prepared.slice_series[keep]
            slices = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(device)
            boxes, scores, _, _, count = (t.cpu().numpy() for t in graph(slices))
            clips, _, _ = crop_patient(array, series, boxes, scores, count, profile.classifier, profile.fusion.det_threshold)
            inputs.append((slices, torch.from_numpy(clips).to(device)))
    return inputs


def environment(device: str, root: Path) -> dict:
    import torch
    import torchvision

    import wff

    env = {"device": device, "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
           "commit": source_commit(root), "wff_package": str(Path(wff.__file__).parent), "cpu_threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        env.update(card=torch.cuda.get_device_name(index), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def format_check(result: dict) -> str:
    env, train = result["environment"], result["training"]
    lines = [f"paper profile on {env['card']} (torch {env['torch']}, commit {env['commit']})",
             f"training at {result['image_size']} px: {train['train_patients']} patients, detector {train['detector_steps']} steps "
             f"in {train['detector_s']} s, classifier {train['classifier_steps']} steps in {train['classifier_s']} s",
             f"per test patient ({result['timing']['patients']} patients x {result['timing']['rounds']} rounds, "
             f"{result['timing']['slices_mean']:.0f} slices, {result['timing']['series_mean']:.1f} series on average), ms:",
             f"{'precision':<10}{'detector p50':>14}{'p95':>9}{'classifier p50':>16}{'p95':>9}{'both p50':>10}{'p95':>9}"]
    for precision, row in result["timing"]["precisions"].items():
        cells, errors = [], []
        for name in ("detector", "classifier", "detector_plus_classifier"):
            entry = row.get(name, {})
            if "p50_ms" in entry:
                cells += [entry["p50_ms"], entry["p95_ms"]]
            else:
                cells += [None, None]
                if "error" in entry:
                    errors.append(f"  {precision} {name}: {entry['error']}")
        widths = (14, 9, 16, 9, 10, 9)
        lines.append(f"{precision:<10}" + "".join("-".rjust(w) if v is None else f"{v:>{w}.1f}" for v, w in zip(cells, widths)))
        lines += errors
    lines.append(f"whole check: {result['total_s']} s")
    return "\n".join(lines)


def run_gpu_check(out: Path, device: str, profile: Profile, n_train: int, n_test: int, rounds: int, precisions: Sequence[str],
                  work: Path, max_slices: int = 0, progress: Callable[[str], None] = progress_printer) -> dict:
    """Steps 1-3 of the module docstring; returns the result written to ``out``/gpu_check.json."""
    import torch

    from wff.training.detector_graph import DetectorGraph
    from wff.training.engine import fit_classifier, fit_detector
    from wff.training.synth import synthesize_dataset
    from wff.training.train import load_split

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(profile.train.num_threads)
    env = environment(device, Path(__file__).resolve().parents[1])
    progress(f"gpu-check on {env['card']}, torch {env['torch']}, commit {env['commit']}")

    t0 = time.perf_counter()
    data = synthesize_dataset(work / "data", n_train, n_test, seed=profile.train.seed)
    synth_s = time.perf_counter() - t0
    train_patients = load_split(data, "train", profile, progress)
    test_patients = load_split(data, "test", profile, progress)
    progress(f"synthesised and read {n_train} + {n_test} patients at {profile.image.size} px in {time.perf_counter() - t0:.0f} s")

    steps: dict[str, int] = {}

    def counter(kind: str) -> Callable:
        def cb(step: int, total: int, losses: dict) -> None:
            steps[kind] = step
            if step == total or step % max(1, total // 5) == 0:
                progress(f"{kind}: step {step}/{total} loss {sum(float(v) for v in losses.values()):.3f}")
        return cb

    seed = profile.train.seed
    t1 = time.perf_counter()
    detector = fit_detector(train_patients, profile, profile.detector.epochs, device=device, progress=counter("detector"), seed=seed)
    t2 = time.perf_counter()
    classifier = fit_classifier(train_patients, profile, profile.classifier.epochs, device=device, progress=counter("classifier"), seed=seed)
    t3 = time.perf_counter()
    training = {"train_patients": n_train, "detector_steps": steps.get("detector", 0), "classifier_steps": steps.get("classifier", 0),
                "detector_batch": profile.detector.batch_size, "classifier_batch": profile.classifier.batch_size,
                "detector_s": round(t2 - t1, 1), "classifier_s": round(t3 - t2, 1),
                "detector_s_per_step": round((t2 - t1) / max(1, steps.get("detector", 0)), 3),
                "classifier_s_per_step": round((t3 - t2) / max(1, steps.get("classifier", 0)), 3)}

    result = {"profile": profile.name, "image_size": profile.image.size, "environment": env, "synthesis_s": round(synth_s, 1),
              "training": training, "timing": None}
    (out / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")  # what a run stopped during the timing leaves
    graph = DetectorGraph(detector, profile).eval().to(device)
    classifier = classifier.eval().to(device)
    inputs = patient_inputs(test_patients, graph, profile, device, max_slices)
    timing = {"patients": len(inputs), "rounds": rounds, "max_slices": max_slices,
              "slices_mean": float(np.mean([len(s) for s, _ in inputs])), "series_mean": float(np.mean([len(c) for _, c in inputs])),
              "scope": "forward pass per patient on inputs already on the device, synchronised; fp16/bf16 under torch.autocast",
              "precisions": time_models(graph, classifier, inputs, device, precisions, rounds, progress)}
    result.update(timing=timing, total_s=round(time.perf_counter() - t_start, 1))
    (out / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
    table = format_check(result)
    (out / TABLE_NAME).write_text(table + "\n")
    return result


@click.command("gpu-check")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/gpu-check"), show_default=True,
              help="Folder for gpu_check.json and gpu_check.txt.")
@click.option("--device", default="cuda", show_default=True, help="torch device: cuda (the check) or cpu (--tiny, for tests).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Optimiser steps of each model (train.max_steps).")
@click.option("--train", "n_train", type=click.IntRange(min=2), default=24, show_default=True, help="Synthetic training patients.")
@click.option("--test", "n_test", type=click.IntRange(min=2), default=12, show_default=True, help="Synthetic test patients (the timed ones).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Timed passes over the test patients, after one warm-up.")
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              help="Precisions to time (repeatable) [fp32 and fp16 on cuda, fp32 on cpu].")
@click.option("--max-slices", type=click.IntRange(min=0), default=0, show_default=True,
              help="Time only each test patient's first slices (0: all slices, one batch per patient).")
@click.option("--tiny", is_flag=True, help="64-pixel slices, 4-slice clips, 2 steps, 4 + 2 patients, 4 slices timed once: "
                                          "the code path on a CPU in about a minute.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the synthetic dataset [a temporary folder, removed afterwards].")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a paper-profile value (repeatable).")
def gpu_check(out: Path, device: str, steps: int, n_train: int, n_test: int, rounds: int, precisions: tuple[str, ...],
              max_slices: int, tiny: bool, work: Path | None, overrides: tuple[str, ...]) -> None:
    """Train the paper profile briefly at full resolution on a GPU and time its detector and classifier per patient
    in PyTorch (fp32, fp16); writes gpu_check.json and gpu_check.txt."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu --tiny to try the check on a CPU", param_hint="--device")
    profile = PAPER.replace(**TINY) if tiny else PAPER
    if tiny:
        steps, n_train, n_test, rounds, max_slices = 2, 4, 2, 1, 4
    # one thread for --tiny: on a small shared machine two OpenMP threads can wait on each other for most of the run
    threads = 1 if tiny else min(16, os.cpu_count() or 1)
    profile = profile.replace(train={"max_steps": steps, "num_threads": threads})
    profile = apply_overrides(profile, overrides)
    precisions = precisions or (("fp32", "fp16") if device.startswith("cuda") else ("fp32",))
    folder = Path(tempfile.mkdtemp(prefix="wff-gpu-check-")) if work is None else work
    try:
        result = run_gpu_check(out, device, profile, n_train, n_test, rounds, precisions, folder, max_slices)
    except (ValueError, FileNotFoundError) as e:
        raise WffError(str(e)) from e
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)
    click.echo(format_check(result))
    click.echo(f"written: {out / JSON_NAME}, {out / TABLE_NAME}")


if __name__ == "__main__":
    gpu_check(prog_name="python -m wff.training.gpu_check")
