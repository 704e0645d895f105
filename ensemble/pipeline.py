"""The whole ensemble in one process: the reference the served path is checked against.

``Pipeline`` routes tensors between the steps exactly as the Triton ensemble does, reading the
wiring from wff.contracts, and runs the same step functions (wff.ensemble.steps) as the
Python-backend adapters. The detector and classifier are any callables mapping a batch to
contract-named outputs: ONNX Runtime sessions over the exported models (``from_artifacts``),
or the PyTorch modules during training (cross-validation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from wff.config import Profile, load_profile
from wff.contracts import Contracts, contracts_for
from wff.ensemble import steps
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import FusionSettings, load_fusion_settings

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]

ARTIFACT_MODELS = {"detector": "detector.onnx", "classifier": "classifier.onnx"}  # the final models, exported
ARTIFACT_FILES = ("profile.json", *ARTIFACT_MODELS.values(), "age_prior.json", "fusion.json")
# folds/fold<k>/{detector,classifier}.pt: the cross-validation fold models, with train.save_fold_models
FOLDS_DIR = "folds"


def fold_models_dir(artifacts: str | Path, fold: int) -> Path:
    """Where ``wff train`` saves the models of ``fold`` (0-based, as in cv_components.json's folds)."""
    return Path(artifacts) / FOLDS_DIR / f"fold{fold + 1}"


def check_artifacts(artifacts: Path) -> None:
    """FileNotFoundError naming what a ``wff train`` output folder lacks."""
    missing = [f for f in ARTIFACT_FILES if not (artifacts / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{artifacts}: missing {missing}; run wff train first")


def run_batched(runner: Runner, batch: np.ndarray, max_batch: int) -> dict[str, np.ndarray]:
    """Run ``runner`` over ``batch`` in chunks of at most ``max_batch`` and concatenate."""
    parts = [runner(batch[i : i + max_batch]) for i in range(0, len(batch), max_batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class Pipeline:
    def __init__(
        self,
        profile: Profile,
        detector: Runner,
        classifier: Runner,
        settings: FusionSettings,
        age_prior: AgePrior,
    ) -> None:
        self.profile = profile
        self.contracts: Contracts = contracts_for(profile)
        self.settings = settings
        self.age_prior = age_prior
        self._models = {"detector": detector, "classifier": classifier}

    @classmethod
    def from_artifacts(cls, artifacts: str | Path, threads: int | None = None) -> "Pipeline":
        """ONNX Runtime over the exported models of a training run (``wff train`` output)."""
        from wff.ensemble.runtime import make_runner

        artifacts = Path(artifacts)
        check_artifacts(artifacts)
        profile = load_profile(artifacts / "profile.json")
        c = contracts_for(profile)
        threads = threads or profile.serving.runtime_threads

        def runner(step: str):
            return make_runner("onnxruntime", artifacts / ARTIFACT_MODELS[step], c.step(step), threads)

        return cls(
            profile,
            runner("detector"),
            runner("classifier"),
            load_fusion_settings(artifacts / "fusion.json"),
            AgePrior.load(artifacts / "age_prior.json"),
        )

    def _step(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name in self._models:
            contract = self.contracts.step(name)
            (spec,) = contract.inputs
            return run_batched(self._models[name], inputs[spec.name], contract.max_batch_size)
        if name == "crop":
            return steps.crop(inputs, self.profile)
        if name == "fusion":
            return steps.fusion(inputs, self.settings, self.age_prior)
        raise KeyError(f"no runner for step {name!r}")

    def run_from_preprocessed(self, preprocessed: Mapping[str, np.ndarray]) -> Diagnosis:
        """Every step after preprocess, routed by the ensemble wiring."""
        tensors: dict[str, np.ndarray] = {}
        for step, in_map, out_map in self.contracts.wiring:
            if step == "preprocess":
                outputs = dict(preprocessed)
            else:
                outputs = self._step(step, {k: tensors[v] for k, v in in_map.items()})
            for k, v in out_map.items():
                tensors[v] = outputs[k]
        return Diagnosis.from_outputs(tensors)

    def diagnose_files(self, files: Sequence[tuple[str, bytes]], age: float | None = None) -> Diagnosis:
        """One patient's DICOM files (name, bytes) and optional age -> diagnosis."""
        age = steps.request_age(None if age is None else np.array([age]), self.profile.age.max_age)
        return self.run_from_preprocessed(steps.preprocess(files, age, self.profile))
