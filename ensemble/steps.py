"""The Python steps of the ensemble as plain functions over contract-named numpy dicts.

Each Triton adapter in model_repository/ and the in-process pipeline call these same
functions, so the served path and the in-process path run identical code. Inputs and outputs
are keyed by the tensor names of wff.contracts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from wff.config import Profile
from wff.ensemble.age_prior import AgePrior, check_age
from wff.ensemble.crop import crop_patient
from wff.ensemble.fusion import Components, FusionSettings, best_boxes
from wff.ensemble.types import InputError, PreparedPatient

Arrays = Mapping[str, np.ndarray]


def request_age(age: np.ndarray | None, max_age: float) -> float | None:
    """The AGE_YEARS input: empty (or absent) = not given, one finite value in range = the age."""
    if age is None or np.asarray(age).size == 0:
        return None
    values = np.asarray(age, np.float64).reshape(-1)
    if values.size != 1:
        raise InputError(f"AGE_YEARS must hold 0 or 1 values, got {values.size}")
    try:
        return check_age(values[0], max_age)
    except ValueError as e:
        raise InputError(f"AGE_YEARS: {e}") from None


def preprocess(files: Sequence[tuple[str, bytes]], age: float | None, profile: Profile) -> dict[str, np.ndarray]:
    """DICOM files + optional age -> detector-ready slices and the patient's metadata.

    The request's age overrides the PatientAge tag; with neither, the age is NaN and the
    fusion leaves the age term out.
    """
    from wff.ensemble.dicom_series import read_study  # pydicom is only needed here
    from wff.ensemble.preprocess import prepare_patient

    study = read_study(files, profile.serving)
    prepared = prepare_patient(study, profile.image)
    notes: dict = {"skipped_series": list(study.skipped)}
    if age is not None:
        used, notes["age_source"] = age, "request"
    elif study.patient_age is not None and 0 <= study.patient_age <= profile.age.max_age:
        used, notes["age_source"] = study.patient_age, "PatientAge"
    else:
        used, notes["age_source"] = float("nan"), "none: diagnosed without the age term"
    return preprocess_outputs(prepared, used, notes)


def preprocess_outputs(prepared: PreparedPatient, age_used: float, notes: dict) -> dict[str, np.ndarray]:
    """The preprocess step's output tensors for an already prepared patient (also used by training)."""
    return {
        "preprocess_slices": np.ascontiguousarray(prepared.slices, np.float32),
        "preprocess_slice_series": prepared.slice_series.astype(np.int32),
        "preprocess_age_years": np.array([age_used], np.float32),
        "preprocess_series_info": np.array([json.dumps(s).encode() for s in prepared.series_info], dtype=np.object_),
        "preprocess_notes": np.array([json.dumps(notes).encode()], dtype=np.object_),
    }


def crop(inputs: Arrays, profile: Profile) -> dict[str, np.ndarray]:
    clips, regions, _ = crop_patient(
        inputs["crop_slices"],
        inputs["crop_slice_series"],
        inputs["crop_boxes"],
        inputs["crop_scores"],
        inputs["crop_count"],
        profile.classifier,
        profile.fusion.det_threshold,
    )
    return {"crop_clips": clips, "crop_regions": regions}


def fusion(inputs: Arrays, settings: FusionSettings, age_prior: AgePrior) -> dict[str, np.ndarray]:
    slice_d, slice_score, slice_box = best_boxes(
        inputs["fusion_boxes"], inputs["fusion_scores"], inputs["fusion_malignancy"], inputs["fusion_count"]
    )
    age = float(np.asarray(inputs["fusion_age_years"]).reshape(-1)[0])
    components = Components(
        slice_d=slice_d,
        slice_score=slice_score,
        slice_series=np.asarray(inputs["fusion_slice_series"], np.int32),
        series_m=np.asarray(inputs["fusion_series_probs"], np.float32)[:, 1],
        age_a=float("nan") if math.isnan(age) else age_prior(age),
    )
    decision = settings.decide(components)
    return {
        "fusion_diagnosis": np.array([b"malignant" if decision.label else b"benign"], dtype=np.object_),
        "fusion_p_malignant": np.array([decision.p_malignant], np.float32),
        "fusion_series_votes": decision.series_votes.astype(np.int32),
        "fusion_series_m": components.series_m,
        "fusion_slice_d": slice_d,
        "fusion_slice_score": slice_score,
        "fusion_slice_box": slice_box,
        "fusion_age_a": np.array([components.age_a], np.float32),
    }
