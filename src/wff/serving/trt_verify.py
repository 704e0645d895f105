"""Verification of a TensorRT plan against ONNX Runtime, and the inputs it runs on.

The plan and ONNX Runtime (CPU, FP32) run the same inputs at batch B and at batch 1
(:func:`verify_plan`), compared output by output within :data:`TOLERANCES`
(:func:`compare_outputs`). The inputs are real slices and clips, prepared as the served
ensemble prepares them (:func:`patient_samples`), from a patient folder or a synthetic
patient, or an npz (:func:`verification_inputs`, :func:`load_samples`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wff.serving.trt_preflight import ONNX_FILE, PlanError, PlanSpec, latest_version_dir, repository_profile
from wff.serving.trt_runtime import OnnxRuntimeRunner, Runner

PRECISIONS = ("fp16", "fp32")  # builder precisions, each with its entry in TOLERANCES
DEFAULT_VERIFY_BATCH = 4


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    """How far a plan's outputs may be from ONNX Runtime's (FP32, CPU) and still pass.

    Continuous (FP32) outputs are compared by max abs difference against ``atol[name]``
    (``default_atol`` for outputs not named). Discrete (INT32) outputs, the detector's labels
    and count, must be equal; a sample (batch item) where they differ is *misaligned*: its
    rows no longer describe the same detections, so its continuous outputs are left out of
    the comparison, and at most ``max_misaligned`` (a fraction of the samples) may be.
    """

    atol: Mapping[str, float]
    default_atol: float
    max_misaligned: float

    def for_output(self, name: str) -> float:
        return float(self.atol.get(name, self.default_atol))

    def with_overrides(self, overrides: Mapping[str, float]) -> "Tolerance":
        return Tolerance({**self.atol, **overrides}, self.default_atol, self.max_misaligned)


# Why FP16 is looser: FP16 keeps an 11-bit significand (unit roundoff 2**-11 ~ 4.9e-4) and
# rounding compounds over the ~100 conv layers of the paper networks, so probabilities move by
# up to ~1e-2; box corners are decoded through exp() of regression deltas and expressed in
# pixels of a 512-px image, where the FP16 spacing alone is 0.25-0.5 px, so they move by up to
# ~1-2 px. A detection scoring within that noise of the 0.05 score floor, an NMS IoU threshold
# or a TopK rank can appear, vanish or swap: the sample's count/labels change (misaligned),
# which is allowed for 1 sample in 8. FP32 builds clear TF32 (which rounds conv/GEMM inputs to
# a 10-bit mantissa), so only summation order differs from ONNX Runtime (~1e-5 relative):
# 1e-3 on probabilities, 0.05 px on boxes, no misaligned sample.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol={"detector_boxes": 0.05}, default_atol=1e-3, max_misaligned=0.0),
    "fp16": Tolerance(atol={"detector_boxes": 2.0}, default_atol=2e-2, max_misaligned=0.125),
}


@dataclass
class Comparison:
    """One batch of plan outputs against the reference."""

    batch: int
    max_abs_diff: dict[str, float | None]  # continuous outputs; None = no aligned sample to compare
    misaligned: int  # samples whose discrete outputs differ
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    discrete: Iterable[str],
    tolerance: Tolerance,
) -> Comparison:
    """Compare one batch of outputs (dim 0 = samples) by name; see :class:`Tolerance`.

    NaN in the same place in both counts as equal; NaN or inf against a finite value fails.
    """
    discrete = set(discrete)
    failures: list[str] = []
    missing = sorted(set(reference) - set(candidate))
    if missing:
        return Comparison(0, {}, 0, [f"plan has no outputs {missing}"])
    shapes = {n: (np.shape(reference[n]), np.shape(candidate[n])) for n in reference}
    bad = {n: s for n, s in shapes.items() if s[0] != s[1]}
    if bad:
        return Comparison(0, {}, 0, [f"{n}: shape {c} from the plan, {r} from ONNX Runtime" for n, (r, c) in sorted(bad.items())])
    batch = len(next(iter(reference.values()))) if reference else 0
    aligned = np.ones(batch, dtype=bool)
    for name in sorted(discrete & set(reference)):
        ref = np.asarray(reference[name]).reshape(batch, -1)
        got = np.asarray(candidate[name]).reshape(batch, -1)
        aligned &= (ref == got).all(axis=1)
    misaligned = int(batch - aligned.sum())
    if batch and misaligned / batch > tolerance.max_misaligned:
        names = sorted(discrete & set(reference))
        failures.append(
            f"{misaligned} of {batch} samples differ in {names} (allowed fraction {tolerance.max_misaligned:g})"
        )
    diffs: dict[str, float | None] = {}
    for name in reference:
        if name in discrete:
            continue
        if not aligned.any():
            diffs[name] = None
            continue
        ref = np.asarray(reference[name], dtype=np.float64)[aligned]
        got = np.asarray(candidate[name], dtype=np.float64)[aligned]
        both_nan = np.isnan(ref) & np.isnan(got)
        with np.errstate(invalid="ignore"):
            delta = np.where(both_nan, 0.0, np.abs(ref - got))
        delta = np.where(np.isnan(delta), np.inf, delta)
        diff = float(delta.max()) if delta.size else 0.0
        diffs[name] = diff
        atol = tolerance.for_output(name)
        if not diff <= atol:
            failures.append(f"{name}: max abs difference {diff:.3g} > atol {atol:g}")
    return Comparison(batch, diffs, misaligned, failures)


# --------------------------------------------------------------------------- samples and verification


SYNTHETIC_SOURCE = "synthetic patient (wff.training.synth, seed {seed})"


def _synthetic_patient(out: Path, seed: int) -> Path:
    """Write one synthetic patient's DICOM series (wff.training.synth) under ``out``; returns its folder."""
    from wff.training.synth import draw_patients, write_patient

    patient = draw_patients(2, 2, np.random.default_rng(seed))[0]  # the smallest draw: 2 train + 2 test
    write_patient(out, patient, seed)
    return out / patient.patient_id


