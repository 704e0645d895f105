"""Synthetic sagittal spine MRI with vertebral tumours, written as DICOM + LabelMe + labels.csv.

The paper's data (Liu et al. 2022, "Image data") is private. This generator writes a dataset
with the same layout, class mix, age structure, sequences and annotation style, and with a
diagnosis that is hard for the same reasons, so the whole method can be trained and served.

Layout (also the layout a real dataset must have; wff.training.dataset reads it)::

    OUT/labels.csv                          patient_id,label,age,location,split
                                            label: benign | malignant (pathology)
                                            location: cervical | thoracic | lumbar | sacral, or
                                              two joined by ';', main one first (cervical;thoracic)
                                            split: train | test
    OUT/<patient_id>/<series folder>/IM0001.dcm ...   e.g. OUT/SYN0001/S03_T2/IM0001.dcm
    OUT/<patient_id>/<series folder>/IM0007.json      LabelMe 5 rectangles beside each slice
                                                      showing a lesion (same stem)

Series folder names are free (here ``S<SeriesNumber>_<T1|T2|STIR>``); the reader groups by
SeriesInstanceUID and orders by ImagePositionPatient. LabelMe coordinates are source pixels
(x right, y down, pixel edges), label ``benign`` or ``malignant``, the shape's description the
lesion's vertebral location (what labels.csv counts it under; satellites: the main location).

Patients. Split sizes and class counts follow Table 1 (445 train: 180 benign / 265 malignant;
140 test: 90 / 50; other sizes keep each split's proportions), sex 326 M / 259 F. Locations
follow Table 2 over all 677 locations of the 585 patients (cervical 297, thoracic 182, lumbar
174, sacral 24): 92 of 585 patients (15.7 %) have a second tumour in the neighbouring region at
the cervicothoracic, thoracolumbar or lumbosacral junction, and the single-location patients
per region make up the rest, so each region's share of all locations is Table 2's
(:func:`location_mix`). The second tumour is 2-3 vertebrae from the main one (S1/S2 below a
lumbar one, L5/L4 above a sacral one), in the same sagittal field of view, drawn from the
same latent geometry and signal as the main tumour and labelled wherever it is visible, so the
detector learns it too (the column keeps the main region's body sizes across the junction).
Ages follow Fig. 5: benign ~ N(38, 16), malignant a mixture of N(61, 11) (91 %, metastases and
myeloma) and N(20, 8) (9 %, young primary sarcomas), truncated to 4-82 years: mean 48 +- 18,
about 20 % malignant under 40, 40 % in the forties, 70 % in the fifties and 90 % from 70 on.

Images. Each patient is one 3D object in millimetres (u anterior->posterior = image columns,
v superior->inferior = image rows, w = patient x = slice axis). A curved column (lordosis or
kyphosis by region; a kinked, tapering, fused sacrum) carries vertebral bodies (rounded
rectangles with a cortical rim, sized by region, narrower in lateral slices), discs (annulus
and nucleus, drying with age), the spinal canal with CSF and the cord (down to L1), pedicles
and posterior elements, and region-specific soft tissue (airway, viscera, paraspinal muscle,
subcutaneous fat). Every series samples this object at its own slice positions (3-7 mm thick,
11-21 slices, 256x256 mostly, sometimes 320x320 or non-square), so the tumour, an irregular
ellipsoid inside one vertebral body, appears on several adjacent slices of every series and is
labelled on about 4-10 of them. A series is rendered as a (slices, rows, cols) volume of
tissue labels, mapped to signal per sequence (T1: fat and marrow bright, fluid dark; T2: fluid
bright; STIR: fat suppressed, fluid, oedema and tumour bright), then tissue texture, in-plane
partial-volume blur, a coil/bias field and Rician noise; 12-bit unsigned data.

Difficulty. Each patient has a latent malignancy appearance ``z``: N(+1.35, 1) for malignant,
N(-1.35, 1) for benign patients (knowing z exactly gives 0.91 balanced accuracy). Everything
visible is a noisy function of z; no attribute belongs to one class:

* geometry, once per patient (latent z + N(0, 4^2)): tumour size, vertebral collapse
  (anterior wedge), soft-tissue/epidural extension through the cortex, and additional small
  lesions in other vertebrae. Weak evidence each.
* signal, per slice (latent z + patient N(0, 0.6^2) + series N(0, s^2) + slice N(0, t^2), with
  s = 1.0 / t = 2 on T2 and STIR but s = 2.5 / t = 3 on T1, so T1 helps less, as in the
  paper's Fig. 7): tumour-to-marrow contrast, internal heterogeneity, margin (irregular vs a
  sclerotic rim) and peritumoral marrow oedema.

A single slice shows a mixture of benign- and malignant-looking signs (per attribute the
classes are about 1.2 standard deviations apart), so evidence must be pooled over slices and
series. The Bayes-optimal observer of these latent attribute values (an upper bound for any
model reading the pixels; see :func:`observer_accuracy`) reaches about 0.88 balanced accuracy
with all series, 0.88 with T2/STIR only (as in the paper, T1 adds little), 0.81 with T1 only
and 0.81 from one slice; the paper's WFF reaches 0.80 without age. The attainable ceiling stays
below 0.9, so no strategy can saturate. The slice noise is set below t = 4 (T1: 5) on purpose:
the observer bound hardly moves with it (0.86 -> 0.88, it is linear in the attributes), but the
pixels of a slice map the attributes through saturating curves (tanh, sigmoid), and at t = 4
the small CPU models stayed far below the paper's single models (served Det ACC 0.63 against the
paper's 0.72 on the paper-size set; docs/results.md). Age is drawn
independently of z given the class, so it adds evidence as in the paper; only the age-related
marrow and disc signal in the images carries a trace of it, as in real MRI.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from wff.config import LABELS, LOCATIONS
from wff.ensemble.resample import bilinear_matrix
from wff.records import LOCATION_SEPARATOR

# ---------------------------------------------------------------------------------------------
# Dataset composition (paper: "Image data", Tables 1 and 2, Fig. 5)
SIZES = {"paper": (445, 140), "demo": (120, 60), "tiny": (8, 6)}  # (training, test) patients
CLASS_MIX = {"train": (180, 265), "test": (90, 50)}  # (benign, malignant) patients per split, Table 1
LOCATION_CASES = {"cervical": 297, "thoracic": 182, "lumbar": 174, "sacral": 24}  # Table 2: 677 locations
LOCATION_PATIENTS = 585  # Table 2's locations are those of the paper's 585 patients
TWO_LOCATION_PATIENTS = sum(LOCATION_CASES.values()) - LOCATION_PATIENTS  # 92 patients have a second location
SECOND_LESION_OFFSETS = (2, 3)  # vertebral levels from the main tumour to a second lesion in the next region
MALE_FRACTION = 326 / 585  # 326 men, 259 women
AGE_RANGE = (4, 82)  # years
AGE_MIXTURES = {  # label -> ((weight, mean, sd), ...) in years, truncated to AGE_RANGE
    0: ((1.0, 38.0, 16.0),),
    1: ((0.91, 61.0, 11.0), (0.09, 20.0, 8.0)),  # metastases/myeloma; young primary sarcomas
}

# ---------------------------------------------------------------------------------------------
# Difficulty: how strongly the latent appearance z shows (see the module docstring)
LATENT_MEAN = 1.35  # z ~ N(+-LATENT_MEAN, 1): Phi(1.35) = 0.91 is the ceiling with z known
GEOMETRY_SD = 4.0  # per-patient noise of each geometric attribute (size, collapse, extension, satellites)
SIGNAL_ATTRIBUTES = ("contrast", "heterogeneity", "margin", "oedema")  # per-slice attributes
SIGNAL_PATIENT_SD = 0.6  # shared by every series of the patient
SIGNAL_SERIES_SD = {"T1": 2.5, "T2": 1.0, "STIR": 1.0}  # per series: T1 is the least informative
SIGNAL_SLICE_SD = {"T1": 3.0, "T2": 2.0, "STIR": 2.0}  # per slice: no single slice decides (was 5 / 4 / 4, see below)
VISIBLE_CROSS_SECTION = 0.3  # a slice shows the tumour when it cuts >= 30 % of the lateral radius

# ---------------------------------------------------------------------------------------------
# Tissues and their signal per sequence (relative, before bias, noise and receiver gain)
AIR, FAT, MUSCLE, VISCERA, MARROW, CORTEX, ANNULUS, NUCLEUS, CSF, CORD = range(10)
TISSUE_SIGNAL = {  #     air   fat  muscle viscera marrow cortex annulus nucleus  csf   cord
    "T1": np.array((0.00, 0.95, 0.33, 0.42, 0.70, 0.05, 0.24, 0.36, 0.10, 0.48), np.float32),
    "T2": np.array((0.00, 0.72, 0.24, 0.45, 0.48, 0.04, 0.12, 0.90, 0.95, 0.50), np.float32),
    "STIR": np.array((0.00, 0.06, 0.22, 0.40, 0.12, 0.04, 0.12, 0.75, 0.95, 0.45), np.float32),
}
FINE_TEXTURE = np.array((0.0, 0.05, 0.06, 0.06, 0.10, 0.0, 0.05, 0.06, 0.02, 0.04), np.float32)  # ~3 mm grain, per tissue
COARSE_TEXTURE = np.array((0.0, 0.08, 0.08, 0.18, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0), np.float32)  # ~20 mm: bowel, fat lobules
# tumour signal = base + gain * tanh(contrast / 4): always unlike normal marrow (T1 darker, T2/STIR
# brighter), so the tumour can be found on every sequence; only how unlike depends on z.
TUMOUR_SIGNAL = {"T1": (0.40, -0.12), "T2": (0.68, 0.14), "STIR": (0.48, 0.26)}
OEDEMA_SIGNAL = {"T1": 0.40, "T2": 0.70, "STIR": 0.70}  # marrow oedema tends to this signal
# Age: red marrow turns fatty (brighter on T1, darker on STIR) and discs dry (darker on T2/STIR).
MARROW_AGE = {"T1": (0.85, 0.30), "T2": (0.90, 0.20), "STIR": (1.30, -0.50)}  # marrow signal x (a + b * age01)
DISC_DRYING = 0.4  # nucleus signal x (1 - DISC_DRYING * age01 * U(0.5, 1.2)) on T2 and STIR


@dataclass(frozen=True)
class Region:
    """Anatomy of one spinal region, in mm."""

    body: tuple[float, float, float]  # vertebral body height, AP depth, LR width at the tumour level
    disc_ratio: float  # disc height / body height
    canal: tuple[float, float]  # spinal canal AP depth, LR half-width
    cord: bool  # the cord runs through the field (it ends at L1; below, CSF and cauda equina)
    curve_mm: float  # sagittal curve: > 0 lordosis (convex anteriorly), < 0 kyphosis
    posterior_elements_mm: float  # AP length of lamina + spinous process
    fov_mm: tuple[float, float]  # field-of-view height range
    thickness_mm: tuple[float, ...]  # slice thickness choices
    anterior: tuple[tuple[float, int], ...]  # soft-tissue bands in front of the bodies: (mm, tissue), outward
    back_muscle_mm: tuple[float, float]  # paraspinal muscle depth behind the canal (range)
    body_part: str  # BodyPartExamined (DICOM defined terms)


REGIONS = {
    "cervical": Region((14.0, 16.0, 24.0), 0.30, (13.0, 11.0), True, 7.0, 22.0, (200.0, 240.0), (3.0, 3.0, 3.5, 4.0),
                       ((5.0, MUSCLE), (14.0, AIR), (32.0, MUSCLE), (8.0, FAT)), (45.0, 60.0), "CSPINE"),
    "thoracic": Region((21.0, 26.0, 32.0), 0.22, (13.0, 9.0), True, -10.0, 28.0, (300.0, 380.0), (3.0, 3.5, 4.0, 4.0, 5.0),
                       ((8.0, VISCERA), (400.0, VISCERA)), (40.0, 55.0), "TSPINE"),
    "lumbar": Region((27.0, 33.0, 46.0), 0.33, (15.0, 12.0), False, 9.0, 32.0, (280.0, 320.0), (4.0, 4.0, 4.5, 5.0, 6.0),
                     ((15.0, MUSCLE), (400.0, VISCERA)), (55.0, 75.0), "LSPINE"),
    "sacral": Region((26.0, 32.0, 44.0), 0.30, (13.0, 10.0), False, -6.0, 14.0, (260.0, 300.0), (4.0, 5.0, 5.0, 6.0, 7.0),
                     ((10.0, FAT), (400.0, VISCERA)), (40.0, 55.0), "SSPINE"),
}
SACRAL_TAPER = (0.82, 0.85, 0.80)  # per fused segment below S1: height, depth, width factors
SACRAL_DISC_RATIO = 0.10  # rudimentary discs between fused sacral segments
SACRAL_TILT = 0.55  # du/dv of the sacrum below S1 (it runs posteriorly)
CORTEX_MM = 1.3  # cortical rim of bodies and posterior elements
CURVE_LENGTH_MM = 250.0  # quarter period of the column's cosine curve

# ---------------------------------------------------------------------------------------------
# Acquisition: vendors, protocols, matrices (SeriesDescription variants the reader must classify)
VENDORS = {
    "SIEMENS": {"models": ("Avanto", "Aera", "Skyra"), "image_type": ["ORIGINAL", "PRIMARY", "M", "ND"],
                "T1": ("T1 TSE SAG", "t1_tse_sag"), "T2": ("T2 TSE SAG", "t2_tse_sag"),
                "STIR": ("STIR_SAG", "t2_tirm_sag"), "FS": ("T2 FS SAG", "t2_tse_fs_sag")},
    "GE MEDICAL SYSTEMS": {"models": ("Signa HDxt", "Discovery MR750"), "image_type": ["ORIGINAL", "PRIMARY", "OTHER"],
                           "T1": ("sag T1 FSE", "SAG T1"), "T2": ("sag T2 FSE", "SAG T2 FRFSE"),
                           "STIR": ("SAG STIR", "Sag STIR"), "FS": ("sag T2 FSE FS", "SAG T2 FS")},
    "Philips Medical Systems": {"models": ("Achieva", "Ingenia"), "image_type": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
                                "T1": ("T1W_TSE SAG", "sT1W_TSE"), "T2": ("T2W_TSE SAG", "sT2W_TSE"),
                                "STIR": ("STIR SAG", "sSTIR_TSE"), "FS": ("T2W_SPAIR SAG", "sT2W_SPAIR")},
}
PROTOCOLS = {  # kind -> TR range, TE range (ms), TI (ms, None: none) at 1.5 T / 3 T, echo train length range
    "T1": ((450.0, 750.0), (8.0, 14.0), None, (3, 5)),
    "T2": ((2500.0, 4500.0), (85.0, 115.0), None, (15, 25)),
    "STIR": ((3000.0, 5000.0), (40.0, 70.0), (150.0, 220.0), (11, 19)),
    "FS": ((2800.0, 4500.0), (70.0, 95.0), None, (13, 21)),  # fat-saturated T2, filed as STIR
}
EXTRA_SERIES = {"STIR": 0.8, "second T2": 0.4}  # chance of a STIR/FS-T2 series and of a repeated T2
MATRICES = (((256, 256), 0.65), ((320, 320), 0.15), ((256, 224), 0.12), ((320, 256), 0.08))  # (rows, cols), weight
SLICE_COVERAGE_MM = (55.0, 85.0)  # lateral extent of a sagittal stack; slices = coverage / spacing, 11-21
MIN_LABEL_PIXELS = 12  # a lesion is annotated on a slice when it covers at least this many pixels
LABELME_VERSION = "5.4.1"


@dataclass(frozen=True)
class Patient:
    index: int  # 1-based; seeds this patient's random stream
    patient_id: str  # SYN0001
    label: int  # 0 benign, 1 malignant
    age: int  # years
    sex: str  # "M" | "F"
    locations: tuple[str, ...]  # main tumour's location, then the second lesion's (a neighbouring region) if any
    split: str  # "train" | "test"
    z: float  # latent malignancy appearance


@dataclass(frozen=True)
class Level:
    """One vertebral body (mm): centre, size, tilt; the disc below it."""

    cv: float  # centre, superior->inferior
    cu: float  # centre, anterior->posterior
    h: float
    d: float
    width: float
    tilt: float  # radians; the body follows the column's curve
    disc_below: float  # disc height between this body and the next (0 for the last)
    fused: bool  # sacral segment (rudimentary disc, no nucleus)


@dataclass(frozen=True)
class Lesion:
    """An irregular ellipsoid in a vertebral body, in that body's frame (mm)."""

    level: int
    centre: tuple[float, float, float]  # across (posterior +), along (inferior +), w (lateral) from the body centre
    radii: tuple[float, float, float]  # across, along, w
    harmonics: np.ndarray  # (3, 4) rows: order, amplitude, phase, twist of the margin's ripples
    extension_mm: float  # soft-tissue/epidural extension through the cortex (0: contained)
    extension_side: int  # +1 posterior (epidural), -1 anterior (paravertebral)
    location: str = ""  # the location it counts under in labels.csv (satellites: the main one); LabelMe description


