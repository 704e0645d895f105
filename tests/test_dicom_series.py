"""DICOM decoding, series selection and slice ordering (wff.ensemble.dicom_series)."""

import io
import logging
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from wff.config import ServingConfig
from wff.ensemble.dicom_pixels import decode_pixels as _pixels
from wff.ensemble.dicom_series import _parse, classify_sequence, parse_age, read_study, read_study_dir, sequence_of
from wff.ensemble.types import InputError

SAGITTAL = [0, 1, 0, 0, 0, -1]  # normal (-1, 0, 0): positions are -x
OBLIQUE_SAGITTAL = [0, 0.966, 0.259, 0, 0, -1]  # 15 degrees off sagittal, still accepted
AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]


def new_dataset(sop_class: str) -> Dataset:
    """An empty dataset with Part 10 file meta (explicit VR little endian) and its SOP UIDs set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def mr_bytes(value=100, x_mm=0.0, instance=1, series_uid="1.2.3", description="T2 TSE SAG", iop=SAGITTAL, patient_id="P1",
             image_type=("ORIGINAL", "PRIMARY"), shape=(8, 8), age="050Y", photometric="MONOCHROME2", series_number=3,
             timing=None, pixels=True) -> bytes:
    """One single-frame MR slice as Part 10 bytes (12-bit, rescale slope 2, intercept -10)."""
    ds = new_dataset(MRImageStorage)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
    ds.PatientID, ds.Modality = patient_id, "MR"
    if age is not None:
        ds.PatientAge = age
    ds.InstanceNumber, ds.ImageType = instance, list(image_type)
    ds.ImageOrientationPatient, ds.ImagePositionPatient = iop, [x_mm, 0, 0]
    ds.PixelSpacing = [0.8, 0.9]
    for key, val in (timing or {}).items():
        setattr(ds, key, val)
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    if pixels:
        ds.PixelData = np.full(shape, value, np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def enhanced_mr_bytes(xs, values, slope=0.5, intercept=3.0) -> bytes:
    """An enhanced (multi-frame) sagittal MR object: orientation/spacing/rescale shared, positions per frame."""
    ds = new_dataset(EnhancedMRImageStorage)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = "9.9", 4, "sag T2 FSE"
    ds.PatientID, ds.Modality, ds.ImageType = "P1", "MR", ["ORIGINAL", "PRIMARY", "T2", "NONE"]
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = SAGITTAL
    shared.PixelMeasuresSequence = DicomSequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.7, 0.7]
    shared.PixelValueTransformationSequence = DicomSequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = slope
    shared.PixelValueTransformationSequence[0].RescaleIntercept = intercept
    shared.PixelValueTransformationSequence[0].RescaleType = "US"
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for x in xs:
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [x, 0.0, 0.0]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(xs), 4, 6
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack([np.full((4, 6), v, np.uint16) for v in values]).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class TestDecoding:
    """Decoding of every transfer syntax is tested in test_decoding.py; here, pixel value handling."""

    def test_bundled_mr_as_a_study(self):
        """MR_small parses but is a DERIVED\\SECONDARY axial image: no usable series, with the reason and the file."""
        with pytest.raises(InputError, match=r"no usable sagittal .*series 1 '' \(1 file from MR_small.dcm\): secondary capture or reformat"):
            read_study([("MR_small.dcm", open(get_testdata_file("MR_small.dcm"), "rb").read())])

    def test_truncated_pixel_data(self):
        """pydicom's MR_truncated.dcm is refused naming the file, the element and the bytes missing, before decoding."""
        data = open(get_testdata_file("MR_truncated.dcm"), "rb").read()
        with pytest.raises(InputError, match=r"MR_truncated.dcm: Rows 64 x Columns 64 x 16 bits needs 8192 bytes of pixel data, "
                                             r"the file holds \d+ \(truncated inside \(7FE0,0010\) PixelData"):
            _pixels("MR_truncated.dcm", _parse("MR_truncated.dcm", data))

    def test_rescale_applied(self):
        """RescaleSlope 2 and intercept -10 map stored 100 to 190."""
        assert _pixels("a", _parse("a", mr_bytes(100))).max() == 190

    def test_monochrome1_inverted_over_the_stored_range(self):
        """MONOCHROME1 maps v to lo + hi - v of the 12-bit range after rescale, the same for every slice."""
        study = read_study([("a", mr_bytes(100, 0, photometric="MONOCHROME1")), ("b", mr_bytes(300, -4, 2, photometric="MONOCHROME1"))])
        lo, hi = -10, 4095 * 2 - 10
        np.testing.assert_allclose(study.series[0].pixels[:, 0, 0], [lo + hi - 190, lo + hi - 590])
        assert study.series[0].pixels.dtype == np.float32

    def test_enhanced_multiframe(self):
        """Frames of an enhanced MR object are ordered by their own positions and rescaled from the shared groups."""
        study = read_study([("multi.dcm", enhanced_mr_bytes([4.0, -8.0, 0.0], [10, 20, 30]))])
        (series,) = study.series
        np.testing.assert_allclose(series.positions, [-4.0, 0.0, 8.0])  # position = -x along (-1, 0, 0)
        np.testing.assert_allclose(series.pixels[:, 0, 0], [10 * 0.5 + 3, 30 * 0.5 + 3, 20 * 0.5 + 3])
        assert series.pixel_spacing == (0.7, 0.7) and series.files == ("multi.dcm",) * 3 and series.sequence == "T2"