def _spread(n: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over 0..n-1 (repeating when count > n)."""
    return np.linspace(0, n - 1, count).round().astype(np.int64)


def patient_samples(repository: str | Path, patient: str | Path | None = None, batch: int = DEFAULT_VERIFY_BATCH,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Verification inputs of both plans from one patient, prepared as the served ensemble prepares them.

    ``patient`` is a folder of one patient's DICOM series; without it a synthetic patient
    (wff.training.synth, ``seed``) is written to a temporary folder. With the repository's
    profile.json, the preprocess step's functions read and letterbox the series; the detector
    inputs are ``batch`` of those slices, spread evenly over the patient. The repository's
    detector ``model.onnx`` (ONNX Runtime) then runs on every slice and the crop step cuts the
    served clip of each series; when the patient has fewer series than ``batch``, further clips
    of the same regions, centred one clip length further along each series, fill the batch.

    Returns ``{detector input: (batch, 1, S, S), classifier input: (batch, 1, N, C, C)}``,
    float32 in [0, 1]. Raises :class:`PlanError` for a repository without profile.json or a
    folder the preprocess step refuses.
    """
    from wff.config import ServingConfig
    from wff.contracts import contracts_for
    from wff.ensemble import steps
    from wff.ensemble.crop import clip_indices, crop_clip, expand_box
    from wff.ensemble.dicom_series import read_study_dir
    from wff.ensemble.pipeline import run_batched
    from wff.ensemble.preprocess import prepare_patient
    from wff.ensemble.types import InputError

    if batch < 1:
        raise ValueError(f"verification batch must be >= 1, got {batch}")
    repository = Path(repository)
    profile = repository_profile(repository)
    if profile is None:
        raise PlanError(f"{repository}: no profile.json in the repository, so its slices cannot be prepared; "
                        f"rebuild it with `wff repo build --target tensorrt`, or pass an npz with --samples")
    # a given folder must pass the served request limits; the synthetic patient (up to 84 slices)
    # is read under the default limits, so a profile with smaller ones still gets its samples
    limits = profile.serving if patient is not None else ServingConfig()
    with tempfile.TemporaryDirectory(prefix="wff-trt-samples-") as tmp:
        folder = Path(patient) if patient is not None else _synthetic_patient(Path(tmp), seed)
        try:
            prepared = prepare_patient(read_study_dir(folder, limits), profile.image)
        except InputError as e:
            raise PlanError(f"verification samples: {e}") from e

    c = contracts_for(profile)
    (image,) = c.detector.inputs
    (clip,) = c.classifier.inputs
    detector = OnnxRuntimeRunner(latest_version_dir(repository / c.detector.name) / ONNX_FILE)
    detections = run_batched(lambda b: detector.run({image.name: b}), prepared.slices, c.detector.max_batch_size)
    # route preprocess and detector outputs into the crop step by the ensemble wiring
    wiring = {step: (in_map, out_map) for step, in_map, out_map in c.wiring}
    tensors: dict[str, np.ndarray] = {}
    for step, outputs in (("preprocess", steps.preprocess_outputs(prepared, float("nan"), {})), ("detector", detections)):
        tensors.update({wiring[step][1][k]: v for k, v in outputs.items() if k in wiring[step][1]})
    cropped = steps.crop({k: tensors[v] for k, v in wiring["crop"][0].items()}, profile)
    clips = [cropped["crop_clips"]]  # (Q, 1, N, C, C): the clips the classifier gets when serving
    cfg = profile.classifier
    for k in range(batch - len(clips[0])):
        q = k % len(clips[0])
        members = np.flatnonzero(prepared.slice_series == q)  # (n,) slices of series q
        centre, *box = cropped["crop_regions"][q]
        centre = (int(centre) + (k // len(clips[0]) + 1) * cfg.clip_len) % members.size
        box = expand_box(tuple(box), cfg.crop_margin, profile.image.size)
        clips.append(crop_clip(prepared.slices[members, 0], box, clip_indices(members.size, centre, cfg.clip_len), cfg.crop_size)[None, None])
    return {
        image.name: np.ascontiguousarray(prepared.slices[_spread(len(prepared.slices), batch)]),
        clip.name: np.ascontiguousarray(np.concatenate(clips)[:batch]),
    }


def verification_inputs(repository: str | Path, samples: str | Path | None = None,
                        batch: int = DEFAULT_VERIFY_BATCH) -> tuple[dict[str, np.ndarray], str]:
    """The arrays plans are verified on, by input name, and where they come from.

    ``samples``: an npz file (arrays named after the inputs), a patient folder of DICOM series,
    or None for a synthetic patient (:func:`patient_samples`).
    """
    if samples is not None and Path(samples).is_file():
        with np.load(samples) as data:
            return {name: data[name] for name in data.files}, str(samples)
    if samples is not None:
        return patient_samples(repository, samples, batch), f"patient folder {samples}"
    return patient_samples(repository, None, batch), SYNTHETIC_SOURCE.format(seed=0)


def load_samples(spec: PlanSpec, arrays: Mapping[str, np.ndarray], batch: int = DEFAULT_VERIFY_BATCH,
                 origin: str = "samples") -> dict[str, np.ndarray]:
    """``spec``'s verification inputs from ``arrays`` (see :func:`verification_inputs`): the first
    ``batch`` items of the array named after each input, FP32 (B, *dims)."""
    if batch < 1:
        raise ValueError(f"verification batch must be >= 1, got {batch}")
    samples = {}
    for profile in spec.inputs:
        dims = profile.max[1:]
        if profile.name not in arrays:
            raise PlanError(f"{origin}: no array {profile.name!r}; it has {sorted(arrays)}")
        array = np.asarray(arrays[profile.name], dtype=np.float32)[:batch]
        if array.shape[1:] != dims or len(array) == 0:
            raise PlanError(f"{origin}: {profile.name} is {array.shape}, expected (B, {', '.join(map(str, dims))})")
        samples[profile.name] = array
    return samples


@dataclass
class Verification:
    precision: str
    tolerance: dict[str, Any]
    batches: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.batches)

    @property
    def max_abs_diff(self) -> dict[str, float | None]:
        """Largest difference per continuous output over all batches."""
        worst: dict[str, float | None] = {}
        for c in self.batches:
            for name, diff in c.max_abs_diff.items():
                prev = worst.get(name)
                worst[name] = diff if prev is None else (prev if diff is None else max(prev, diff))
        return worst

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "tolerance": self.tolerance,
            "max_abs_diff": self.max_abs_diff,
            "batches": [{**asdict(c), "passed": c.passed} for c in self.batches],
        }


def verify_plan(
    spec: PlanSpec,
    plan_runner: Runner,
    reference: Runner,
    samples: Mapping[str, np.ndarray],
    precision: str,
    tolerance: Tolerance | None = None,
) -> Verification:
    """Run ``samples`` through the plan and the reference in batches of at most max_batch_size,
    then the first sample alone (batch 1), and compare each batch (:func:`compare_outputs`)."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    tolerance = tolerance or TOLERANCES[precision]
    total = len(next(iter(samples.values())))
    chunks = [slice(i, min(i + spec.max_batch_size, total)) for i in range(0, total, spec.max_batch_size)]
    if total > 1:
        chunks.append(slice(0, 1))
    comparisons = []
    for chunk in chunks:
        feeds = {name: np.ascontiguousarray(array[chunk]) for name, array in samples.items()}
        comparisons.append(compare_outputs(reference.run(feeds), plan_runner.run(feeds), spec.discrete_outputs, tolerance))
    return Verification(precision, {"atol": dict(tolerance.atol), "default_atol": tolerance.default_atol,
                                    "max_misaligned": tolerance.max_misaligned}, comparisons)


__all__ = [
    "PRECISIONS", "DEFAULT_VERIFY_BATCH", "TOLERANCES", "Tolerance", "Comparison", "compare_outputs", "patient_samples",
    "verification_inputs", "load_samples", "Verification", "verify_plan",
]