@dataclass(frozen=True)
class Anatomy:
    region: Region
    levels: tuple[Level, ...]
    tumour: Lesion
    satellites: tuple[Lesion, ...]
    geometry: np.ndarray  # (4,) latent size, collapse, extension, satellites: z + N(0, GEOMETRY_SD)
    collapse: float  # fraction of the tumour body's anterior height lost (wedge)
    curve_mm: float
    kink_v: float  # v below which the sacrum tilts posteriorly (inf: no sacrum)
    canal_depth: float
    canal_half_width: float
    thecal_end_v: float  # sacral canal holds fat below this v
    back_muscle: float
    back_fat: float
    band_waves: np.ndarray  # (bands + 2, 3, 3) amplitude, wavelength, phase of each soft-tissue boundary's waves
    signals: dict  # sequence -> (10,) float32 tissue signal, adjusted for age
    field_centre_v: float  # field-of-view centre shared by the series
    lateral_centre: float  # slice stacks are centred here (patient x, mm)
    second: Lesion | None = None  # the tumour at the patient's second location, inside the same field of view

    def column(self, v: np.ndarray) -> np.ndarray:
        """u of the canal's anterior wall (the bodies' posterior wall) at height v."""
        return column_u(v, self.curve_mm, self.kink_v)


@dataclass(frozen=True)
class SeriesPlan:
    number: int  # SeriesNumber
    sequence: str  # "T1" | "T2" | "STIR" (fat-saturated T2 included)
    kind: str  # protocol: "T1" | "T2" | "STIR" | "FS"
    vendor: str
    model: str
    field_t: float  # MagneticFieldStrength
    description: str
    rows: int
    cols: int
    spacing: float  # mm per pixel (square pixels)
    thickness: float
    step: float  # SpacingBetweenSlices
    positions: np.ndarray  # (n,) slice centres along patient x, mm, in instance order
    v0: float  # top edge of the field of view (v, mm)
    u0: float  # left (anterior) edge of the field of view (u, mm)
    tr: float
    te: float
    ti: float | None
    echo_train: int
    gain: float  # relative signal 1.0 -> this many 12-bit units
    noise: float  # Rician noise sigma, relative signal


