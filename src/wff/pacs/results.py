"""A diagnosis as DICOM objects a PACS stores and a viewer shows beside the images (IHE AI Results):

* a TID 1500 Measurement Report (Comprehensive 3D SR or Comprehensive SR, ``ResultSettings.sr_kind``)
  in a new series of the diagnosed study, written with highdicom;
* a Grayscale Softcopy Presentation State drawing the boxes and labels on the key slices, for
  viewers without SR support.

    sr, pr = make_results(datasets, dx, settings=ResultSettings().with_model(client.model_identity()))

SR content (every group has the finding type SCT 108369006 "Neoplasm" with the finding site
SCT 421060004 "Spine", and the algorithm's name, version and model digest, TID 4019):

* "Patient-level diagnosis" (TID 1501): SCT 278201002 "Classification" = SCT 21594007 "Malignant"
  or SCT 30807003 "Benign"; DCM 111047 "Probability of cancer" = P(malignant) (UCUM "1"); the age
  term A and DCM 121033 "Subject Age" when an age was known;
* one group per served series (TID 1501), "Series <number> <sequence>": the series vote
  (Malignant, Benign, or SCT 280416009 "Indeterminate result" when the series abstained), M, and
  the D and detection score of the series' best box; its source image is the key slice;
* "Best detected box" (TID 1410), when any slice has a box: the box with the highest detection
  score as an image region (SCOORD POLYLINE, a closed rectangle of 5 points) in its slice's own
  pixel coordinates, referencing that slice's SOP Instance (and frame); D, the detection score
  and the box's class.

Concepts that no standard vocabulary names (D, M, A, the detection score, the series vote, the
box's class) use the private coding scheme ``99WFF``, declared in the objects' Coding Scheme
Identification Sequence. Every value of every qualitative evaluation is SNOMED CT. Concept names
are distinct inside each measurement group.

Reproducibility: UIDs come from :mod:`wff.pacs.uids` (study, sorted SOP Instance UIDs, model
version and digest); content, series and instance-creation date/time are the newest date/time
found in the diagnosed instances (Content, Acquisition, Series, then Study date/time of each),
or 1970-01-01 00:00:00 when none has one. The same instances and model give byte-identical
objects. Text is written as ISO_IR 192 (UTF-8); the patient and study modules are copied from
the input, everything this module writes is ASCII.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from wff.contracts import ENSEMBLE_NAME
from wff.ensemble.diagnosis import Diagnosis
from wff.pacs import keyslice
from wff.pacs.uids import DEFAULT_UID_ROOT, ResultUIDs, check_uid_root, derived_uid, result_uids
from wff.serving.repository import wff_version

SR_KINDS = {"comprehensive3d": hd.sr.Comprehensive3DSR, "comprehensive": hd.sr.ComprehensiveSR}
CHARACTER_SET = "ISO_IR 192"  # UTF-8: copied patient names keep every character; our own text is ASCII
BODY_PART = "SPINE"  # BodyPartExamined of the presentation state (PS3.16 Annex L defined term)
EPOCH = datetime(1970, 1, 1)  # content date/time when no diagnosed instance has a date
PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # FloatPixelData, DoubleFloatPixelData, PixelData
# Type 2 attributes highdicom reads from the first image (it needs them present, empty is allowed)
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
# (date, time) keyword pairs that date an instance, most specific first
_DATINGS = (("ContentDate", "ContentTime"), ("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"),
            ("StudyDate", "StudyTime"))

WFF_SCHEME = "99WFF"


def _wff(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, WFF_SCHEME, meaning)


# Private concepts (scheme 99WFF): quantities of this algorithm that no standard vocabulary names.
DETECTOR_P = _wff("WFF-D", "Detector P(malignant) of the box (D)")
SEQUENCE_P = _wff("WFF-M", "Sequence classifier P(malignant) (M)")
AGE_P = _wff("WFF-A", "Age module P(malignant given age) (A)")
DETECTION_SCORE = _wff("WFF-SCORE", "Detection score of the box")
SERIES_VOTE = _wff("WFF-VOTE", "Series vote")
BOX_CLASS = _wff("WFF-BOXCLASS", "Class of the detected box")
WFF_CODING_SCHEME = dict(designator=WFF_SCHEME, name="spine-wff algorithm concepts", version="1")

VOTE_VALUES = {1: codes.SCT.Malignant, 0: codes.SCT.Benign, -1: codes.SCT.IndeterminateResult}
UNITLESS = codes.UCUM.NoUnits  # UCUM "1": probabilities and scores


@dataclass(frozen=True)
class ResultSettings:
    """How results are written; one of the gateway's settings (GatewaySettings.results)."""

    uid_root: str = DEFAULT_UID_ROOT  # every result UID lies under it (wff.pacs.uids)
    sr_kind: str = "comprehensive3d"  # "comprehensive3d": Comprehensive 3D SR (IHE AIR); "comprehensive": Comprehensive SR
    manufacturer: str = "spine-wff"  # Manufacturer of the result objects and of the algorithm
    model_name: str = ENSEMBLE_NAME  # the served ensemble: Algorithm Name, Manufacturer's Model Name
    model_version: str = ""  # spine-wff version that built the served repository (DiagnosisClient.model_identity)
    model_digest: str = ""  # "sha256:<hex>" over the served models, fusion settings and age prior (wff repo build)
    detector_size: int = 0  # side of the detector input in pixels, to undo the letterbox (from the server)
    sr_series_number: int = 9901  # SeriesNumber of the SR series
    pr_series_number: int = 9902  # SeriesNumber of the presentation state series

    def __post_init__(self) -> None:
        check_uid_root(self.uid_root)
        if self.sr_kind not in SR_KINDS:
            raise ValueError(f"sr_kind {self.sr_kind!r} is not one of {sorted(SR_KINDS)}")
        for name in ("manufacturer", "model_name"):
            text = getattr(self, name)
            if not text or not text.isascii() or len(text) > 64:
                raise ValueError(f"{name} {text!r} must be 1 to 64 ASCII characters (a DICOM LO value)")

    def with_model(self, identity) -> "ResultSettings":
        """These settings for the served model: ``identity`` is DiagnosisClient.model_identity()'s answer
        (name, version, digest, image_size)."""
        return replace(self, model_name=identity.name, model_version=identity.version, model_digest=identity.digest,
                       detector_size=identity.image_size)

    def check_model(self) -> None:
        if not self.model_version or not self.model_digest or self.detector_size < 1:
            raise ValueError("ResultSettings lacks the served model's version, digest or detector size; "
                             "take them from the server: settings.with_model(DiagnosisClient(url).model_identity())")


