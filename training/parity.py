"""ONNX Runtime against PyTorch on a whole split of a dataset (the test split by default).

    wff dev parity DATASET ARTIFACTS [--split test] [--json FILE|-]

``wff train`` checks each export on a few training slices and clips. This runs every patient of
a split through the run's PyTorch checkpoints and through its exported ONNX models, with the
serving preprocessing, crop and fusion in between, and compares:

* the detector on every slice, same input: score, malignancy (P) and box coordinates (pixels)
  of each detection, on the slices where both return the same number of detections; the
  slices where the counts differ (a score at the detector's cut) are counted;
* the classifier on every series' clip, same input (the clip cropped from the PyTorch
  detections): P(benign), P(malignant);
* the end result: each strategy's patient score and decision, PyTorch pipeline against ONNX
  Runtime pipeline.

It passes when the probabilities differ by at most ``PARITY_ATOL``, the boxes by at most
``PARITY_ATOL`` x 100 pixels (the tolerances of ``wff train``'s check), and no decision changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wff.config import load_profile
from wff.contracts import contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import STRATEGIES, load_fusion_settings
from wff.ensemble.pipeline import ARTIFACT_MODELS, Pipeline, check_artifacts, run_batched
from wff.ensemble.runtime import OnnxRunner
from wff.ensemble.steps import preprocess_outputs
from wff.training.train import CHECKPOINTS, PARITY_ATOL, TorchRunner, load_split

Progress = Callable[[str], None]


def _max(current: float, values: np.ndarray) -> float:
    return max(current, float(np.abs(values).max())) if values.size else current


class _Recorder:
    """A pipeline runner that keeps the batches it ran and their outputs, until :meth:`take`."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.calls: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.runner(batch)
        self.calls.append((batch, out))
        return out

    def take(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The inputs and outputs recorded since the last take, concatenated along the batch."""
        batches, outputs = zip(*self.calls)
        self.calls = []
        return np.concatenate(batches), {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def split_parity(dataset: str | Path, artifacts: str | Path, split: str = "test", progress: Progress | None = None,
                 threads: int | None = None) -> dict:
    """The comparison of the module docstring; returns its summary (JSON-ready)."""
    from wff.training.checkpoint import load_classifier, load_detector
    from wff.training.detector_graph import DetectorGraph

    progress = progress or (lambda _: None)
    artifacts = Path(artifacts)
    check_artifacts(artifacts)
    profile = load_profile(artifacts / "profile.json")
    threads = threads or profile.serving.runtime_threads
    c = contracts_for(profile)
    settings = load_fusion_settings(artifacts / "fusion.json")
    prior = AgePrior.load(artifacts / "age_prior.json")
    detector, _ = load_detector(artifacts / CHECKPOINTS["detector"])
    classifier, _ = load_classifier(artifacts / CHECKPOINTS["classifier"])
    recorders = {name: {"detector": _Recorder(det_runner), "classifier": _Recorder(cls_runner)} for name, det_runner, cls_runner in (
        ("pytorch", TorchRunner(DetectorGraph(detector, profile), c.detector), TorchRunner(classifier, c.classifier)),
        ("onnxruntime", *(OnnxRunner(artifacts / ARTIFACT_MODELS[step], c.step(step), threads) for step in ARTIFACT_MODELS)),
    )}
    pipelines = {name: Pipeline(profile, r["detector"], r["classifier"], settings, prior) for name, r in recorders.items()}

    t0 = time.perf_counter()
    patients = load_split(Path(dataset), split, profile, progress)
    det = {"slices": 0, "detections": 0, "count_differs": 0, "score": 0.0, "malignancy": 0.0, "box_px": 0.0}
    cls = {"clips": 0, "probs": 0.0}
    strategies = {s: {"p_max_abs_diff": 0.0, "decisions_changed": 0} for s in STRATEGIES if s in settings.strategies}
    for i, patient in enumerate(patients, 1):
        pre = preprocess_outputs(patient.prepared, float(patient.record.age), {})
        comps = {name: p.run_from_preprocessed(pre).components() for name, p in pipelines.items()}
        # both detectors saw the same slices; their own outputs are compared
        (_, ref), (_, got) = (recorders[name]["detector"].take() for name in ("pytorch", "onnxruntime"))
        counts_ref, counts_got = ref["detector_count"].reshape(-1), got["detector_count"].reshape(-1)
        det["slices"] += len(counts_ref)
        det["count_differs"] += int((counts_ref != counts_got).sum())
        for s in np.flatnonzero(counts_ref == counts_got):
            n = int(counts_ref[s])
            det["detections"] += n
            det["score"] = _max(det["score"], ref["detector_scores"][s, :n] - got["detector_scores"][s, :n])
            det["malignancy"] = _max(det["malignancy"], ref["detector_malignancy"][s, :n] - got["detector_malignancy"][s, :n])
            det["box_px"] = _max(det["box_px"], ref["detector_boxes"][s, :n] - got["detector_boxes"][s, :n])
        # the classifiers' clips came from each pipeline's own detections: ONNX Runtime reruns PyTorch's clips
        clips, probs_ref = recorders["pytorch"]["classifier"].take()
        recorders["onnxruntime"]["classifier"].take()
        probs_got = run_batched(recorders["onnxruntime"]["classifier"].runner, clips, c.classifier.max_batch_size)
        cls["clips"] += len(clips)
        cls["probs"] = _max(cls["probs"], probs_ref["classifier_probs"] - probs_got["classifier_probs"])
        for strategy, row in strategies.items():
            a, b = (settings.decide(comps[name], strategy) for name in ("pytorch", "onnxruntime"))
            row["p_max_abs_diff"] = max(row["p_max_abs_diff"], abs(a.p_malignant - b.p_malignant))
            row["decisions_changed"] += int(a.label != b.label)
        if i % 10 == 0 or i == len(patients):
            progress(f"compared {i}/{len(patients)} {split} patients")
    passed = (
        det["score"] <= PARITY_ATOL and det["malignancy"] <= PARITY_ATOL and det["box_px"] <= PARITY_ATOL * 100
        and cls["probs"] <= PARITY_ATOL and all(r["decisions_changed"] == 0 for r in strategies.values())
    )
    return {
        "artifacts": str(artifacts),
        "split": split,
        "patients": len(patients),
        "tolerance": {"probability": PARITY_ATOL, "box_px": PARITY_ATOL * 100},
        "detector": det,
        "classifier": cls,
        "strategies": strategies,
        "passed": bool(passed),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_parity(summary: dict) -> str:
    d, c = summary["detector"], summary["classifier"]
    tol = summary["tolerance"]
    lines = [
        f"ONNX Runtime vs PyTorch on the {summary['split']} split: {summary['patients']} patients, {summary['seconds']} s",
        f"detector   {d['slices']} slices, {d['detections']} detections compared, {d['count_differs']} slices with another count; "
        f"max |diff| score {d['score']:.2g}, malignancy {d['malignancy']:.2g}, box {d['box_px']:.2g} px",
        f"classifier {c['clips']} clips; max |diff| P {c['probs']:.2g}",
        "strategy       max |dP|  decisions changed",
        *(f"{s:<13} {r['p_max_abs_diff']:9.2g}  {r['decisions_changed']}" for s, r in summary["strategies"].items()),
        f"tolerance: P {tol['probability']:g}, boxes {tol['box_px']:g} px, no decision changed -> "
        + ("PASSED" if summary["passed"] else "FAILED"),
    ]
    return "\n".join(lines)
