"""Train the WFF models from a DICOM dataset and write the artifacts the server needs.

    wff train DATASET --profile small --out runs/small            # CPU default
    wff train DATASET --profile paper --out runs/paper --device cuda

Steps, following the paper's protocol:

1. read the training split (DICOM + LabelMe) through the serving preprocessing;
2. fit the age prior on the training patients;
3. k-fold cross-validation (train.cv_folds): for each fold, train a detector and a sequence
   classifier on the other folds, fit the fold's age prior, and diagnose the held-out patients
   through the same pipeline as the server (detections -> crop -> classifier -> fusion)
   to get out-of-fold components; choose l1, l2, l3 for each strategy of Table 3 on them
   (and, with ``fusion.det_threshold_grid``, the voting threshold);
4. train the final detector and classifier on the whole training split;
5. export both to ONNX, check ONNX Runtime against PyTorch, and write the artifacts:
   profile.json, detector.pt, classifier.pt, detector.onnx, classifier.onnx, age_prior.json
   and its figure age_prior.png (the paper's Fig. 5), fusion.json, train_report.json,
   cv_components.json (the out-of-fold fusion inputs the weights were chosen on) and, with
   train.save_fold_models, folds/fold<k>/{detector,classifier}.pt (the fold models they came
   from; the server serves the final models only).

With ``detectors_from`` (``wff train --detectors-from``), every detector (each fold's and the
final one) is taken from an earlier run's artifacts instead of being trained again, after
checking that it was trained with the same image, detector and CV settings and on the same
patients: what a classifier-only study such as the clip-length ablation needs, at the cost of
the classifier fits alone. With ``final_from`` (``wff train --final-from``), the final detector
and classifier are taken from an earlier run (same image, detector and classifier settings,
train.seed and train.max_steps, same patients) and only the folds are trained: what a study of
the cross-validation itself (e.g. full-length fold models, train.cv_epoch_scale = 1) needs.

``refit_fusion`` (``wff dev refit-fusion ARTIFACTS``) redoes only the choice of step 3 from the
run's cv_components.json with other fusion settings (metric, threshold grids, prevalence):
nothing is trained and the test split is not read.

The test split is not touched here: it is used once, by ``wff evaluate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from wff.config import Profile, load_profile, profile_from_dict
from wff.contracts import StepContract, contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import Components, FusionSettings
from wff.ensemble.pipeline import ARTIFACT_MODELS, Pipeline, fold_models_dir
from wff.ensemble.steps import preprocess_outputs
from wff.ensemble.types import AnnotatedPatient
from wff.training.cv import check_search, choose_fusion, stratified_folds
from wff.training.pretrained import check_pretrained

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
PARITY_ATOL = 1e-3  # ONNX Runtime vs PyTorch, max abs difference on probabilities and boxes/100
PARITY_SLICES = 8  # labelled slices the exported detector is checked on


class TorchRunner:
    """A PyTorch module as a pipeline runner: numpy batch in, contract-named numpy outputs."""

    def __init__(self, module, contract: StepContract, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.module = module.eval().to(device)
        self.contract = contract
        self.device = device

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.no_grad():
            out = self.module(self.torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {spec.name: t.cpu().numpy().astype(spec.numpy_dtype) for spec, t in zip(self.contract.outputs, out)}


def load_split(dataset: Path, split: str, profile: Profile, progress: Progress) -> list[AnnotatedPatient]:
    from wff.training.dataset import load_patient, load_records

    records = load_records(dataset, split=split)
    if not records:
        raise ValueError(f"{dataset}/labels.csv has no patients in split {split!r}")
    patients = []
    for i, record in enumerate(records, 1):
        patients.append(load_patient(record, profile.image))
        if i % 10 == 0 or i == len(records):
            progress(f"read {i}/{len(records)} {split} patients")
    return patients


def out_of_fold_components(
    patients: Sequence[AnnotatedPatient], detector, classifier, prior: AgePrior, profile: Profile, device: str
) -> list[Components]:
    """Diagnose patients with in-memory PyTorch models through the serving pipeline."""
    from wff.training.detector_graph import DetectorGraph

    c = contracts_for(profile)
    pipeline = Pipeline(
        profile,
        TorchRunner(DetectorGraph(detector, profile), c.detector, device),
        TorchRunner(classifier, c.classifier, device),
        FusionSettings(),  # components do not depend on the weights
        prior,
    )
    comps = []
    for p in patients:
        pre = preprocess_outputs(p.prepared, float(p.record.age), {})
        comps.append(pipeline.run_from_preprocessed(pre).components())
    return comps


DETECTOR_TRAIN_KEYS = ("seed", "cv_folds", "cv_epoch_scale", "max_steps")  # train.* settings a detector fit depends on
# train.* settings a final fit depends on (the final models see every training patient at full epochs, seeded
# with train.seed, whatever the folds are)
FINAL_TRAIN_KEYS = ("seed", "max_steps")
MODEL_SECTIONS = {"detector": ("image", "detector"), "classifier": ("image", "classifier")}  # profile sections a fit depends on


def training_set_digest(patients: Sequence[AnnotatedPatient]) -> str:
    """A short digest of the patients a model was trained on (their ids hashed; no id is stored)."""
    ids = "\n".join(sorted(p.record.patient_id for p in patients))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def reuse_model(path: Path, kind: str, profile: Profile, digest: str, train_keys: Sequence[str], option: str, device: str = "cpu"):
    """The ``kind`` ("detector" or "classifier") checkpoint at ``path``, in place of a new fit with
    ``profile`` on the patients of ``digest``.

    Raises ValueError naming the settings that differ (the MODEL_SECTIONS of ``kind``, or the
    ``train_keys`` of train.*) or when the checkpoint records other training patients; a
    checkpoint written before digests were recorded is checked on its settings only. ``option``
    names the command-line option in the advice.
    """
    from wff.training.checkpoint import load_checkpoint, load_classifier, load_detector

    ckpt, saved = load_checkpoint(path, kind)
    ours, theirs = profile.to_dict(), saved.to_dict()
    differ = [f"{s}.{k}" for s in MODEL_SECTIONS[kind] for k in ours[s] if ours[s][k] != theirs[s][k]]
    differ += [f"train.{k}" for k in train_keys if ours["train"][k] != theirs["train"][k]]
    if differ:
        raise ValueError(f"{path}: trained with other settings ({', '.join(differ)}); train the {kind} again (no {option})")
    recorded = ckpt["extra"].get("patients")
    if recorded is not None and recorded != digest:
        raise ValueError(f"{path}: trained on other patients than this run's; use {option} only with the same dataset and folds")
    model, _ = (load_detector if kind == "detector" else load_classifier)(path, device)
    return model


def reuse_detector(path: Path, profile: Profile, digest: str, device: str = "cpu"):
    """A fold or final detector for ``--detectors-from`` (see :func:`reuse_model`; DETECTOR_TRAIN_KEYS)."""
    return reuse_model(path, "detector", profile, digest, DETECTOR_TRAIN_KEYS, "--detectors-from", device)


def fit_models(
    patients: Sequence[AnnotatedPatient],
    profile: Profile,
    scale: float,
    device: str,
    progress: Progress,
    tag: str,
    detector_from: Path | None = None,
):
    """Detector and classifier fitted on ``patients`` for ``scale`` of the profile's epochs (the detector
    taken from the checkpoint ``detector_from`` instead, when given: see :func:`reuse_detector`)."""
    from wff.training.engine import fit_detector, fit_classifier

    det_epochs = max(1, math.ceil(profile.detector.epochs * scale))
    cls_epochs = max(1, math.ceil(profile.classifier.epochs * scale))

    def report(kind: str) -> Callable:
        def cb(step: int, total: int, losses: dict) -> None:
            if step == total or step % max(1, total // 10) == 0:
                loss = sum(float(v) for v in losses.values())
                progress(f"{tag} {kind}: step {step}/{total} loss {loss:.3f}")

        return cb

    t0 = time.perf_counter()
    if detector_from is None:
        detector = fit_detector(patients, profile, det_epochs, device=device, progress=report("detector"), seed=profile.train.seed)
    else:
        detector = reuse_detector(detector_from, profile, training_set_digest(patients), device)
        progress(f"{tag} detector: reused from {detector_from}")
    t1 = time.perf_counter()
    classifier = fit_classifier(patients, profile, cls_epochs, device=device, progress=report("classifier"), seed=profile.train.seed)
    t2 = time.perf_counter()
    timing = {"detector_s": round(t1 - t0, 1), "classifier_s": round(t2 - t1, 1)}
    if detector_from is not None:
        timing["detector_reused_from"] = str(detector_from)
    return detector, classifier, timing


# the PyTorch checkpoints a run writes, final and per fold (the order export_and_check takes the models in)
CHECKPOINTS = {"detector": "detector.pt", "classifier": "classifier.pt"}


def export_and_check(detector, classifier, patients: Sequence[AnnotatedPatient], profile: Profile, out: Path) -> dict:
    """Export both models to ONNX and compare ONNX Runtime with PyTorch on real training inputs."""
    import torch

    from wff.ensemble.crop import crop_patient
    from wff.training.detector_graph import DetectorGraph
    from wff.training.export import check_onnx, export_classifier, export_detector

    detector, classifier = detector.cpu().eval(), classifier.cpu().eval()
    graph = DetectorGraph(detector, profile).eval()
    export_detector(detector, profile, out / ARTIFACT_MODELS["detector"])
    export_classifier(classifier, profile, out / ARTIFACT_MODELS["classifier"])
    # slices with labelled tumours, so the detector comparison covers real detections, not padding
    tumour_slices = [p.prepared.slices[i] for p in patients for i, b in enumerate(p.boxes) if len(b)][:PARITY_SLICES]
    images = torch.from_numpy(np.ascontiguousarray(np.stack(tumour_slices), np.float32))
    sample = patients[0].prepared
    with torch.no_grad():
        boxes, scores, _, _, count = graph(torch.from_numpy(np.ascontiguousarray(sample.slices, np.float32)))
    clips, _, _ = crop_patient(
        sample.slices, sample.slice_series, boxes.numpy(), scores.numpy(), count.numpy(), profile.classifier, profile.fusion.det_threshold
    )
    with torch.no_grad():
        detections = int(graph(images)[4].sum())
    det_diff = check_onnx(out / ARTIFACT_MODELS["detector"], graph, images, atol=PARITY_ATOL * 100)
    cls_diff = check_onnx(out / ARTIFACT_MODELS["classifier"], classifier, torch.from_numpy(clips), atol=PARITY_ATOL)
    return {
        "detector_max_abs_diff": float(det_diff),
        "detector_checked_slices": len(images),
        "detector_checked_detections": detections,
        "classifier_max_abs_diff": float(cls_diff),
        "classifier_checked_clips": len(clips),
    }


CV_COMPONENTS = "cv_components.json"  # the out-of-fold fusion inputs behind fusion.json's weights


def write_cv_components(path: Path, components: Sequence[Components], labels: np.ndarray, folds: Sequence[np.ndarray]) -> None:
    """The out-of-fold components of every training patient (in labels.csv order, no identifiers),
    their labels and folds: what the weights were chosen on, kept so that another choice (a metric,
    a grid, a threshold) can be studied without training the folds again."""
    fold_of = np.empty(len(labels), np.int64)
    for k, held_out in enumerate(folds):
        fold_of[held_out] = k
    data = {
        "labels": [int(v) for v in labels],
        "folds": [int(v) for v in fold_of],
        "components": [c.to_dict() for c in components],
    }
    path.write_text(json.dumps(data) + "\n")


def read_cv_components(path: str | Path) -> tuple[list[Components], np.ndarray, np.ndarray]:
    """(components, labels, fold of each patient) as written by :func:`write_cv_components`."""
    data = json.loads(Path(path).read_text())
    comps = [Components.from_dict(c) for c in data["components"]]
    return comps, np.array(data["labels"], np.int64), np.array(data["folds"], np.int64)


def run_training(
    dataset: str | Path,
    out: str | Path,
    profile: Profile,
    device: str = "cpu",
    progress: Progress | None = None,
    detectors_from: str | Path | None = None,
    final_from: str | Path | None = None,
) -> Path:
    """The whole protocol above; returns the artifacts folder. ``detectors_from``: an earlier run's
    artifacts whose fold and final detectors are reused; ``final_from``: an earlier run's artifacts
    whose final detector and classifier are reused (see the module docstring)."""
    import torch

    from wff.training.engine import save_checkpoint

    progress = progress or log.info
    dataset, out = Path(dataset), Path(out)
    if detectors_from is not None and final_from is not None:
        raise ValueError("use --detectors-from or --final-from, not both")
    check_search(profile.fusion)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(profile.train.num_threads)
    torch.manual_seed(profile.train.seed)
    t_start = time.perf_counter()
    pretrained = check_pretrained(profile, progress)  # a wrong weights file is refused before the dataset is read

    patients = load_split(dataset, "train", profile, progress)
    labels = np.array([p.record.label for p in patients])
    ages = np.array([p.record.age for p in patients], np.float64)
    prior = AgePrior.fit(ages, labels, profile.age)
    report: dict = {"profile": profile.name, "patients": len(patients), "malignant": int(labels.sum()), "timings": {}}
    report["pretrained"] = pretrained
    final_models = None
    if final_from is not None:  # checked before the folds are trained
        digest = training_set_digest(patients)
        final_models = tuple(
            reuse_model(Path(final_from) / CHECKPOINTS[kind], kind, profile, digest, FINAL_TRAIN_KEYS, "--final-from", device)
            for kind in CHECKPOINTS
        )

    folds = stratified_folds(labels, profile.train.cv_folds, profile.train.seed)
    oof: list[Components | None] = [None] * len(patients)
    for k, held_out in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(patients)), held_out)
        tag = f"fold {k + 1}/{len(folds)}"
        fold_patients = [patients[i] for i in keep]
        reused = None if detectors_from is None else fold_models_dir(detectors_from, k) / CHECKPOINTS["detector"]
        det, cls, timing = fit_models(fold_patients, profile, profile.train.cv_epoch_scale, device, progress, tag, reused)
        fold_prior = AgePrior.fit(ages[keep], labels[keep], profile.age)
        if profile.train.save_fold_models:
            fold_dir = fold_models_dir(out, k)
            extra = {"fold": k + 1, "patients": training_set_digest(fold_patients)}
            save_checkpoint(fold_dir / CHECKPOINTS["detector"], det, profile, "detector", extra)
            save_checkpoint(fold_dir / CHECKPOINTS["classifier"], cls, profile, "classifier", extra)
        comps = out_of_fold_components([patients[i] for i in held_out], det, cls, fold_prior, profile, device)
        for i, c in zip(held_out, comps):
            oof[i] = c
        report["timings"][tag] = timing
        progress(f"{tag}: {len(held_out)} held-out patients diagnosed")
    settings = choose_fusion(oof, labels, profile.fusion)
    report["cv"] = settings.cv
    write_cv_components(out / CV_COMPONENTS, oof, labels, folds)

    reused = None if detectors_from is None else Path(detectors_from) / CHECKPOINTS["detector"]
    if final_models is None:
        det, cls, timing = fit_models(patients, profile, 1.0, device, progress, "final", reused)
    else:
        (det, cls), timing = final_models, {"reused_from": str(final_from)}
        progress(f"final detector and classifier: reused from {final_from}")
    report["timings"]["final"] = timing
    extra = {"patients": training_set_digest(patients)}
    save_checkpoint(out / CHECKPOINTS["detector"], det, profile, "detector", extra)
    save_checkpoint(out / CHECKPOINTS["classifier"], cls, profile, "classifier", extra)
    report["onnx_parity"] = export_and_check(det, cls, patients, profile, out)

    profile.save(out / "profile.json")
    prior.save(out / "age_prior.json")
    prior.plot(out / "age_prior.png")  # the age module as the paper's Fig. 5
    settings.save(out / "fusion.json")
    report["timings"]["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    progress(f"artifacts written to {out} in {report['timings']['total_s']} s")
    return out


# fusion.* settings the out-of-fold components do not depend on, so they can be changed after training
# (fusion.det_threshold also picks the crop's region, which made the components: not refittable)
REFIT_FUSION_KEYS = ("strategy", "det_threshold_grid", "grid_step", "cv_metric", "prevalence", "vote_threshold_grid")


def refit_fusion(artifacts: str | Path, fusion_overrides: dict, progress: Progress | None = None) -> FusionSettings:
    """Choose the fusion again from ``artifacts``/cv_components.json with some fusion settings
    changed, and rewrite fusion.json, profile.json (its fusion section) and train_report.json
    (its ``cv``, plus a ``fusion_refits`` entry). The models are untouched."""
    progress = progress or log.info
    artifacts = Path(artifacts)
    bad = sorted(set(fusion_overrides) - set(REFIT_FUSION_KEYS))
    if bad:
        raise ValueError(f"fusion settings {bad} cannot be changed after training (the components depend on them); "
                         f"refit changes only {list(REFIT_FUSION_KEYS)}; retrain with wff train --set for the others")
    source = artifacts / CV_COMPONENTS
    if not source.is_file():
        raise FileNotFoundError(f"{source}: not found; refit needs the out-of-fold components that wff train writes")
    where = artifacts / "profile.json"
    data = load_profile(where).to_dict()
    data["fusion"].update(fusion_overrides)
    profile = profile_from_dict(data, where=f"{where} with {fusion_overrides}")
    comps, labels, _ = read_cv_components(source)
    progress(f"choosing the fusion on {len(labels)} patients' out-of-fold components with {fusion_overrides or 'the saved settings'}")
    settings = choose_fusion(comps, labels, profile.fusion)
    settings.save(artifacts / "fusion.json")
    profile.save(artifacts / "profile.json")
    report_path = artifacts / "train_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["cv"] = settings.cv
    report.setdefault("fusion_refits", []).append({"overrides": fusion_overrides, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return settings

