"""What ``wff bench`` compares the served ensemble with, and how much arithmetic a patient costs.

* ``eager_pytorch``: the trained checkpoints (detector.pt, classifier.pt) in plain PyTorch
  eager mode, one patient at a time: DICOM decoding and preprocessing, the detector's
  inference graph, crop, the 3D classifier and fusion, routed by the same Pipeline (and the
  same step functions) as the server. This is what a user writes without Triton.
* ``onnxruntime_inprocess``: the exported ONNX models in ONNX Runtime in this process
  (Pipeline.from_artifacts), one patient at a time, no server.
* FLOPs per patient: torch.utils.flop_counter over one slice through the detector and one
  clip through the classifier, times the patient's slices and series (a multiply-add = 2 FLOPs).
* the machine's fp32 GEMM peak: the best of a few square torch.matmul sizes.

Imports torch, torchvision and wff.training (the [train] extra); wff.loadtest.bench does not, and
``wff bench`` imports this module only for --baseline and --flops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torchvision  # noqa: F401 (registers torch.ops.torchvision)
from torch.utils.flop_counter import FlopCounterMode

from wff.config import Profile
from wff.contracts import contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import load_fusion_settings
from wff.ensemble.pipeline import Pipeline
from wff.training.checkpoint import load_classifier, load_detector
from wff.training.detector_graph import DetectorGraph
from wff.training.models import build_classifier, build_detector
from wff.training.train import TorchRunner

CHECKPOINTS = ("detector.pt", "classifier.pt")
GEMM_SIZES = (512, 1024, 2048)
GEMM_SECONDS = 1.0  # timed per size, after one warm-up product
TYPICAL_PATIENT = {"series": 3, "slices": 45}  # 3 sagittal series x 15 slices


def baseline_threads() -> int:
    """Threads for the in-process baselines: every core, as a plain script gets by default."""
    return os.cpu_count() or 1


def eager_pytorch_pipeline(artifacts: str | Path, threads: int | None = None) -> Pipeline:
    """The trained checkpoints in eager PyTorch on CPU, with ``threads`` intra-op threads (every core)."""
    artifacts = Path(artifacts)
    missing = [f for f in (*CHECKPOINTS, "fusion.json", "age_prior.json") if not (artifacts / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{artifacts}: missing {missing} for the eager PyTorch baseline; give a wff train output folder")
    detector, profile = load_detector(artifacts / "detector.pt")
    classifier, _ = load_classifier(artifacts / "classifier.pt")
    torch.set_num_threads(threads or baseline_threads())
    c = contracts_for(profile)
    return Pipeline(
        profile,
        TorchRunner(DetectorGraph(detector, profile).eval(), c.detector),
        TorchRunner(classifier, c.classifier),
        load_fusion_settings(artifacts / "fusion.json"),
        AgePrior.load(artifacts / "age_prior.json"),
    )


def onnxruntime_pipeline(artifacts: str | Path, threads: int | None = None) -> Pipeline:
    """The exported models in ONNX Runtime, in this process, with ``threads`` intra-op threads (every core)."""
    return Pipeline.from_artifacts(artifacts, threads or baseline_threads())


def model_flops(profile: Profile, detector=None, classifier=None) -> dict[str, int]:
    """FLOPs of one detector slice and one classifier clip; random-init models when none are given."""
    torch.manual_seed(0)
    detector = detector if detector is not None else build_detector(profile).eval()
    classifier = classifier if classifier is not None else build_classifier(profile).eval()
    graph = DetectorGraph(detector, profile).eval()
    size, clip = profile.image.size, profile.classifier
    counts = {}
    with torch.no_grad():
        for name, module, x in (
            ("detector_per_slice", graph, torch.rand(1, 1, size, size)),
            ("classifier_per_clip", classifier.eval(), torch.rand(1, 1, clip.clip_len, clip.crop_size, clip.crop_size)),
        ):
            counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas())
            with counter:
                module(x)
            counts[name] = int(counter.get_total_flops())
    return counts


def _deform_conv_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """torchvision's deform_conv2d as the convolution it computes: 2 x outputs x (Cin/groups) x kh x kw
    (the bilinear sampling of the offsets is left out)."""
    n, c_out, h, w = out_shape
    return 2 * n * c_out * h * w * weight_shape[1] * weight_shape[2] * weight_shape[3]


def _custom_flop_formulas() -> dict:
    """FLOP formulas for ops torch's counter does not know: the paper detector's deformable convolutions."""
    return {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}


def patient_flops(counts: dict[str, int], slices: float, series: float) -> float:
    """FLOPs of one patient: every slice through the detector, one clip per series through the classifier."""
    return counts["detector_per_slice"] * slices + counts["classifier_per_clip"] * series


def gemm_peak_gflops(threads: int | None = None, sizes=GEMM_SIZES, seconds: float = GEMM_SECONDS) -> dict:
    """Best fp32 torch.matmul rate (GFLOP/s, 2 n^3 per product) over square sizes, with ``threads`` threads."""
    if threads:
        torch.set_num_threads(threads)
    best = {"gflops": 0.0, "n": None, "threads": torch.get_num_threads()}
    for n in sizes:
        a, b = torch.rand(n, n), torch.rand(n, n)
        torch.matmul(a, b)
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            torch.matmul(a, b)
            done += 1
        rate = 2 * n**3 * done / elapsed / 1e9
        if rate > best["gflops"]:
            best.update(gflops=rate, n=n)
    return best


def profile_flops_table(profiles: dict[str, Profile], slices: int = TYPICAL_PATIENT["slices"], series: int = TYPICAL_PATIENT["series"]) -> dict:
    """Per profile: FLOPs per slice, per clip and per typical patient (GFLOP)."""
    table = {}
    for name, profile in profiles.items():
        counts = model_flops(profile)
        table[name] = {
            "image_size": profile.image.size,
            "detector_gflop_per_slice": counts["detector_per_slice"] / 1e9,
            "classifier_gflop_per_clip": counts["classifier_per_clip"] / 1e9,
            "gflop_per_patient": patient_flops(counts, slices, series) / 1e9,
            "patient": {"slices": slices, "series": series},
        }
    return table