def header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data, with the Type 2 attributes highdicom copies present."""
    out = Dataset({tag: copy.deepcopy(elem) for tag, elem in ds.items() if int(tag) not in PIXEL_TAGS})
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    for keyword in _COPIED_TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def _dated(ds: Dataset) -> datetime | None:
    for date_kw, time_kw in _DATINGS:
        text = str(ds.get(date_kw, "") or "").strip()
        if not text:
            continue
        try:
            day = DA(text)
            moment = TM(str(ds.get(time_kw, "") or "").strip() or "000000")
        except ValueError:
            continue
        if isinstance(day, date):
            return datetime.combine(day, moment if isinstance(moment, time) else time())
    return None


def content_datetime(datasets: Sequence[Dataset]) -> datetime:
    """The newest date/time of the diagnosed instances (``_DATINGS`` per instance), else ``EPOCH``;
    to the second, without time zone."""
    found = [d for d in (_dated(ds) for ds in datasets) if d is not None]
    return max(found).replace(microsecond=0, tzinfo=None) if found else EPOCH


def _num(value: float) -> float:
    return round(float(value), 6)


def box_class(d: float) -> tuple[str, float]:
    """("malignant", D) when D >= 0.5, else ("benign", 1 - D): the box's class and its probability."""
    return ("malignant", d) if d >= 0.5 else ("benign", 1.0 - d)


