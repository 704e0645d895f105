"""Synthetic sagittal spine MRI with vertebral tumours, written as DICOM + LabelMe + labels.csv.

The paper's data is private; this generator gives a dataset with the same layout, the same
class and age structure, and a diagnosis that is hard for the same reasons.

Layout (also the layout a real dataset must have)::

    OUT/labels.csv                      patient_id,label,age,location,split
    OUT/<patient_id>/S<nn>_<SEQ>/IM0001.dcm ...
    OUT/<patient_id>/S<nn>_<SEQ>/IM0007.json    LabelMe rectangle on slices showing the tumour

Anatomy: seven vertebral bodies (rounded rectangles, dark cortical rim, marrow) along a gently
curved column, discs, spinal canal with CSF and cord, posterior elements and soft tissue;
sizes depend on the region (cervical < thoracic < lumbar ~ sacral). The patient is one 3D
object: every series samples it at its own slice positions (3-7 mm thick, 11-21 slices), so the
tumour, an irregular ellipsoid inside one vertebral body, shows on several adjacent slices of
every series. Contrast per sequence: T1 (marrow bright, fluid dark, tumour hypointense), T2
(fluid bright), STIR (fat suppressed, oedema and tumour bright). Bias field, smooth texture and
Rician noise; 12-bit unsigned data.

Difficulty (what makes it a benchmark, not a toy): each patient has a latent malignancy
appearance ``z``, drawn from N(+0.9, 1) for malignant and N(-0.9, 1) for benign patients, so
an observer who knew ``z`` exactly would reach only Phi(0.9) = 0.82 accuracy. Every visible
attribute is a noisy function of ``z`` (size, margin irregularity, internal heterogeneity,
signal per sequence, cortical breakthrough into the canal or soft tissue, vertebral collapse),
with extra noise per series and per slice, larger on T1 than on T2/STIR (the paper's Fig. 7:
T2 helps more). No single slice feature separates the classes; combining slices, series and
age does better. Age carries independent evidence, as in the paper's Fig. 5: benign ages
~ N(36, 15), malignant ~ N(57, 13), clipped to 4-82, so malignancy rises with age to nearly
all patients over 80.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from wff.config import LOCATIONS
from wff.ensemble.resample import bilinear_matrix

# size name -> (training patients, test patients); class proportions follow the paper per split
SIZES = {
    "paper": (445, 140),
    "demo": (120, 60),
    "tiny": (8, 6),
}
PAPER_TRAIN = (180, 265)  # benign, malignant (paper, Table 1)
PAPER_TEST = (90, 50)
LOCATION_WEIGHTS = np.array([297, 182, 174, 24], float)  # paper, Table 2
# Per region: vertebral body height and depth (AP) and width (LR) in mm, lordosis/kyphosis sign.
REGION_ANATOMY = {
    "cervical": (15.0, 17.0, 26.0, 1.0),
    "thoracic": (21.0, 27.0, 34.0, -1.0),
    "lumbar": (27.0, 34.0, 46.0, 1.0),
    "sacral": (24.0, 32.0, 44.0, -1.0),
}
LATENT_SHIFT = 0.9  # class means of the latent appearance z: +-LATENT_SHIFT, unit variance
AGE_BENIGN = (36.0, 15.0)
AGE_MALIGNANT = (57.0, 13.0)
AGE_RANGE = (4, 82)
# tissue signal per sequence: fat, muscle, marrow, disc, csf, cord, cortex, tumour base
SIGNALS = {
    "T1": dict(fat=0.90, muscle=0.35, marrow=0.70, disc=0.35, csf=0.12, cord=0.45, cortex=0.06, tumour=0.30),
    "T2": dict(fat=0.70, muscle=0.28, marrow=0.45, disc=0.72, csf=0.95, cord=0.50, cortex=0.05, tumour=0.62),
    "STIR": dict(fat=0.08, muscle=0.22, marrow=0.14, disc=0.58, csf=0.95, cord=0.45, cortex=0.04, tumour=0.74),
}
SEQUENCE_NOISE = {"T1": 1.3, "T2": 0.8, "STIR": 0.8}  # attribute noise multiplier (T1 less informative)
DESCRIPTIONS = {
    "T1": ("T1 TSE SAG", "sag T1 FSE", "T1_TSE_SAG", "SAG T1"),
    "T2": ("T2 TSE SAG", "sag T2 FSE", "T2_TSE_SAG", "SAG T2"),
    "STIR": ("STIR_SAG", "SAG STIR", "T2 FS SAG", "sag T2 FatSat"),
}
TIMING = {"T1": (550.0, 12.0, None), "T2": (3500.0, 100.0, None), "STIR": (4000.0, 60.0, 160.0)}  # TR, TE, TI ms
FOV_MM = {"cervical": 200.0, "thoracic": 320.0, "lumbar": 300.0, "sacral": 280.0}  # field of view by region
MIN_LABEL_PIXELS = 12  # a slice is labelled when the tumour covers at least this many pixels


@dataclass(frozen=True)
class Patient:
    patient_id: str
    label: int  # 1 malignant
    age: int
    sex: str
    location: str
    z: float  # latent malignancy appearance
    split: str


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: coarse Gaussian noise resized bilinearly."""
    rows, cols = shape
    coarse = rng.standard_normal((max(2, rows // cell), max(2, cols // cell))).astype(np.float32)
    ry = bilinear_matrix(0, coarse.shape[0], rows, coarse.shape[0])
    rx = bilinear_matrix(0, coarse.shape[1], cols, coarse.shape[1])
    return ry @ coarse @ rx.T


def draw_patients(n_train: int, n_test: int, rng: np.random.Generator) -> list[Patient]:
    """Patients with the paper's class proportions per split, ages and locations."""
    patients = []

    def split_counts(n: int, ref: tuple[int, int]) -> tuple[int, int]:
        benign = max(1, round(n * ref[0] / sum(ref))) if n > 1 else n
        return benign, n - benign

    for split, n, ref in (("train", n_train, PAPER_TRAIN), ("test", n_test, PAPER_TEST)):
        benign, malignant = split_counts(n, ref)
        for label in [0] * benign + [1] * malignant:
            mean, sd = AGE_MALIGNANT if label else AGE_BENIGN
            age = int(np.clip(round(rng.normal(mean, sd)), *AGE_RANGE))
            z = rng.normal(LATENT_SHIFT if label else -LATENT_SHIFT, 1.0)
            location = LOCATIONS[rng.choice(4, p=LOCATION_WEIGHTS / LOCATION_WEIGHTS.sum())]
            pid = f"SYN{len(patients) + 1:04d}"
            patients.append(Patient(pid, label, age, str(rng.choice(["F", "M"])), location, float(z), split))
    return patients


@dataclass(frozen=True)
class Anatomy:
    """One patient's 3D spine and tumour, in mm (u: anterior->posterior, v: superior->inferior, w: left->right)."""

    body_h: float
    body_d: float
    body_w: float
    curve: float  # amplitude of the column's curve, mm
    curve_sign: float
    canal_u: float  # u of the canal centre at v = 0
    centres_v: np.ndarray  # (7,) v of each vertebral body centre
    tumour_level: int
    tumour_centre: tuple[float, float, float]  # u, v, w
    tumour_radii: tuple[float, float, float]
    irregularity: float
    heterogeneity: float
    breakthrough: float  # mm the tumour extends posteriorly beyond the cortex (0 = contained)
    collapse: float  # fraction of body height lost at the tumour level
    contrast: dict  # sequence -> tumour signal offset


def make_anatomy(p: Patient, rng: np.random.Generator) -> Anatomy:
    h, d, w, sign = REGION_ANATOMY[p.location]
    h, d, w = (x * rng.uniform(0.9, 1.1) for x in (h, d, w))
    gap = 0.28 * h
    centres = (np.arange(7) - 3) * (h + gap) + rng.uniform(-0.3, 0.3) * h
    level = int(rng.integers(2, 5))
    z = p.z
    size = math.exp(0.18 * z + 0.12 * rng.standard_normal())
    radii = (0.36 * d * size, 0.36 * h * size, 0.32 * w * size)
    centre_u = -d / 2 + rng.uniform(-0.12, 0.12) * d - 10.0  # inside the body, anterior of the canal
    tumour = (centre_u, centres[level] + rng.uniform(-0.12, 0.12) * h, rng.uniform(-0.15, 0.15) * w)
    return Anatomy(
        body_h=h,
        body_d=d,
        body_w=w,
        curve=rng.uniform(4, 12),
        curve_sign=sign,
        canal_u=rng.uniform(-6, 6),
        centres_v=centres,
        tumour_level=level,
        tumour_centre=tumour,
        tumour_radii=tuple(min(r, lim) for r, lim in zip(radii, (0.45 * d, 0.45 * h, 0.45 * w))),
        irregularity=float(0.08 + 0.25 * _sigmoid(z + 0.7 * rng.standard_normal())),
        heterogeneity=float(0.03 + 0.12 * _sigmoid(z + 0.7 * rng.standard_normal())),
        breakthrough=float(max(0.0, z + 0.8 * rng.standard_normal() - 0.6) * 4.0),
        collapse=float(np.clip(0.25 * (z + 0.8 * rng.standard_normal() - 1.0), 0, 0.35)),
        contrast={s: float(0.10 * (z + SEQUENCE_NOISE[s] * rng.standard_normal())) for s in SIGNALS},
    )


def render_slice(a: Anatomy, seq: str, w_mm: float, rows: int, cols: int, spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sagittal slice at lateral offset w_mm -> (signal (rows, cols) in ~[0, 1], tumour mask)."""
    sig = SIGNALS[seq]
    vv = ((np.arange(rows) - rows / 2 + 0.5) * spacing).astype(np.float32)  # (rows,) superior -> inferior
    uu = ((np.arange(cols) - cols / 2 + 0.5) * spacing).astype(np.float32)  # (cols,) anterior -> posterior
    V, U = np.meshgrid(vv, uu, indexing="ij")  # (rows, cols)
    half_v = rows * spacing / 2
    shift = a.curve_sign * a.curve * np.cos(np.pi * V / (2 * half_v))  # column curve, mm along u
    Uc = U - shift - a.canal_u  # u relative to the canal centre
    img = np.full((rows, cols), sig["muscle"], np.float32)
    body_extent = max(0.0, 1 - (w_mm / (a.body_w / 2)) ** 2)  # lateral slices cut less of the body
    fat = (np.abs(Uc + 0.15 * a.body_d) > 1.25 * a.body_d) & (np.abs(Uc) < 2.8 * a.body_d)
    img[fat] = sig["fat"]
    img[(Uc < -3.2 * a.body_d) | (Uc > 3.0 * a.body_d)] = 0.02  # air outside the body
    mask = np.zeros((rows, cols), bool)
    if body_extent > 0:
        depth = a.body_d * math.sqrt(body_extent)
        du_all = (Uc + 8.0 + a.body_d / 2) / (depth / 2)  # (rows, cols) body-centred AP coordinate
        for i, cv in enumerate(a.centres_v):
            height = a.body_h * (1 - (a.collapse if i == a.tumour_level else 0.0))
            band = slice(*np.searchsorted(vv, [cv - height / 2 - spacing, cv + height / 2 + spacing]))
            du, dv = du_all[band], (V[band] - cv) / (height / 2)
            du2, dv2 = du * du, dv * dv
            r = du2 * du2 + dv2 * dv2  # superellipse |du|^4 + |dv|^4
            region = img[band]
            region[r <= 1.0] = sig["cortex"]
            region[r <= 0.72] = sig["marrow"]
            if i < len(a.centres_v) - 1:
                gap_v = (a.centres_v[i] + a.centres_v[i + 1]) / 2
                disc_h = 0.13 * a.body_h
                band = slice(*np.searchsorted(vv, [gap_v - disc_h - spacing, gap_v + disc_h + spacing]))
                dvd = (V[band] - gap_v) / disc_h
                img[band][du_all[band] ** 2 + dvd * dvd <= 0.9] = sig["disc"]
    canal = np.abs(Uc - 2.0) < 7.0 * math.sqrt(max(0.0, 1 - (w_mm / 12.0) ** 2))
    img[canal] = sig["csf"]
    cord = np.abs(Uc - 2.0) < 3.5 * math.sqrt(max(0.0, 1 - (w_mm / 7.0) ** 2))
    img[cord] = sig["cord"]
    posterior = (Uc > 10.0) & (Uc < 10.0 + 0.6 * a.body_d) & (np.cos(2 * np.pi * V / (a.body_h * 1.28)) > 0.1)
    img[posterior] = sig["marrow"] * 0.9

    # the tumour: an ellipsoid with an irregular margin, grown into the canal when it breaks through
    tu, tv, tw = a.tumour_centre
    ru, rv, rw = a.tumour_radii
    lateral = 1 - ((w_mm - tw) / rw) ** 2
    if lateral > 0:
        shift_t = a.curve_sign * a.curve * np.cos(np.pi * tv / (2 * half_v))
        du = (U - shift_t - a.canal_u - tu) / (ru * math.sqrt(lateral))
        dv = (V - tv) / (rv * math.sqrt(lateral))
        angle = np.arctan2(dv, du)
        wobble = 1 + a.irregularity * _smooth_noise(rng, (rows, cols), 8) * 0.6 + a.irregularity * 0.5 * np.sin(5 * angle + rng.uniform(0, 6))
        inside = du**2 + dv**2 <= wobble**2
        if a.breakthrough > 0:
            ext = (du > 0) & (np.abs(dv) < 0.6) & ((U - shift_t - a.canal_u - tu) < ru + a.breakthrough + 8.0)
            inside |= ext & (du**2 + dv**2 <= (wobble * 2.2) ** 2)
        texture = a.heterogeneity * _smooth_noise(rng, (rows, cols), 4) * 2.0
        level = sig["tumour"] + a.contrast[seq] * (1 if seq != "T1" else -1) + 0.04 * rng.standard_normal()
        img = np.where(inside, np.clip(level + texture, 0.02, 1.0), img)
        mask = inside
    return img, mask


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bias field, texture and Rician noise; 12-bit unsigned."""
    rows, cols = img.shape
    bias = 1 + 0.15 * _smooth_noise(rng, (rows, cols), 64)
    tissue = img * bias * (1 + 0.05 * _smooth_noise(rng, (rows, cols), 3))
    sigma = 0.03
    noisy = np.sqrt((tissue + sigma * rng.standard_normal(img.shape)) ** 2 + (sigma * rng.standard_normal(img.shape)) ** 2)
    return np.clip(noisy * 3000 + 40, 0, 4095).astype(np.uint16)


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_slice(path: Path, pixels: np.ndarray, p: Patient, series: dict, index: int, position: list[float], study_uid: str, seed: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(seed, p.patient_id, series["number"], index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(seed, p.patient_id, "series", series["number"])
    ds.FrameOfReferenceUID = _uid(seed, p.patient_id, "frame")
    ds.Modality = "MR"
    ds.PatientID = p.patient_id
    ds.PatientName = f"Synthetic^{p.patient_id[3:]}"
    ds.PatientAge = f"{p.age:03d}Y"
    ds.PatientSex = p.sex
    ds.StudyDescription = "SPINE MRI"
    ds.SeriesDescription = series["description"]
    ds.SeriesNumber = series["number"]
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [round(v, 3) for v in position]
    ds.PixelSpacing = [round(series["spacing"], 5)] * 2
    ds.SliceThickness = series["thickness"]
    ds.SpacingBetweenSlices = series["step"]
    tr, te, ti = TIMING[series["sequence"]]
    ds.RepetitionTime, ds.EchoTime = tr, te
    if ti is not None:
        ds.InversionTime = ti
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def labelme(label: str, box: tuple[float, float, float, float], image_path: str, rows: int, cols: int) -> dict:
    x1, y1, x2, y2 = box
    return {
        "version": "5.4.1",
        "flags": {},
        "shapes": [{"label": label, "points": [[x1, y1], [x2, y2]], "group_id": None, "shape_type": "rectangle", "flags": {}}],
        "imagePath": image_path,
        "imageData": None,
        "imageHeight": rows,
        "imageWidth": cols,
    }


def write_patient(out: Path, p: Patient, seed: int) -> None:
    rng = np.random.default_rng([seed, int(p.patient_id[3:])])
    anatomy = make_anatomy(p, rng)
    sequences = ["T1", "T2"] + [s for s, keep in (("STIR", rng.random() < 0.7), ("T2", rng.random() < 0.25)) if keep]
    rows, cols = [(256, 256), (256, 256), (320, 320), (256, 224)][int(rng.integers(4))]
    spacing = FOV_MM[p.location] / max(rows, cols)
    study_uid = _uid(seed, p.patient_id, "study")
    label = "malignant" if p.label else "benign"
    for k, seq in enumerate(sequences):
        n = int(rng.integers(11, 22))
        thickness = float(rng.choice([3.0, 3.5, 4.0, 5.0, 6.0, 7.0]))
        step = thickness * rng.uniform(1.0, 1.2)
        series = {"number": k + 2, "sequence": seq, "description": str(rng.choice(DESCRIPTIONS[seq])),
                  "spacing": spacing, "thickness": thickness, "step": round(step, 2)}
        folder = out / p.patient_id / f"S{k + 2:02d}_{seq}"
        folder.mkdir(parents=True, exist_ok=True)
        offsets = (np.arange(n) - (n - 1) / 2) * step + rng.uniform(-1, 1)
        for i, w_mm in enumerate(offsets):
            img, mask = render_slice(anatomy, seq, float(w_mm), rows, cols, spacing, rng)
            name = f"IM{i + 1:04d}"
            position = [float(w_mm), -cols * spacing / 2, rows * spacing / 2]
            write_slice(folder / f"{name}.dcm", _finish(img, rng), p, series, i, position, study_uid, seed)
            if mask.sum() >= MIN_LABEL_PIXELS:
                ys, xs = np.nonzero(mask)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                (folder / f"{name}.json").write_text(json.dumps(labelme(label, box, f"{name}.dcm", rows, cols), indent=1))


def synthesize_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> Path:
    """Write n_train + n_test synthetic patients and labels.csv under out_dir; returns out_dir."""
    if n_train < 2 or n_test < 2:
        raise ValueError(f"need at least 2 training and 2 test patients (both classes), got {n_train} and {n_test}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patients = draw_patients(n_train, n_test, np.random.default_rng(seed))
    for i, p in enumerate(patients, 1):
        write_patient(out, p, seed)
        if progress and (i % 20 == 0 or i == len(patients)):
            progress(f"synthesized {i}/{len(patients)} patients")
    with (out / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "label", "age", "location", "split"])
        for p in patients:
            writer.writerow([p.patient_id, "malignant" if p.label else "benign", p.age, p.location, p.split])
    return out