def column_u(v, curve_mm: float, kink_v: float):
    """u (mm) of the bodies' posterior wall at height v: a cosine curve, tilted posteriorly below the sacral kink."""
    u = -curve_mm * np.cos(np.pi * np.asarray(v) / (2 * CURVE_LENGTH_MM))
    return u + SACRAL_TILT * np.clip(np.asarray(v) - kink_v, 0, None)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _truncated_age(rng: np.random.Generator, label: int) -> int:
    components = AGE_MIXTURES[label]
    weights = np.array([c[0] for c in components])
    _, mean, sd = components[rng.choice(len(components), p=weights / weights.sum())]
    while True:
        age = rng.normal(mean, sd)
        if AGE_RANGE[0] <= age <= AGE_RANGE[1]:
            return int(round(age))


def class_counts(n: int, split: str) -> tuple[int, int]:
    """(benign, malignant) for n patients of a split, in the paper's proportions, both classes present."""
    if n < 2:
        raise ValueError(f"a split needs at least 2 patients (one per class), got {n}")
    benign_ref, malignant_ref = CLASS_MIX[split]
    benign = min(max(round(n * benign_ref / (benign_ref + malignant_ref)), 1), n - 1)
    return benign, n - benign


def location_mix() -> dict[tuple[str, ...], float]:
    """Probability of each patient's locations (main first), so that Table 2 holds over all locations.

    TWO_LOCATION_PATIENTS of LOCATION_PATIENTS have a second location, in the next region up or
    down the column (cervicothoracic, thoracolumbar, lumbosacral). The 92 pairs are shared
    between the three junctions in proportion to the product of the two regions' Table 2 counts
    (55.3, 32.4 and 4.3 patients); the pair's main location is either of the two in proportion
    to its count. Each region's single-location patients are its Table 2 count minus its pairs,
    so the expected locations per 585 patients are exactly 297 / 182 / 174 / 24.
    """
    pairs = list(zip(LOCATIONS[:-1], LOCATIONS[1:]))
    weight = {pair: LOCATION_CASES[pair[0]] * LOCATION_CASES[pair[1]] for pair in pairs}
    in_pairs = {pair: TWO_LOCATION_PATIENTS * w / sum(weight.values()) for pair, w in weight.items()}
    mix: dict[tuple[str, ...], float] = {}
    for loc in LOCATIONS:
        single = LOCATION_CASES[loc] - sum(n for pair, n in in_pairs.items() if loc in pair)
        if single <= 0:
            raise ValueError(f"LOCATION_CASES leave no single-location {loc} patient; lower TWO_LOCATION_PATIENTS")
        mix[(loc,)] = single / LOCATION_PATIENTS
    for (a, b), n in in_pairs.items():
        share = LOCATION_CASES[a] / (LOCATION_CASES[a] + LOCATION_CASES[b])
        mix[(a, b)], mix[(b, a)] = n * share / LOCATION_PATIENTS, n * (1 - share) / LOCATION_PATIENTS
    return mix


def draw_patients(n_train: int, n_test: int, rng: np.random.Generator) -> list[Patient]:
    """Patients SYN0001... with the paper's class mix per split, ages, sexes and locations (:func:`location_mix`)."""
    mix = location_mix()
    options, weights = list(mix), np.array(list(mix.values()))
    patients: list[Patient] = []
    for split, n in (("train", n_train), ("test", n_test)):
        benign, malignant = class_counts(n, split)
        labels = rng.permutation([0] * benign + [1] * malignant)  # ids do not reveal the class
        for label in labels:
            index = len(patients) + 1
            patients.append(Patient(
                index=index,
                patient_id=f"SYN{index:04d}",
                label=int(label),
                age=_truncated_age(rng, int(label)),
                sex="M" if rng.random() < MALE_FRACTION else "F",
                locations=options[rng.choice(len(options), p=weights / weights.sum())],
                split=split,
                z=float(rng.normal(LATENT_MEAN if label else -LATENT_MEAN, 1.0)),
            ))
    return patients


# ---------------------------------------------------------------------------------------------
# Anatomy, protocol and appearance of one patient (cheap: no images yet)