def rectangle(box: Sequence[float]) -> np.ndarray:
    """The closed polyline of a box (x1, y1, x2, y2): 5 (x, y) points, the first repeated last."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], np.float32)


def _source_image(src: keyslice.SourceSlice, cls):
    frames = [src.frame] if src.frame is not None else None
    return cls(referenced_sop_class_uid=src.dataset.SOPClassUID, referenced_sop_instance_uid=src.dataset.SOPInstanceUID,
               referenced_frame_numbers=frames)


def _algorithm(settings: ResultSettings) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=settings.model_name, version=settings.model_version,
                                          parameters=[f"model_digest={settings.model_digest}"], manufacturer=settings.manufacturer)


def _tracking(settings: ResultSettings, uids: ResultUIDs, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derived_uid(settings.uid_root, "tracking", uids.sr_instance, label), identifier=label)


def _finding() -> dict:
    return {"finding_type": codes.SCT.Neoplasm, "finding_sites": [hd.sr.FindingSite(codes.SCT.Spine)]}


def patient_group(dx: Diagnosis, settings: ResultSettings, uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [hd.sr.Measurement(codes.DCM.ProbabilityOfCancer, _num(dx.p_malignant), UNITLESS)]
    if not math.isnan(dx.age_a):
        measurements.append(hd.sr.Measurement(AGE_P, _num(dx.age_a), UNITLESS))
    if not math.isnan(dx.age_used):
        measurements.append(hd.sr.Measurement(codes.DCM.SubjectAge, _num(dx.age_used), codes.UCUM.Year))
    label = codes.SCT.Malignant if dx.label == "malignant" else codes.SCT.Benign
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(settings, uids, "Patient-level diagnosis"),
        algorithm_id=_algorithm(settings),
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SCT.Classification, label)],
        **_finding(),
    )


def series_label(info: dict) -> str:
    """"Series <SeriesNumber> <sequence>" (ASCII; the description is not used: it is the scanner's text)."""
    number = info.get("series_number")
    return f"Series {number if number is not None else int(info.get('index', 0)) + 1} {info.get('sequence', '')}".strip()


def series_group(q: int, dx: Diagnosis, key: keyslice.KeySlice | None, settings: ResultSettings,
                 uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [hd.sr.Measurement(SEQUENCE_P, _num(dx.series_m[q]), UNITLESS)]
    sources = None
    if key is not None:
        measurements += [hd.sr.Measurement(DETECTOR_P, _num(key.d), UNITLESS),
                         hd.sr.Measurement(DETECTION_SCORE, _num(key.score), UNITLESS)]
        sources = [_source_image(key.source, hd.sr.SourceImageForMeasurementGroup)]
    vote = VOTE_VALUES[int(dx.series_votes[q])]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(settings, uids, series_label(dx.series_info[q])),
        algorithm_id=_algorithm(settings),
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(SERIES_VOTE, vote)],
        source_images=sources,
        **_finding(),
    )


def box_group(key: keyslice.KeySlice, settings: ResultSettings, uids: ResultUIDs) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=rectangle(key.box),
        source_image=_source_image(key.source, hd.sr.SourceImageForRegion),
        pixel_origin_interpretation="FRAME" if key.source.frame is not None else None,
    )
    name, _ = box_class(key.d)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(settings, uids, "Best detected box"),
        referenced_region=region,
        algorithm_id=_algorithm(settings),
        measurements=[hd.sr.Measurement(DETECTOR_P, _num(key.d), UNITLESS),
                      hd.sr.Measurement(DETECTION_SCORE, _num(key.score), UNITLESS)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(BOX_CLASS, codes.SCT.Malignant if name == "malignant" else codes.SCT.Benign)],
        **_finding(),
    )


def _equipment(settings: ResultSettings, when: datetime) -> list[hd.ContributingEquipment]:
    """The algorithm as Contributing Equipment (IHE AIR): DCM 109102 "Processing Equipment"."""
    return [hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=settings.model_name,
        software_versions=settings.model_version,
        device_serial_number=settings.model_digest.removeprefix("sha256:")[:16],
        contribution_datetime=when,
        contribution_description=f"benign/malignant diagnosis of spinal tumours, model {settings.model_digest}"[:64],
    )]


def _common(settings: ResultSettings, when: datetime) -> dict:
    return {
        "manufacturer": settings.manufacturer,
        "contributing_equipment": _equipment(settings, when),
        "specific_character_set": CHARACTER_SET,
        "coding_schemes": [CodingSchemeIdentificationItem(**WFF_CODING_SCHEME, responsible_organization=settings.manufacturer)],
        "series_date": when.date(),
        "series_time": when.time(),
    }