class TestSelection:
    def test_slices_ordered_by_position_not_file_or_instance(self):
        """Files shuffled with misleading InstanceNumbers come back ordered along the normal."""
        xs = [12.0, -4.0, 0.0, 8.0, 4.0]
        files = [(f"f{i}", mr_bytes(10 * (i + 1), x, instance=5 - i)) for i, x in enumerate(xs)]
        study = read_study(files)
        (series,) = study.series
        np.testing.assert_allclose(series.positions, sorted(-x for x in xs))
        assert series.files == ("f0", "f3", "f4", "f2", "f1")
        np.testing.assert_allclose(series.pixels[:, 0, 0], [2 * 10 * (i + 1) - 10 for i in (0, 3, 4, 2, 1)])
        assert series.sequence == "T2" and series.pixel_spacing == (0.8, 0.9) and study.patient_age == 50

    def test_oblique_sagittal_kept(self):
        """A sagittal oblique within the tolerance is kept."""
        study = read_study([("a", mr_bytes(iop=OBLIQUE_SAGITTAL)), ("b", mr_bytes(x_mm=4, iop=OBLIQUE_SAGITTAL))])
        assert len(study.series) == 1 and len(study.series[0].files) == 2

    def test_skipped_series_with_reasons(self):
        """Axial, coronal, localizer, secondary, reformatted and post-contrast series are skipped and reported."""
        files = [
            ("sag", mr_bytes(series_uid="1.1")),
            ("ax", mr_bytes(series_uid="1.2", iop=AXIAL, series_number=5)),
            ("cor", mr_bytes(series_uid="1.3", iop=CORONAL, series_number=6)),
            ("loc", mr_bytes(series_uid="1.4", description="3-plane loc", series_number=1)),
            ("scout", mr_bytes(series_uid="1.5", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="t1_sag", series_number=2)),
            ("sec", mr_bytes(series_uid="1.6", image_type=("DERIVED", "SECONDARY"), series_number=7)),
            ("mpr", mr_bytes(series_uid="1.7", image_type=("DERIVED", "PRIMARY", "MPR"), series_number=8)),
            ("post", mr_bytes(series_uid="1.8", description="T1 SAG +C", series_number=9)),
        ]
        study = read_study(files)
        reasons = {s["series_number"]: s["reason"] for s in study.skipped}
        assert [s.files for s in study.series] == [("sag",)]
        assert reasons[5] == "not sagittal (axial orientation)" and reasons[6] == "not sagittal (coronal orientation)"
        assert reasons[1] == reasons[2].split(" (")[0] == "localizer/scout"
        assert "SECONDARY" in reasons[7] and "MPR" in reasons[8] and reasons[9].startswith("post-contrast")

    @pytest.mark.parametrize("description,reason", [
        ("t1_loc_sag", "localizer/scout"), ("SURVEY", "localizer/scout"), ("Localizer", "localizer/scout"),
        ("T1 SAG POST GD", "post-contrast"), ("t1_tse_sag_ce", "post-contrast"), ("SAG T1 +C", "post-contrast"),
        ("T1 SAG block", None), ("sag T2 FSE", None),
    ])
    def test_description_skip_rules(self, description, reason):
        """Localizer and post-contrast descriptions are skipped, whatever the separators; others are kept."""
        study = read_study([("a", mr_bytes(series_uid="1", description=description)), ("b", mr_bytes(series_uid="2", series_number=9, description="T2 SAG"))])
        skipped = [s["reason"] for s in study.skipped]
        assert (skipped[0].startswith(reason) if reason else skipped == [])

    @pytest.mark.parametrize("description,image_type,reason", [
        ("ep2d_diff_sag", ("ORIGINAL", "PRIMARY"), "diffusion"),
        ("SAG DWI b800", ("ORIGINAL", "PRIMARY"), "diffusion"),
        ("sag T2 ADC", ("DERIVED", "PRIMARY"), "diffusion"),
        ("t2_me2d_sag MEDIC", ("ORIGINAL", "PRIMARY"), "T2* gradient-echo"),
        ("SAG T2*", ("ORIGINAL", "PRIMARY"), "T2* gradient-echo"),
        ("t2_tse_dixon_sag_opp", ("DERIVED", "PRIMARY", "DIXON", "OPP_PHASE"), "Dixon"),
        ("sT2W_mDIXON_TSE F", ("DERIVED", "PRIMARY"), "Dixon"),
        ("t2_dixon_sag", ("DERIVED", "PRIMARY", "DIXON", "FAT"), "Dixon"),
    ])
    def test_non_t1_t2_stir_series_skipped(self, description, image_type, reason):
        """Diffusion, T2* gradient echo and Dixon fat/in/opposed-phase series are skipped with their reason."""
        study = read_study([("x", mr_bytes(series_uid="1", description=description, image_type=image_type)),
                            ("t1", mr_bytes(series_uid="2", series_number=9, description="T1 SAG"))])
        assert [s.sequence for s in study.series] == ["T1"]
        assert study.skipped[0]["reason"].startswith(reason) and study.skipped[0]["first_file"] == "x"

    def test_dixon_water_read_as_stir(self):
        """A Dixon water image is fat-suppressed: STIR, from the description or from ImageType WATER."""
        study = read_study([("w", mr_bytes(series_uid="1", description="t2_tse_dixon_sag_W", image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"))),
                            ("v", mr_bytes(series_uid="2", series_number=4, description="SAG 4", image_type=("DERIVED", "PRIMARY", "WATER")))])
        assert [(s.sequence, s.sequence_source) for s in study.series] == [
            ("STIR", "SeriesDescription 't2_tse_dixon_sag_W'"), ("STIR", "ImageType WATER (Dixon fat-suppressed image)")]

    def test_sequence_source_reported(self):
        """Each series says whether its description or its timing decided the sequence; skipped series say why."""
        files = [("a", mr_bytes(series_uid="1", description="SAG 3", timing={"RepetitionTime": 600, "EchoTime": 10})),
                 ("b", mr_bytes(series_uid="2", series_number=4, description="t2_tirm_sag")),
                 ("c", mr_bytes(series_uid="3", series_number=5, iop=AXIAL))]
        study = read_study(files)
        assert [(s.sequence, s.sequence_source) for s in study.series] == [
            ("T1", "timing (RepetitionTime 600 ms, EchoTime 10 ms)"), ("STIR", "SeriesDescription 't2_tirm_sag'")]
        assert study.skipped == ({"series_number": 5, "description": "T2 TSE SAG", "reason": "not sagittal (axial orientation)",
                                  "files": 1, "first_file": "c"},)

    def test_malformed_header_value_skips_the_series(self):
        """A series whose orientation is not numbers is skipped naming the tag and the file; a good one is still read."""
        data = mr_bytes(series_uid="1")
        assert data.count(b"0.0\\1.0\\0.0\\0.0\\0.0\\-1") == 1
        bad = data.replace(b"0.0\\1.0\\0.0\\0.0\\0.0\\-1", b"a.a\\b.b\\c.c\\d.d\\e.e\\-f")  # same length, not numbers
        study = read_study([("bad", bad), ("good", mr_bytes(series_uid="2", series_number=4, description="T1 SAG"))])
        assert [s.sequence for s in study.series] == ["T1"]
        assert study.skipped[0]["reason"] == "no usable ImageOrientationPatient" and study.skipped[0]["first_file"] == "bad"

    def test_malformed_values_not_echoed(self, caplog):
        """pydicom's "Invalid value for VR IS: '<value>'" warning is silenced while a request is read."""
        data = mr_bytes(series_number=3)
        tag = data.index(b"\x20\x00\x11\x00IS")  # (0020,0011) SeriesNumber, value "3 " follows the 2-byte length
        bad = data[: tag + 8] + b"Q7" + data[tag + 10:]
        with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            study = read_study([("a", bad)])
        assert study.series[0].series_number is None
        assert "Q7" not in caplog.text and not [w for w in caught if "Q7" in str(w.message)]

    def test_distortion_corrected_originals_kept(self):
        """DERIVED\\PRIMARY (e.g. Siemens DIS2D) images are originals and are kept."""
        study = read_study([("a", mr_bytes(image_type=("DERIVED", "PRIMARY", "M", "NORM", "DIS2D")))])
        assert len(study.series) == 1

    def test_unknown_sequence_skipped(self):
        """A proton-density series is neither T1, T2 nor STIR."""
        files = [("t1", mr_bytes(description="T1 SAG", series_uid="1")), ("pd", mr_bytes(description="SAG PD", series_uid="2", series_number=4,
                                                                                      timing={"RepetitionTime": 2000, "EchoTime": 30}))]
        study = read_study(files)
        assert [s["reason"] for s in study.skipped] == ["sequence type (T1/T2/STIR) not recognised from SeriesDescription or TR/TE/TI"]

    def test_series_order(self):
        """Series come by SeriesNumber, then description, whatever the file order."""
        files = [("c", mr_bytes(series_uid="3", series_number=5, description="T1 SAG")),
                 ("b", mr_bytes(series_uid="2", series_number=2, description="T2 SAG")),
                 ("a", mr_bytes(series_uid="1", series_number=2, description="STIR SAG"))]
        assert [s.description for s in read_study(files).series] == ["STIR SAG", "T2 SAG", "T1 SAG"]

    def test_different_sizes_skipped(self):
        """Slices of different sizes in one series make it unusable; the others remain."""
        files = [("a", mr_bytes(series_uid="1")), ("b", mr_bytes(x_mm=4, series_uid="1", shape=(6, 6))),
                 ("c", mr_bytes(series_uid="2", series_number=4, description="T1 SAG"))]
        study = read_study(files)
        assert [s.sequence for s in study.series] == ["T1"] and "different sizes" in study.skipped[0]["reason"]

    def test_dicomdir_and_duplicates_ignored(self):
        """A DICOMDIR is ignored and a file sent twice counts once."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dicomdir = Dataset()
        dicomdir.file_meta = meta
        buf = io.BytesIO()
        dicomdir.save_as(buf, enforce_file_format=True)
        slice_ = mr_bytes()
        study = read_study([("DICOMDIR", buf.getvalue()), ("a", slice_), ("copy", slice_)])
        assert study.series[0].files == ("a",)

    def test_nothing_logged_about_the_patient(self, caplog):
        """Debug logging carries neither PatientID nor pixel values."""
        with caplog.at_level(logging.DEBUG, logger="wff"):
            read_study([("a", mr_bytes(1234, patient_id="SECRET-ID", age="bad")), ("ax", mr_bytes(series_uid="2", iop=AXIAL, patient_id="SECRET-ID"))])
        assert "SECRET" not in caplog.text and "2458" not in caplog.text


class TestSequenceRules:
    @pytest.mark.parametrize("description,sequence", [
        ("T1 TSE SAG", "T1"), ("sag T1 FSE", "T1"), ("sT1W_TSE", "T1"), ("T1 FS SAG", "T1"),
        ("sag T2 FSE", "T2"), ("SAG T2 FRFSE", "T2"), ("T2W_TSE SAG", "T2"),
        ("STIR_SAG", "STIR"), ("t2_tirm_sag", "STIR"), ("T2 FS SAG", "STIR"), ("t2_tse_fs_sag", "STIR"),
        ("sag T2 FSE FS", "STIR"), ("T2W_SPAIR SAG", "STIR"), ("SAG FatSat T2", "STIR"),
        ("t1_tse_sag", "T1"), ("Sag T1 FLAIR", "T1"), ("SAG T1W SE", "T1"), ("T1WI SAG", "T1"),  # Siemens, GE, Canon, Hitachi
        ("t2_tse_sag_384", "T2"), ("Sag T2 FRFSE", "T2"), ("T2W_TSE", "T2"), ("T2WI SAG", "T2"),
        ("Sag STIR", "STIR"), ("STIR_LONGTE", "STIR"), ("Sag T2 IDEAL", "STIR"), ("sT2W_SPIR", "STIR"), ("SAG FS T2WI", "STIR"),
        ("t2_tse_dixon_sag_W", "STIR"),
    ])
    def test_description(self, description, sequence):
        """Vendor description variants map to T1 / T2 / STIR."""
        assert sequence_of(pydicom.dcmread(io.BytesIO(mr_bytes(description=description)))) == sequence

    @pytest.mark.parametrize("timing,sequence", [
        ({"RepetitionTime": 4000, "EchoTime": 60, "InversionTime": 160}, "STIR"),
        ({"RepetitionTime": 550, "EchoTime": 12}, "T1"),
        ({"RepetitionTime": 3500, "EchoTime": 100}, "T2"),
        ({"RepetitionTime": 2000, "EchoTime": 30}, None),
        ({"RepetitionTime": 2200, "EchoTime": 9, "InversionTime": 860}, "T1"),  # T1 FLAIR
    ])
    def test_timing_fallback(self, timing, sequence):
        """Without a recognisable description, TR/TE/TI decide."""
        sequence_found, source = classify_sequence(pydicom.dcmread(io.BytesIO(mr_bytes(description="SAG 3", timing=timing))))
        assert sequence_found == sequence and (source.startswith("timing (RepetitionTime") if sequence else source == "")


    def test_timing_from_enhanced_functional_groups(self):
        """Enhanced MR keeps TR and TI in shared functional groups; they are read from there."""
        shared = Dataset()
        shared.MRTimingAndRelatedParametersSequence = DicomSequence([Dataset()])
        shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime = 4000.0
        shared.MRModifierSequence = DicomSequence([Dataset()])
        shared.MRModifierSequence[0].InversionTimes = [160.0]
        ds = Dataset()
        ds.SeriesDescription = "SAG 3"
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        assert sequence_of(ds) == "STIR"


class TestRejections:
    def test_empty_request(self):
        """No files at all."""
        with pytest.raises(InputError, match="no DICOM files"):
            read_study([])

    def test_non_dicom_names_the_file(self):
        """Bytes that are not DICOM name the offending file."""
        with pytest.raises(InputError, match="notes.txt: not a DICOM file"):
            read_study([("notes.txt", b"hello, not dicom" * 20)])

    def test_truncated_file(self):
        """A file cut short inside its pixel data is refused with its name and the element."""
        data = mr_bytes()
        with pytest.raises(InputError, match=r"cut.dcm: .* the file holds \d+ \(truncated inside \(7FE0,0010\) PixelData"):
            read_study([("cut.dcm", data[: len(data) - 40])])

    def test_missing_pixel_data(self):
        """A DICOM object without pixels (a report, a presentation state) is refused."""
        with pytest.raises(InputError, match="report.dcm: DICOM without pixel data"):
            read_study([("report.dcm", mr_bytes(pixels=False))])

    def test_two_patients(self):
        """Files of more than one PatientID are refused naming the first odd file, without printing the IDs."""
        files = [("a", mr_bytes(patient_id="SECRET-1")), ("b", mr_bytes(x_mm=4, instance=2, patient_id="SECRET-2"))]
        with pytest.raises(InputError, match="b: different PatientID from a; .*more than one patient") as e:
            read_study(files)
        assert "SECRET" not in str(e.value)

    def test_no_usable_series_says_why(self):
        """Only axial and localizer images: the error gives each series' reason and first file, by series number."""
        with pytest.raises(InputError, match=r"no usable sagittal.*series 1 'SURVEY' \(1 file from loc\): localizer.*; "
                                             r"series 3 'T2 TSE SAG' \(1 file from ax\): not sagittal"):
            read_study([("ax", mr_bytes(iop=AXIAL)), ("loc", mr_bytes(series_uid="2", series_number=1, description="SURVEY"))])

    @pytest.mark.parametrize("limits,match", [
        (ServingConfig(max_files=2), "3 files exceed the limit of 2 .*serving.max_files"),
        (ServingConfig(max_bytes=1000), "bytes exceed the limit of 1000 .*serving.max_bytes"),
        (ServingConfig(max_slices=2), r"no usable .*: 3 slices \(files and their NumberOfFrames\), more than the 2 .*serving.max_slices"),
        (ServingConfig(max_pixels_per_slice=10), "a: 8x8 pixels exceed the limit of 10 .*serving.max_pixels_per_slice"),
    ])
    def test_limits(self, limits, match):
        """Each request limit is enforced with the setting's name."""
        with pytest.raises(InputError, match=match):
            read_study([("a", mr_bytes()), ("b", mr_bytes(x_mm=4)), ("c", mr_bytes(x_mm=8))], limits)

    def test_slices_of_all_series_together(self):
        """Two series within the slice limit each but over it together: the request is refused."""
        files = [("a", mr_bytes()), ("b", mr_bytes(x_mm=4)),
                 ("c", mr_bytes(series_uid="2", series_number=4, description="T1 SAG")),
                 ("d", mr_bytes(series_uid="2", series_number=4, description="T1 SAG", x_mm=4))]
        with pytest.raises(InputError, match="4 sagittal slices exceed the limit of 3 .*serving.max_slices"):
            read_study(files, ServingConfig(max_slices=3))

    def test_series_over_the_slice_limit_is_skipped(self):
        """A series with more slices than a patient may have is skipped with the reason; the others are read."""
        files = [("a", mr_bytes()), ("b", mr_bytes(x_mm=4)), ("c", mr_bytes(x_mm=8)),
                 ("d", mr_bytes(series_uid="2", series_number=4, description="T1 SAG"))]
        study = read_study(files, ServingConfig(max_slices=2))
        assert [s.files for s in study.series] == [("d",)]
        assert "3 slices (files and their NumberOfFrames), more than the 2" in study.skipped[0]["reason"]


class TestReadStudyDir:
    def test_names_relative_and_sidecars_ignored(self, tmp_path):
        """Files are named relative to the folder; LabelMe, CSV and hidden files are not read."""
        (tmp_path / "S2_T2").mkdir()
        (tmp_path / "S2_T2" / "IM0001.dcm").write_bytes(mr_bytes(x_mm=0))
        (tmp_path / "S2_T2" / "IM0002").write_bytes(mr_bytes(x_mm=-4))
        (tmp_path / "S2_T2" / "IM0001.json").write_text("{}")
        (tmp_path / "notes.csv").write_text("a,b\n")
        (tmp_path / ".DS_Store").write_bytes(b"\0\1")
        study = read_study_dir(tmp_path)
        assert study.series[0].files == ("S2_T2/IM0001.dcm", "S2_T2/IM0002")

    def test_not_a_folder(self, tmp_path):
        """A missing folder is an InputError naming it."""
        with pytest.raises(InputError, match="nope: not a folder"):
            read_study_dir(tmp_path / "nope")

    def test_limits_before_reading(self, tmp_path):
        """Too many files are refused from the listing alone."""
        for i in range(3):
            (tmp_path / f"{i}.dcm").write_bytes(b"x")
        with pytest.raises(InputError, match="3 files exceed .*serving.max_files"):
            read_study_dir(tmp_path, ServingConfig(max_files=2))


class TestParseAge:
    @pytest.mark.parametrize("text,years", [("045Y", 45), ("006M", 0.5), ("012W", 12 * 7 / 365.25), ("030D", 30 / 365.25), ("45Y", 45), ("045y", 45)])
    def test_units(self, text, years):
        """DICOM AS units D, W, M and Y convert to years."""
        assert parse_age(text) == pytest.approx(years)

    @pytest.mark.parametrize("text", ["45 years", "Y045", "", "1234Y", "045X"])
    def test_malformed(self, text):
        """A malformed age string is an InputError quoting it."""
        with pytest.raises(InputError, match="not a DICOM age string"):
            parse_age(text)

    def test_bad_tag_leaves_age_unknown(self):
        """A malformed PatientAge tag does not fail the study; the age is left to the request."""
        assert read_study([("a", mr_bytes(age="fifty"))]).patient_age is None