def _levels(region: Region, locations: tuple[str, ...], rng: np.random.Generator, curve_mm: float,
            reach: float) -> tuple[list[Level], int, float, int | None]:
    """Vertebral bodies from -reach to +reach around the tumour level (v = 0).

    Returns levels, tumour index, sacral kink and S1's offset from the tumour level (None
    without a sacrum: neither location is sacral).
    """
    h0, d0, w0 = (x * rng.uniform(0.92, 1.08) for x in region.body)
    if locations[0] == "sacral":
        s1 = -int(rng.integers(0, 2))  # the tumour sits in S1 or S2
    elif "sacral" in locations:
        s1 = 1 + int(rng.integers(0, 2))  # the tumour sits in L5 or L4, the second lesion in the sacrum
    else:
        s1 = None
    sizes = {}  # offset from the tumour level -> (h, d, width, disc ratio below, fused)
    for k in range(-12, 13):
        grow = 1 + 0.025 * k  # bodies grow caudally
        h, d, w = h0 * grow, d0 * grow, w0 * grow
        fused, disc = False, region.disc_ratio
        if s1 is not None and k >= s1:  # k = s1 is S1
            segment = k - s1
            h, d, w = (x * t**segment for x, t in zip((h0, d0, w0), SACRAL_TAPER))
            fused, disc = segment > 0, SACRAL_DISC_RATIO
        sizes[k] = (h * rng.uniform(0.96, 1.04), d * rng.uniform(0.96, 1.04), w, disc * rng.uniform(0.85, 1.15), fused)
    centres = {0: 0.0}
    for k in range(1, 13):
        centres[k] = centres[k - 1] + sizes[k - 1][0] / 2 + sizes[k - 1][3] * sizes[k - 1][0] + sizes[k][0] / 2
        centres[-k] = centres[-k + 1] - sizes[-k + 1][0] / 2 - sizes[-k][3] * sizes[-k][0] - sizes[-k][0] / 2
    kink = centres[s1] - sizes[s1][0] / 2 if s1 is not None else math.inf
    keys = [k for k in sorted(centres) if abs(centres[k]) < reach]
    levels = []
    for k in keys:
        h, d, w, disc, fused = sizes[k]
        cv = centres[k]
        slope = float(column_u(cv + 0.5, curve_mm, kink) - column_u(cv - 0.5, curve_mm, kink))  # du/dv
        cu = float(column_u(cv, curve_mm, kink)) - d / 2
        levels.append(Level(cv, cu, h, d, w, math.atan(slope), disc * h if k != keys[-1] else 0.0, fused))
    return levels, keys.index(0), kink, s1


def _lesion(level_index: int, level: Level, scale: float, rng: np.random.Generator, irregular: float) -> Lesion:
    """A contained lesion of relative size ``scale`` at a random place inside the body of ``level``."""
    ra = min(0.36 * level.d * scale, 0.5 * level.d)
    rb = min(0.36 * level.h * scale, 0.48 * level.h)
    rw = min(0.46 * level.width * scale, 0.7 * level.width)  # tumours often fill the body's width
    centre = (
        rng.uniform(-1, 1) * max(level.d / 2 - ra, 0) * 0.6,
        rng.uniform(-1, 1) * max(level.h / 2 - rb, 0) * 0.6,
        rng.uniform(-0.15, 0.15) * level.width,
    )
    harmonics = np.stack([
        np.array([2.0, 3.0, 5.0]),  # orders of the ripples around the margin
        rng.uniform(0.5, 1.0, 3) * irregular,  # relative amplitudes (scaled per slice by the margin attribute)
        rng.uniform(0, 2 * np.pi, 3),  # phases
        rng.uniform(-2.0, 2.0, 3),  # twist across slices: the 3D margin is coherent between neighbours
    ], axis=1)
    return Lesion(level_index, centre, (ra, rb, rw), harmonics, 0.0, 1)


def make_anatomy(p: Patient, rng: np.random.Generator) -> Anatomy:
    """The patient's spine, soft tissue, tumour, satellite lesions and second-location tumour; geometry from the latent z."""
    main = p.locations[0]
    region = REGIONS[main]
    curve = region.curve_mm * rng.uniform(0.6, 1.4)
    levels, t, kink, s1 = _levels(region, p.locations, rng, curve, reach=region.fov_mm[1] / 2 + 80)
    geometry = p.z + GEOMETRY_SD * rng.standard_normal(4)
    g_size, g_collapse, g_extension, g_satellites = geometry
    tumour = dataclasses.replace(
        _lesion(t, levels[t], math.exp(0.07 * g_size), rng, irregular=1.0),
        extension_mm=float(np.clip(2.5 * (g_extension - 1.0), 0.0, 20.0)),
        extension_side=1 if rng.random() < 0.7 else -1,  # epidural more often than paravertebral
        location=main,
    )
    n_satellites = min(4, int(rng.poisson(0.3 * math.exp(0.25 * np.clip(g_satellites, -8, 8)))))
    others = [i for i in range(1, len(levels) - 1) if i != t and not levels[i].fused]
    chosen = rng.choice(others, min(n_satellites, len(others)), replace=False)
    satellites = tuple(dataclasses.replace(_lesion(int(i), levels[i], rng.uniform(0.25, 0.45), rng, irregular=0.3), location=main)
                       for i in chosen)
    age01 = float(np.clip((p.age - 20) / 60, 0, 1))
    signals = {}
    for seq, base in TISSUE_SIGNAL.items():
        s = base.copy()
        a, b = MARROW_AGE[seq]
        s[MARROW] *= a + b * age01
        if seq != "T1":
            s[NUCLEUS] *= 1.0 - DISC_DRYING * age01 * rng.uniform(0.5, 1.2)
        signals[seq] = s
    first_sacral = next((lv for lv in levels if lv.cv > kink), None)
    anatomy = Anatomy(
        region=region,
        levels=tuple(levels),
        tumour=tumour,
        satellites=satellites,
        geometry=geometry,
        collapse=float(np.clip(0.05 * (g_collapse - 2.0), 0.0, 0.4)),
        curve_mm=curve,
        kink_v=kink,
        canal_depth=region.canal[0] * rng.uniform(0.9, 1.1),
        canal_half_width=region.canal[1] * rng.uniform(0.9, 1.1),
        thecal_end_v=(first_sacral.cv + first_sacral.h) if first_sacral else math.inf,
        back_muscle=rng.uniform(*region.back_muscle_mm),
        back_fat=rng.uniform(5.0, 30.0),
        band_waves=np.stack([
            rng.uniform(0.5, 3.0, (len(region.anterior) + 2, 3)),  # amplitude, mm
            rng.uniform(60.0, 250.0, (len(region.anterior) + 2, 3)),  # wavelength, mm
            rng.uniform(0.0, 2 * np.pi, (len(region.anterior) + 2, 3)),  # phase
        ], axis=-1),
        signals=signals,
        field_centre_v=float(rng.uniform(-0.12, 0.12) * np.mean(region.fov_mm)),
        lateral_centre=float(rng.normal(0.0, 2.0)),
    )
    return _with_second_lesion(anatomy, p.locations, t, s1, rng) if len(p.locations) > 1 else anatomy


def _with_second_lesion(a: Anatomy, locations: tuple[str, ...], t: int, s1: int | None, rng: np.random.Generator) -> Anatomy:
    """The anatomy plus a tumour at the second location, drawn like the main one, in the same field of view.

    It sits SECOND_LESION_OFFSETS levels from the main tumour towards the second region (in S1
    or S2 for a sacral second location, L5 or L4 below a sacral main tumour), takes the main
    tumour's size, extension and margin from the same latent geometry (times a non-informative
    factor, so it adds no evidence about z beyond the main tumour's) and shares the per-slice
    signal attributes when rendered. The field of view moves just enough to hold both; a
    satellite at that level gives way.
    """
    main, second = locations[0], locations[1]
    if second == "sacral":
        offsets = (s1, s1 + 1)  # S1, S2
    elif main == "sacral":
        offsets = (s1 - 1, s1 - 2)  # L5, L4
    else:
        offsets = tuple(o if LOCATIONS.index(second) > LOCATIONS.index(main) else -o for o in SECOND_LESION_OFFSETS)
    offsets = [o for o in offsets if 0 <= t + o < len(a.levels)]
    i = t + int(offsets[rng.integers(len(offsets))])
    g_size, _, g_extension, _ = a.geometry
    lesion = dataclasses.replace(
        _lesion(i, a.levels[i], math.exp(0.07 * g_size) * rng.uniform(0.8, 1.0), rng, irregular=1.0),
        extension_mm=float(np.clip(2.5 * (g_extension - 1.0), 0.0, 20.0)) * rng.uniform(0.5, 1.0),
        extension_side=1 if rng.random() < 0.7 else -1,
        location=second,
    )
    # both lesion centres at least a body height + 12 mm inside the smallest field of view of the region
    lo_v, hi_v = sorted((a.levels[t].cv, a.levels[i].cv))
    half = a.region.fov_mm[0] / 2 - max(a.levels[t].h, a.levels[i].h) / 2 - 12.0
    centre = float(np.clip(a.field_centre_v, hi_v - half, lo_v + half))
    satellites = tuple(s for s in a.satellites if s.level != i)
    return dataclasses.replace(a, second=lesion, field_centre_v=centre, satellites=satellites)