def _stamp(ds: Dataset, when: datetime, *keywords: str) -> None:
    """Set the date/time pairs ``keywords`` (Date keyword, Time keyword, ...) to ``when``."""
    for date_kw, time_kw in zip(keywords[::2], keywords[1::2]):
        setattr(ds, date_kw, when.strftime("%Y%m%d"))
        setattr(ds, time_kw, when.strftime("%H%M%S"))


def _stamp_contributions(ds: Dataset, when: datetime) -> None:
    """Every Contributing Equipment item dated ``when`` (highdicom dates its own item with the clock)."""
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def make_sr(headers: Sequence[Dataset], dx: Diagnosis, keys: Sequence[keyslice.KeySlice], settings: ResultSettings,
            uids: ResultUIDs, when: datetime) -> Dataset:
    """The TID 1500 measurement report (module docstring)."""
    by_series = {k.series: k for k in keys}
    groups = [patient_group(dx, settings, uids)]
    groups += [series_group(q, dx, by_series.get(q), settings, uids) for q in range(len(dx.series_info))]
    best = keyslice.best_key_slice(keys)
    if best is not None:
        groups.append(box_group(best, settings, uids))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=uids.device, name=settings.model_name,
                                                       manufacturer_name=settings.manufacturer, model_name=settings.model_name)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)),
        procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = SR_KINDS[settings.sr_kind](
        evidence=headers,
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=settings.sr_series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        is_complete=True,
        is_final=True,
        series_description="spine-wff diagnosis (SR)",
        content_date=when.date(),
        content_time=when.time(),
        **_common(settings, when),
    )
    sr.ManufacturerModelName, sr.SoftwareVersions = "spine-wff PACS results", wff_version()
    _stamp(sr, when, "InstanceCreationDate", "InstanceCreationTime")
    _stamp_contributions(sr, when)
    return sr


def _text_box(x: float, y: float, text: str, rows: int, cols: int) -> tuple[float, float, float, float]:
    """A bounding box (left, top, right, bottom) for ``text`` with its top-left corner near (x, y), inside the image."""
    height = max(rows / 24, 4.0)
    width = min(height * 0.6 * len(text), float(cols))
    left = min(max(x, 0.0), cols - width)
    top = min(max(y, 0.0), rows - height)
    return (left, top, left + width, top + height)


def _annotate(key: keyslice.KeySlice | None, src: keyslice.SourceSlice, image: Dataset, title: str,
              layers: dict[str, hd.pr.GraphicLayer]) -> hd.pr.GraphicAnnotation:
    units = hd.pr.AnnotationUnitsValues.PIXEL
    texts = [hd.pr.TextObject(title, units, bounding_box=_text_box(0.0, 0.0, title, src.rows, src.cols),
                              text_justification="LEFT")]
    graphics = []
    layer = layers["text"]
    if key is not None:
        name, p = box_class(key.d)
        label = f"{name} {p:.2f}"
        x1, y1, _, _ = key.box
        height = max(src.rows / 24, 4.0)
        texts.append(hd.pr.TextObject(label, units, bounding_box=_text_box(x1, y1 - height if y1 >= height else key.box[3], label,
                                                                            src.rows, src.cols), text_justification="LEFT"))
        graphics.append(hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, rectangle(key.box), units))
        layer = layers[name]
    return hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer, referenced_frame_number=src.frame,
                                   graphic_objects=graphics or None, text_objects=texts)


def make_gsps(sources: keyslice.Sources, dx: Diagnosis, keys: Sequence[keyslice.KeySlice], settings: ResultSettings,
              uids: ResultUIDs, when: datetime) -> Dataset:
    """The presentation state: on each key slice its box in red (malignant) or green (benign) with the
    class and probability, and a line with the patient's diagnosis and the series' vote. Without
    any box, that line alone on the middle slice of the first series."""
    from wff.client.overlay import BENIGN_RGB, MALIGNANT_RGB

    layers = {
        "malignant": hd.pr.GraphicLayer("MALIGNANT", 1, "boxes classed malignant", hd.color.CIELabColor.from_rgb(*MALIGNANT_RGB)),
        "benign": hd.pr.GraphicLayer("BENIGN", 2, "boxes classed benign", hd.color.CIELabColor.from_rgb(*BENIGN_RGB)),
        "text": hd.pr.GraphicLayer("DIAGNOSIS", 3, "diagnosis text", hd.color.CIELabColor.from_rgb(255, 255, 255)),
    }
    votes = {1: "malignant", 0: "benign", -1: "abstained"}
    marked = list(keys)
    if not marked:
        members = np.flatnonzero(dx.slice_series == 0)
        middle = sources.slices[int(members[len(members) // 2])]
        targets = [(None, middle, 0)]
    else:
        targets = [(k, k.source, k.series) for k in marked]
    images, annotations = [], []
    for key, src, q in targets:
        image = header(src.dataset)
        if "WindowCenter" not in image or "WindowWidth" not in image:
            center, width = key.window if key is not None else keyslice.display_window(sources.series[q].pixels)
            image.WindowCenter, image.WindowWidth = f"{center:.1f}", f"{max(width, 1.0):.1f}"
        title = (f"spine-wff: {dx.label} P={dx.p_malignant:.2f}; {series_label(dx.series_info[q])} "
                 f"vote {votes.get(int(dx.series_votes[q]), '?')}" + ("" if key is not None else "; no box detected"))
        images.append(image)
        annotations.append(_annotate(key, src, image, title, layers))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=uids.pr_series,
        series_number=settings.pr_series_number,
        sop_instance_uid=uids.pr_instance,
        instance_number=1,
        manufacturer_model_name="spine-wff PACS results",
        software_versions=wff_version(),
        device_serial_number=settings.model_digest.removeprefix("sha256:")[:16],
        content_label="SPINE_WFF",
        content_description="spine-wff boxes and diagnosis",
        graphic_annotations=annotations,
        graphic_layers=list(layers.values()),
        series_description="spine-wff diagnosis (boxes)",
        **_common(settings, when),
    )
    gsps.BodyPartExamined = BODY_PART  # an unpaired part: Laterality is then absent, not empty
    _stamp(gsps, when, "InstanceCreationDate", "InstanceCreationTime", "PresentationCreationDate", "PresentationCreationTime")
    _stamp_contributions(gsps, when)
    return gsps


def images(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The image instances among ``datasets``: a DICOMDIR, or anything without a SOP Instance UID or
    pixel data, is left out, as the server's reader leaves it out."""
    return [ds for ds in datasets
            if "SOPInstanceUID" in ds and "StudyInstanceUID" in ds and any(int(tag) in PIXEL_TAGS for tag in ds.keys())]


def make_results(datasets: Sequence[Dataset], diagnosis: Diagnosis, *, settings: ResultSettings) -> list[Dataset]:
    """[SR, GSPS] for ``diagnosis`` of ``datasets`` (the diagnosed instances, pixel data included: the
    key slices are found by reading them as the server did, wff.pacs.keyslice).

    ValueError when the settings lack the model identity, or the instances do not give the series
    the server diagnosed.
    """
    settings.check_model()
    ordered = list({str(ds.SOPInstanceUID): ds for ds in sorted(images(datasets), key=lambda ds: str(ds.SOPInstanceUID))}.values())
    if not ordered:
        raise ValueError("no image instances: results are made from the instances that were diagnosed")
    study_uids = {str(ds.StudyInstanceUID) for ds in ordered}
    if len(study_uids) != 1:
        raise ValueError(f"the instances belong to {len(study_uids)} studies; results are made per study")
    sources = keyslice.read_sources(ordered, diagnosis)
    keys = keyslice.key_slices(sources, diagnosis, settings.detector_size)
    uids = result_uids(settings.uid_root, study_uids.pop(), (str(ds.SOPInstanceUID) for ds in ordered),
                       settings.model_version, settings.model_digest)
    when = content_datetime(ordered)
    headers = [header(ds) for ds in ordered]
    return [make_sr(headers, diagnosis, keys, settings, uids, when), make_gsps(sources, diagnosis, keys, settings, uids, when)]