def plan_series(p: Patient, anatomy: Anatomy, rng: np.random.Generator) -> list[SeriesPlan]:
    """2-4 sagittal series: T1 and T2 always, often STIR or fat-saturated T2, sometimes a second T2."""
    kinds = ["T1", "T2"]
    if rng.random() < EXTRA_SERIES["STIR"]:
        kinds.append("STIR" if rng.random() < 0.5 else "FS")
    if rng.random() < EXTRA_SERIES["second T2"]:
        kinds.append("T2")
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    vendor = list(VENDORS)[rng.integers(len(VENDORS))]
    model = str(rng.choice(VENDORS[vendor]["models"]))
    field_t = 3.0 if rng.random() < 0.4 else 1.5
    fov_v = rng.uniform(*anatomy.region.fov_mm)
    number = int(rng.integers(2, 4))  # series 1 is the (unexported) localizer
    plans = []
    for kind in kinds:
        (rows, cols), _ = MATRICES[rng.choice(len(MATRICES), p=[m[1] for m in MATRICES])]
        spacing = fov_v / rows
        thickness = float(rng.choice(anatomy.region.thickness_mm))
        step = round(thickness * rng.uniform(1.0, 1.25), 1)
        n = int(np.clip(round(rng.uniform(*SLICE_COVERAGE_MM) / step), 11, 21))
        positions = anatomy.lateral_centre + rng.normal(0, 1.0) + (np.arange(n) - (n - 1) / 2) * step
        if rng.random() < 0.5:
            positions = positions[::-1]  # some scanners number slices left to right, others right to left
        centre_v = anatomy.field_centre_v + rng.normal(0, 3.0)
        tr, te, ti, etl = PROTOCOLS[kind]
        plans.append(SeriesPlan(
            number=number,
            sequence="STIR" if kind == "FS" else kind,
            kind=kind,
            vendor=vendor,
            model=model,
            field_t=field_t,
            description=str(rng.choice(VENDORS[vendor][kind])),
            rows=rows,
            cols=cols,
            spacing=spacing,
            thickness=thickness,
            step=step,
            positions=positions,
            v0=centre_v - rows * spacing / 2,
            u0=float(anatomy.column(np.array(centre_v))) - rng.uniform(0.55, 0.62) * cols * spacing,
            tr=round(rng.uniform(*tr), 0),
            te=round(rng.uniform(*te), 1),
            ti=None if ti is None else (ti[0] if field_t < 2 else ti[1]) + round(rng.uniform(-10, 10)),
            echo_train=int(rng.integers(etl[0], etl[1] + 1)),
            gain=rng.uniform(2400.0, 3200.0),
            noise=rng.uniform(0.012, 0.03),
        ))
        number += int(rng.choice([1, 1, 1, 2]))
    return plans


def draw_signal_attributes(z: float, plans: list[SeriesPlan], rng: np.random.Generator) -> list[np.ndarray]:
    """Latent signal attributes per series: (n_slices, 4) float32 in SIGNAL_ATTRIBUTES order.

    value = z + patient N(0, SIGNAL_PATIENT_SD) + series N(0, SIGNAL_SERIES_SD[seq])
              + slice N(0, SIGNAL_SLICE_SD[seq]), independently per attribute.
    """
    k = len(SIGNAL_ATTRIBUTES)
    patient = z + SIGNAL_PATIENT_SD * rng.standard_normal(k)
    out = []
    for plan in plans:
        series = patient + SIGNAL_SERIES_SD[plan.sequence] * rng.standard_normal(k)
        slices = series + SIGNAL_SLICE_SD[plan.sequence] * rng.standard_normal((len(plan.positions), k))
        out.append(slices.astype(np.float32))
    return out


def lateral_cut(lesion: Lesion, positions: np.ndarray) -> np.ndarray:
    """(n,) fraction of the lesion's lateral radius cut by each slice (0: the slice misses it)."""
    offset = (positions - lesion.centre[2]) / lesion.radii[2]
    return np.sqrt(np.clip(1 - offset**2, 0, None))


# ---------------------------------------------------------------------------------------------
# Rendering: one series = one (slices, rows, cols) volume

def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
    """Smooth zero-mean noise of about unit SD, correlated over ``cell`` pixels; shape (rows, cols) or (n, rows, cols)."""
    rows, cols = shape[-2:]
    cr, cc = max(2, int(rows / cell) + 2), max(2, int(cols / cell) + 2)
    coarse = rng.standard_normal((*shape[:-2], cr, cc), dtype=np.float32) * np.float32(1.6)  # 1.6: bilinear loses variance
    ry = bilinear_matrix(0.5, cr - 0.5, rows, cr)  # (rows, cr)
    rx = bilinear_matrix(0.5, cc - 0.5, cols, cc)  # (cols, cc)
    return np.matmul(np.matmul(ry, coarse), rx.T)


def _window(v: np.ndarray, u: np.ndarray, centre_v: float, centre_u: float, reach_v: float, reach_u: float) -> tuple[slice, slice]:
    rs = slice(*np.searchsorted(v, [centre_v - reach_v, centre_v + reach_v]))
    cs = slice(*np.searchsorted(u, [centre_u - reach_u, centre_u + reach_u]))
    return rs, cs


def _frame(level: Level, v: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(along, across) coordinates (rows, cols) of a window in a body's tilted frame."""
    dv, du = v[:, None] - level.cv, u[None, :] - level.cu
    cos, sin = math.cos(level.tilt), math.sin(level.tilt)
    return dv * cos + du * sin, du * cos - dv * sin


def _slice_range(mask: np.ndarray) -> slice:
    idx = np.flatnonzero(mask)
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _draw_background(a: Anatomy, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(rows, cols) tissue labels of the soft tissue, same on every slice."""
    du = u[None, :] - a.column(v)[:, None]  # (rows, cols) mm behind the bodies' posterior wall
    wobble = [(amp * np.sin(2 * np.pi * v[:, None] / wavelength + phase)).sum(axis=1, keepdims=True)  # (rows, 1)
              for amp, wavelength, phase in np.moveaxis(a.band_waves, -1, 1)]
    depth = np.interp(v, [lv.cv for lv in a.levels], [lv.d for lv in a.levels])[:, None]
    labels = np.full(du.shape, AIR, np.uint8)
    back = a.canal_depth + a.back_muscle + wobble[0]
    labels[(du >= -depth - 1) & (du < back)] = MUSCLE
    labels[(du >= back) & (du < back + a.back_fat + wobble[1])] = FAT
    edge = -depth - 1.0
    for (thickness, tissue), wob in zip(a.region.anterior, wobble[2:]):
        inner = edge
        edge = edge - thickness - wob
        labels[(du < inner) & (du >= edge)] = tissue
    return labels


def _draw_spine(labels: np.ndarray, a: Anatomy, v: np.ndarray, u: np.ndarray, w: np.ndarray) -> None:
    """Discs, bodies, pedicles, posterior elements, canal and cord, into labels (n, rows, cols)."""
    levels, t = a.levels, a.tumour.level
    for i, lv in enumerate(levels[:-1]):  # discs first: bodies overwrite their edges
        below = levels[i + 1]
        grow = a.collapse * levels[t].h / 2 if t in (i, i + 1) else 0.0  # discs fill a collapsed body's space
        cv = (lv.cv + lv.h / 2 + below.cv - below.h / 2) / 2 + (grow / 2 if i + 1 == t else -grow / 2 if i == t else 0)
        disc = Level(cv=cv, cu=(lv.cu + below.cu) / 2, h=lv.disc_below + 3.0 + grow, d=0.95 * (lv.d + below.d) / 2,
                     width=lv.width, tilt=(lv.tilt + below.tilt) / 2, disc_below=0.0, fused=lv.fused)
        _ellipsoid(labels, disc, v, u, w, ANNULUS, power=2.5)
        if not lv.fused and not below.fused:
            core = Level(disc.cv, disc.cu + 0.05 * disc.d, 0.6 * disc.h, 0.7 * disc.d, 0.7 * disc.width, disc.tilt, 0, False)
            _ellipsoid(labels, core, v, u, w, NUCLEUS, power=2.0)
    for i, lv in enumerate(levels):
        _body(labels, lv, v, u, w, a.collapse if i == t else 0.0)
        _posterior_elements(labels, a, lv, v, u, w)
    _canal(labels, a, v, u, w)


def _ellipsoid(labels: np.ndarray, lv: Level, v, u, w, tissue: int, power: float) -> None:
    """A superellipsoid body-shaped blob (disc or nucleus) with lateral half-width lv.width / 2."""
    lateral = np.sqrt(np.clip(1 - (w / (lv.width / 2)) ** 2, 0, None))  # (n,)
    ks = _slice_range(lateral > 0.05)
    rs, cs = _window(v, u, lv.cv, lv.cu, lv.h, lv.d)
    if ks.stop == ks.start or rs.stop == rs.start or cs.stop == cs.start:
        return
    along, across = _frame(lv, v[rs], u[cs])
    depth = lv.d * lateral[ks, None, None]  # (k, 1, 1): the anterior edge recedes laterally
    a = (across - (lv.d - depth) / 2) / (depth / 2)
    r = np.abs(a) ** power + np.abs(along / (lv.h / 2)) ** power
    labels[ks, rs, cs][r <= 1] = tissue


def _body(labels: np.ndarray, lv: Level, v, u, w, collapse: float) -> None:
    lateral = np.sqrt(np.clip(1 - (w / (lv.width / 2)) ** 2, 0, None))
    ks = _slice_range(lateral > 0.05)
    rs, cs = _window(v, u, lv.cv, lv.cu, lv.h, lv.d)
    if ks.stop == ks.start or rs.stop == rs.start or cs.stop == cs.start:
        return
    along, across = _frame(lv, v[rs], u[cs])
    height = lv.h * (1 - collapse * np.clip(0.5 - across / lv.d, 0, 1))  # anterior wedge
    depth = lv.d * lateral[ks, None, None]
    offset = (lv.d - depth) / 2
    outer = ((across - offset) / (depth / 2)) ** 4 + (along / (height / 2)) ** 4
    inner = ((across - offset) / np.maximum(depth / 2 - CORTEX_MM, 0.5)) ** 4 + (along / np.maximum(height / 2 - CORTEX_MM, 0.5)) ** 4
    block = labels[ks, rs, cs]
    block[outer <= 1] = CORTEX
    block[inner <= 1] = MARROW


def _bone(block: np.ndarray, r_outer: np.ndarray, r_inner: np.ndarray, slices: np.ndarray) -> None:
    """Cortex where r_outer <= 1, marrow where r_inner <= 1, on the chosen slices of block (k, rows, cols)."""
    chosen = slices[:, None, None]
    block[np.broadcast_to((r_outer <= 1) & chosen, block.shape)] = CORTEX
    block[np.broadcast_to((r_inner <= 1) & chosen, block.shape)] = MARROW


def _posterior_elements(labels: np.ndarray, a: Anatomy, lv: Level, v, u, w) -> None:
    """Pedicles beside the canal and lamina + spinous process behind it."""
    cd = a.canal_depth
    rs, cs = _window(v, u, lv.cv, lv.cu + lv.d / 2 + cd, lv.h, cd + a.region.posterior_elements_mm + 4)
    if rs.stop == rs.start or cs.stop == cs.start:
        return
    along, across = _frame(lv, v[rs], u[cs])
    across = across - lv.d / 2  # 0 at the posterior wall of the body
    half_h = 0.3 * lv.h
    beside = (np.abs(w) > a.canal_half_width - 1) & (np.abs(w) < lv.width / 2 + 4)  # (n,) left and right of the canal
    ks = _slice_range(beside)
    if ks.stop > ks.start:
        ra, rb = cd / 2 + 3, half_h
        da, db = across - cd / 2, along + 0.05 * lv.h
        _bone(labels[ks, rs, cs], (da / ra) ** 2 + (db / rb) ** 2, (da / (ra - CORTEX_MM)) ** 2 + (db / (rb - CORTEX_MM)) ** 2, beside[ks])
    spread = np.sqrt(np.clip(1 - (w / (a.canal_half_width + 6)) ** 2, 0, None))  # (n,)
    ks = _slice_range(spread > 0.1)
    if ks.stop > ks.start and not lv.fused:
        length = a.region.posterior_elements_mm * spread[ks, None, None]
        centre = cd + 1 + length / 2
        ea = (across - centre) / (length / 2)
        eb = (along - 0.35 * lv.h) / half_h
        ia = (across - centre) / np.maximum(length / 2 - CORTEX_MM, 0.5)
        ib = (along - 0.35 * lv.h) / (half_h - CORTEX_MM)
        _bone(labels[ks, rs, cs], ea**2 + eb**2, ia**2 + ib**2, np.ones(ks.stop - ks.start, bool))


def _canal(labels: np.ndarray, a: Anatomy, v, u, w) -> None:
    """CSF (fat in the sacral canal below the thecal sac) and the cord."""
    lateral = np.sqrt(np.clip(1 - (w / a.canal_half_width) ** 2, 0, None))  # (n,)
    ks = _slice_range(lateral > 0.05)
    if ks.stop == ks.start:
        return
    du = (u[None, :] - a.column(v)[:, None])[None]  # (1, rows, cols)
    depth = np.where(v > a.kink_v, 0.6, 1.0)[None, :, None] * a.canal_depth * lateral[ks, None, None]  # (k, rows, 1)
    inside = (du >= 0.5) & (du < 0.5 + depth)
    fluid = np.where(v > a.thecal_end_v, FAT, CSF).astype(np.uint8)[None, :, None]
    block = labels[ks]
    np.copyto(block, np.broadcast_to(fluid, block.shape), where=inside)
    if a.region.cord:
        cord_w = np.sqrt(np.clip(1 - (w[ks] / (0.55 * a.canal_half_width)) ** 2, 0, None))[:, None, None]
        half = 0.28 * a.canal_depth * cord_w
        centre = 0.5 + 0.45 * a.canal_depth
        block[(np.abs(du - centre) < half) & inside] = CORD


def _lesion_window(lesion: Lesion, lv: Level, v, u, w, reach: float):
    cut = lateral_cut(lesion, w)
    extra = lesion.extension_mm > 0
    lateral_ext = np.sqrt(np.clip(1 - ((w - lesion.centre[2]) / (0.8 * lesion.radii[2])) ** 2, 0, None)) if extra else np.zeros_like(w)
    ks = _slice_range((cut > 0) | (lateral_ext > 0))
    ca, cb, _ = lesion.centre
    cos, sin = math.cos(lv.tilt), math.sin(lv.tilt)
    centre_u, centre_v = lv.cu + ca * cos + cb * sin, lv.cv + cb * cos - ca * sin
    rs, cs = _window(v, u, centre_v, centre_u, reach, reach + lesion.extension_mm)
    return ks, rs, cs, cut[ks], lateral_ext[ks]


def _draw_lesion(signal: np.ndarray, labels: np.ndarray, a: Anatomy, lesion: Lesion, plan: SeriesPlan,
                 attrs: np.ndarray, v, u, w, rng: np.random.Generator) -> dict[int, tuple[float, float, float, float]]:
    """Paint one lesion (tumour, oedema, rim, extension) into signal; returns {slice: box} of labelled slices."""
    lv = a.levels[lesion.level]
    ra, rb, rw = lesion.radii
    oedema_mm = 8.0
    ks, rs, cs, cut, lateral_ext = _lesion_window(lesion, lv, v, u, w, max(ra, rb) * 1.6 + oedema_mm)
    if ks.stop == ks.start or rs.stop == rs.start or cs.stop == cs.start:
        return {}
    along, across = _frame(lv, v[rs], u[cs])  # (rb, cb)
    contrast, heterogeneity, margin, oedema = (attrs[ks, i][:, None, None] for i in range(4))  # (k, 1, 1) each
    ca, cb, cw = lesion.centre
    scale = np.maximum(cut, 1e-3)[:, None, None]
    ea, eb = (across - ca) / (ra * scale), (along - cb) / (rb * scale)
    rho = np.hypot(ea, eb)  # (k, rb, cb)
    theta = np.arctan2(eb, ea)
    irregular = 0.04 + 0.24 * _sigmoid(margin / 2)
    edge = np.ones_like(rho)
    rel_w = ((w[ks] - cw) / rw)[:, None, None]
    for order, amplitude, phase, twist in lesion.harmonics:
        edge += irregular * amplitude * 0.5 * np.sin(order * theta + phase + twist * rel_w)
    block_labels = labels[ks, rs, cs]
    body = ((block_labels == MARROW) | (block_labels == CORTEX)) & (np.abs(along) < lv.h / 2 + 1) & (across < lv.d / 2 + 0.5)
    tumour = (rho <= edge) & body & (cut[:, None, None] > 0)
    if lesion.extension_mm > 0:
        side = lesion.extension_side
        outside = side * across - lv.d / 2
        ext = (outside / lesion.extension_mm) ** 2 + ((along - cb) / (0.9 * rb)) ** 2 <= lateral_ext[:, None, None] ** 2
        tumour |= ext & (outside > -2.0) & (block_labels != AIR)
    radius_mm = (ra + rb) / 2 * scale
    outside_mm = (rho - edge) * radius_mm  # distance beyond the margin, mm
    block = signal[ks, rs, cs]
    seq = plan.sequence
    oedema_amp = _sigmoid((oedema - 1.0) / 2) * 0.9
    marrow = labels[ks, rs, cs] == MARROW
    near = body & marrow & ~tumour & (outside_mm < oedema_mm) & (cut[:, None, None] > 0)
    falloff = oedema_amp * np.exp(-np.clip(outside_mm, 0, None) / (2 + 4 * oedema_amp))
    block[...] = np.where(near, block + falloff * (OEDEMA_SIGNAL[seq] - block), block)
    base, gain = TUMOUR_SIGNAL[seq]
    level = base + gain * np.tanh(contrast / 4)  # (k, 1, 1)
    texture = (0.03 + 0.14 * _sigmoid(heterogeneity / 2)) * _smooth_field(rng, block.shape, cell=max(1.5, 2.5 / plan.spacing))
    value = level * (1 + texture)
    rim = 0.8 * _sigmoid(-margin / 2)  # sclerotic rim of slow-growing lesions
    on_rim = tumour & body & (outside_mm > -1.6)
    value = np.where(on_rim, value * (1 - rim) + a.signals[seq][CORTEX] * rim, value)
    block[...] = np.where(tumour, value, block)
    boxes = {}
    for k in range(tumour.shape[0]):
        if tumour[k].sum() >= MIN_LABEL_PIXELS:
            ys, xs = np.flatnonzero(tumour[k].any(axis=1)), np.flatnonzero(tumour[k].any(axis=0))
            x1, y1 = cs.start + xs[0], rs.start + ys[0]
            boxes[ks.start + k] = (float(x1), float(y1), float(x1 + xs[-1] - xs[0] + 1), float(y1 + ys[-1] - ys[0] + 1))
    return boxes


def _blur(x: np.ndarray) -> np.ndarray:
    """In-plane [1, 2, 1] / 4 blur (partial volume of the acquisition)."""
    y = x.copy()
    y[:, 1:-1] = 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]
    z = y.copy()
    z[:, :, 1:-1] = 0.25 * y[:, :, :-2] + 0.5 * y[:, :, 1:-1] + 0.25 * y[:, :, 2:]
    return z


def render_series(a: Anatomy, plan: SeriesPlan, attrs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[list[tuple]]]:
    """One series -> (pixels (n, rows, cols) uint16 12-bit, per slice a list of lesion boxes).

    Boxes are (x1, y1, x2, y2, location) in source pixels (pixel edges), one per visible lesion;
    location is the lesion's (Lesion.location).
    """
    v = (plan.v0 + (np.arange(plan.rows) + 0.5) * plan.spacing).astype(np.float32)  # (rows,) superior -> inferior
    u = (plan.u0 + (np.arange(plan.cols) + 0.5) * plan.spacing).astype(np.float32)  # (cols,) anterior -> posterior
    w = plan.positions.astype(np.float32)  # (n,) patient x of each slice
    n = len(w)
    labels = np.empty((n, plan.rows, plan.cols), np.uint8)
    labels[:] = _draw_background(a, v, u)
    _draw_spine(labels, a, v, u, w)
    lut = a.signals[plan.sequence] * rng.uniform(0.95, 1.05, len(TISSUE_SIGNAL["T1"])).astype(np.float32)
    fine = FINE_TEXTURE[labels] * _smooth_field(rng, labels.shape, cell=max(2.0, 3.0 / plan.spacing))
    coarse = COARSE_TEXTURE[labels] * _smooth_field(rng, labels.shape, cell=20.0 / plan.spacing)
    signal = lut[labels] * (1 + fine + coarse)
    boxes: list[list[tuple]] = [[] for _ in range(n)]
    lesions = (a.tumour, *a.satellites) + ((a.second,) if a.second is not None else ())
    for lesion in lesions:
        for k, box in _draw_lesion(signal, labels, a, lesion, plan, attrs, v, u, w, rng).items():
            boxes[k].append((*box, lesion.location))
    signal = _blur(signal)
    du = u[None, :] - a.column(v)[:, None]
    coil = 0.7 + 0.4 * _sigmoid((du + 40.0) / 40.0)  # spine coil under the back: posterior brighter
    bias = coil * (1 + 0.12 * _smooth_field(rng, (plan.rows, plan.cols), cell=plan.rows / 3))
    signal *= (bias * rng.uniform(0.97, 1.03, (n, 1, 1))).astype(np.float32)
    sigma = np.float32(plan.noise)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician: magnitude of complex Gaussian noise
    return np.clip(magnitude * plan.gain + 0.5, 0, 4095).astype(np.uint16), boxes


# ---------------------------------------------------------------------------------------------
# Writing DICOM, LabelMe and labels.csv

def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _series_dataset(p: Patient, plan: SeriesPlan, seed: int, pixels: np.ndarray, study_date: datetime.date) -> Dataset:
    """The tags shared by every slice of a series; per-slice tags are set by write_series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = VENDORS[plan.vendor]["image_type"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = "%02d%02d00" % (8 + p.index % 10, (7 * p.index) % 60)
    ds.SeriesTime = "%02d%02d%02d" % (8 + p.index % 10, (7 * p.index + 4 * plan.number) % 60, plan.number)
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = plan.vendor
    ds.ManufacturerModelName = plan.model
    ds.InstitutionName = "Synthetic Spine Centre"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"MR {REGIONS[p.locations[0]].body_part[0]}-SPINE"
    ds.SeriesDescription = plan.description
    ds.ProtocolName = plan.description
    ds.PatientName = f"Synthetic^{p.patient_id[3:]}"
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age:03d}Y"
    ds.BodyPartExamined = REGIONS[p.locations[0]].body_part
    ds.ScanningSequence = "IR\\SE" if plan.kind == "STIR" else "SE"
    ds.SequenceVariant = "SK\\SP\\MP" if plan.kind == "STIR" else "SK\\SP"
    ds.ScanOptions = "FS" if plan.kind == "FS" else ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = plan.thickness
    ds.RepetitionTime = plan.tr
    ds.EchoTime = plan.te
    if plan.ti is not None:
        ds.InversionTime = plan.ti
    ds.NumberOfAverages = 2 if plan.kind == "T1" else 1
    ds.MagneticFieldStrength = plan.field_t
    ds.SpacingBetweenSlices = plan.step
    ds.EchoTrainLength = plan.echo_train
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(seed, p.patient_id, "study")
    ds.SeriesInstanceUID = _uid(seed, p.patient_id, "series", plan.number)
    ds.StudyID = str(p.index)
    ds.SeriesNumber = plan.number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: rows run posterior (+y), columns inferior (-z)
    ds.FrameOfReferenceUID = _uid(seed, p.patient_id, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = plan.rows, plan.cols
    ds.PixelSpacing = [round(plan.spacing, 6)] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    lo, hi = np.percentile(pixels[:, ::4, ::4], [1.0, 99.5])
    ds.WindowCenter, ds.WindowWidth = int((lo + hi) / 2), max(1, int(hi - lo))
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    return ds


def labelme(label: str, boxes: list[tuple[float, float, float, float, str]], image_path: str, rows: int, cols: int) -> dict:
    """A LabelMe 5 document with one rectangle per box (x1, y1, x2, y2 in source pixels, vertebral
    location of the lesion as the shape's description)."""
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": [
            {"label": label, "points": [[x1, y1], [x2, y2]], "group_id": None, "description": location,
             "shape_type": "rectangle", "flags": {}}
            for x1, y1, x2, y2, location in boxes
        ],
        "imagePath": image_path,
        "imageData": None,
        "imageHeight": rows,
        "imageWidth": cols,
    }


def write_series(folder: Path, p: Patient, plan: SeriesPlan, pixels: np.ndarray, boxes: list[list[tuple]], seed: int) -> None:
    """IM0001.dcm ... in instance order, plus IM<k>.json where the slice shows a lesion."""
    folder.mkdir(parents=True, exist_ok=True)
    study_date = datetime.date(2006, 1, 1) + datetime.timedelta(days=int(p.index * 2654435761 % 5113))  # 2006-2019
    ds = _series_dataset(p, plan, seed, pixels, study_date)
    row, col = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    label = LABELS[p.label]
    for k, x in enumerate(plan.positions):
        name = f"IM{k + 1:04d}"
        # patient coordinates of the first pixel's centre: x = slice position, y = u, z = -v
        origin = np.array([x, plan.u0 + plan.spacing / 2, -(plan.v0 + plan.spacing / 2)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, p.patient_id, plan.number, k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(c), 4) for c in origin]
        ds.SliceLocation = round(float(np.dot(origin, np.cross(row, col))), 4)
        ds.PixelData = pixels[k].tobytes()
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        if boxes[k]:
            doc = labelme(label, boxes[k], f"{name}.dcm", plan.rows, plan.cols)
            (folder / f"{name}.json").write_text(json.dumps(doc, indent=1))


def write_patient(out: Path, p: Patient, seed: int) -> int:
    """Render and write one patient's series; returns the number of slices written."""
    rng = np.random.default_rng([seed, p.index])
    anatomy = make_anatomy(p, rng)
    plans = plan_series(p, anatomy, rng)
    attributes = draw_signal_attributes(p.z, plans, rng)
    for plan, attrs in zip(plans, attributes):
        pixels, boxes = render_series(anatomy, plan, attrs, rng)
        write_series(out / p.patient_id / f"S{plan.number:02d}_{plan.sequence}", p, plan, pixels, boxes, seed)
    return sum(len(plan.positions) for plan in plans)


def write_labels(out: Path, patients: list[Patient]) -> Path:
    path = out / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "label", "age", "location", "split"])
        for p in patients:
            writer.writerow([p.patient_id, LABELS[p.label], p.age, LOCATION_SEPARATOR.join(p.locations), p.split])
    return path


def generate_patients(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> Iterator[Patient]:
    """Write patients one by one, yielding each when written; labels.csv is written after the last.

    A dataset without labels.csv is therefore incomplete (interrupted). Deterministic for a
    seed: patient k's images depend only on (seed, k).
    """
    if n_train < 2 or n_test < 2:
        raise ValueError(f"need at least 2 training and 2 test patients (one per class), got {n_train} and {n_test}")
    out = Path(out_dir)
    if (out / "labels.csv").exists():
        raise FileExistsError(f"{out} already holds a dataset (labels.csv); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    patients = draw_patients(n_train, n_test, np.random.default_rng(seed))
    for p in patients:
        write_patient(out, p, seed)
        yield p
    write_labels(out, patients)


def synthesize_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> Path:
    """Write n_train + n_test synthetic patients and labels.csv under out_dir; returns out_dir.

    ``progress`` receives a message every 10 % of the patients.
    """
    total = n_train + n_test
    every = max(1, total // 10)
    for i, _ in enumerate(generate_patients(out_dir, n_train, n_test, seed), 1):
        if progress and (i % every == 0 or i == total):
            progress(f"synthesized {i}/{total} patients")
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# How hard is it? The ideal observer of the latent attributes

def _attribute_estimate(values: list[np.ndarray], sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Best linear estimate of (z + patient noise) per signal attribute from per-series slice values.

    values: per series (m_s, 4) values of the visible slices. Returns (4,) estimates, (4,) variances
    of estimate - z (patient noise included).
    """
    weights = np.array([1.0 / (SIGNAL_SERIES_SD[s] ** 2 + SIGNAL_SLICE_SD[s] ** 2 / len(x)) for x, s in zip(values, sequences)])
    means = np.stack([x.mean(axis=0) for x in values])  # (series, 4)
    estimate = (weights[:, None] * means).sum(axis=0) / weights.sum()
    return estimate, np.full(means.shape[1], SIGNAL_PATIENT_SD**2 + 1.0 / weights.sum())


def observer_accuracy(n_patients: int = 4000, seed: int = 0) -> dict[str, float]:
    """Balanced accuracy of the Bayes-optimal observer of the latent attribute values.

    The observer sees each geometric attribute (z + N(0, GEOMETRY_SD)) and every signal
    attribute of every slice showing the tumour, knows the noise model and classifies the
    posterior of z (equal priors). Reported for all series, T1 only, T2/STIR only, one random
    visible slice, and z itself. It ignores pixel noise and anatomy, so it bounds from above
    what any model reading the images can reach without age.
    """
    rng = np.random.default_rng(seed)
    patients = draw_patients(n_patients // 2, n_patients - n_patients // 2, rng)
    keys = ("all_series", "T1_only", "T2_STIR_only", "single_slice", "z_known")
    z_hat = {k: np.zeros(len(patients)) for k in keys}
    for i, p in enumerate(patients):
        prng = np.random.default_rng([seed, p.index])
        anatomy = make_anatomy(p, prng)
        plans = plan_series(p, anatomy, prng)
        attributes = draw_signal_attributes(p.z, plans, prng)
        geometry = anatomy.geometry
        visible = [lateral_cut(anatomy.tumour, plan.positions) >= VISIBLE_CROSS_SECTION for plan in plans]
        series = [(x[m], plan.sequence) for x, m, plan in zip(attributes, visible, plans) if m.any()]
        subsets = {
            "all_series": series,
            "T1_only": [s for s in series if s[1] == "T1"],
            "T2_STIR_only": [s for s in series if s[1] != "T1"],
        }
        if series:
            x, seq = series[prng.integers(len(series))]
            subsets["single_slice"] = [(x[prng.integers(len(x))][None], seq)]
        for key, chosen in subsets.items():
            estimates, variances = [geometry], [np.full(4, GEOMETRY_SD**2)]
            if chosen:
                est, var = _attribute_estimate([c[0] for c in chosen], [c[1] for c in chosen])
                estimates.append(est)
                variances.append(var)
            e, var = np.concatenate(estimates), np.concatenate(variances)
            z_hat[key][i] = (e / var).sum() / (1.0 / var).sum()
        z_hat["z_known"][i] = p.z
    labels = np.array([p.label for p in patients])
    accuracy = {}
    for key in keys:
        correct = (z_hat[key] > 0) == labels
        accuracy[key] = round(float(correct[labels == 1].mean() + correct[labels == 0].mean()) / 2, 3)  # balanced
    return accuracy
