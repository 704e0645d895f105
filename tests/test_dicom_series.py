"""DICOM decoding, series selection and slice ordering (wff.ensemble.dicom_series)."""

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from wff.config import ServingConfig
from wff.ensemble.dicom_series import _parse, _pixels, parse_age, read_study, sequence_of
from wff.ensemble.types import InputError

SAGITTAL = [0, 1, 0, 0, 0, -1]
AXIAL = [1, 0, 0, 0, 1, 0]
# pydicom's bundled MR files in transfer syntaxes its own handlers decode (no plugins needed).
DECODABLE = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"]


def mr_bytes(value: float, x_mm: float, instance: int, series_uid: str, description="T2 TSE SAG", iop=SAGITTAL,
             patient_id="P1", image_type=("ORIGINAL", "PRIMARY"), shape=(8, 8), age="050Y", photometric="MONOCHROME2") -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 3, description
    ds.PatientID, ds.PatientAge, ds.Modality = patient_id, age, "MR"
    ds.InstanceNumber, ds.ImageType = instance, list(image_type)
    ds.ImageOrientationPatient, ds.ImagePositionPatient = iop, [x_mm, 0, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.PixelData = np.full(shape, value, np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class TestDecoding:
    @pytest.mark.parametrize("name", DECODABLE)
    def test_matches_pydicom_with_modality_lut(self, name):
        """Pixels equal pydicom's pixel_array through the modality LUT, in every bundled syntax."""
        path = get_testdata_file(name)
        ds = pydicom.dcmread(path)
        ours = _pixels(name, _parse(name, open(path, "rb").read()))
        np.testing.assert_allclose(ours[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))

    def test_rescale_applied(self):
        """RescaleSlope 2 and intercept -10 map stored 100 to 190."""
        data = mr_bytes(100, 0, 1, "1.2.3")
        assert _pixels("a", _parse("a", data)).max() == 190

    def test_monochrome1_inverted(self):
        """MONOCHROME1 is inverted so bright means high signal."""
        files = [("a", mr_bytes(100, 0, 1, "1.2.3", photometric="MONOCHROME1"))]
        px = _pixels("a", _parse("a", files[0][1]))
        assert px.shape == (1, 8, 8)


class TestSelection:
    def test_slices_ordered_by_position_not_file_or_instance(self):
        """Files shuffled with misleading InstanceNumbers come back ordered along the normal."""
        xs = [12.0, -4.0, 0.0, 8.0, 4.0]
        files = [(f"f{i}", mr_bytes(10 * (i + 1), x, instance=5 - i, series_uid="1.2.3")) for i, x in enumerate(xs)]
        study = read_study(files)
        (series,) = study.series
        # normal of IOP (0,1,0)x(0,0,-1) is (-1,0,0): position = -x, ascending
        np.testing.assert_allclose(series.positions, sorted(-x for x in xs))
        assert series.files == ("f0", "f3", "f4", "f2", "f1")
        assert series.sequence == "T2" and study.patient_age == 50

    def test_axial_and_localizer_skipped_with_reasons(self):
        """Non-sagittal and localizer series are skipped and reported."""
        files = [
            ("sag", mr_bytes(1, 0, 1, "1.1")),
            ("ax", mr_bytes(1, 0, 1, "1.2", iop=AXIAL)),
            ("loc", mr_bytes(1, 0, 1, "1.3", description="3-plane loc")),
            ("der", mr_bytes(1, 0, 1, "1.4", image_type=("DERIVED", "SECONDARY"))),
        ]
        study = read_study(files)
        reasons = sorted(s["reason"] for s in study.skipped)
        assert len(study.series) == 1
        assert reasons == ["ImageType DERIVED/SECONDARY", "localizer/scout", "not sagittal (axial orientation)"]

    @pytest.mark.parametrize("description,sequence", [("sag T1 FSE", "T1"), ("STIR_SAG", "STIR"), ("T2 FS SAG", "STIR"), ("SAG T2", "T2")])
    def test_sequence_from_description(self, description, sequence):
        """Vendor description variants map to T1 / T2 / STIR."""
        assert sequence_of(pydicom.dcmread(io.BytesIO(mr_bytes(1, 0, 1, "1", description=description)))) == sequence


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
        """A truncated file is reported as such."""
        data = mr_bytes(1, 0, 1, "1")
        with pytest.raises(InputError, match="cut.dcm"):
            read_study([("cut.dcm", data[: len(data) // 3])])

    def test_two_patients(self):
        """Files of more than one PatientID are refused without printing the IDs."""
        files = [("a", mr_bytes(1, 0, 1, "1", patient_id="SECRET-1")), ("b", mr_bytes(1, 4, 2, "1", patient_id="SECRET-2"))]
        with pytest.raises(InputError, match="2 different PatientID") as e:
            read_study(files)
        assert "SECRET" not in str(e.value)

    def test_no_sagittal_series(self):
        """Only axial images: the error says why each series was skipped."""
        with pytest.raises(InputError, match="not sagittal"):
            read_study([("ax", mr_bytes(1, 0, 1, "1", iop=AXIAL))])

    def test_limits(self):
        """Configured limits on files and pixels are enforced with the setting's name."""
        with pytest.raises(InputError, match="max_files"):
            read_study([("a", b"x")] * 3, ServingConfig(max_files=2))
        with pytest.raises(InputError, match="max_pixels_per_slice"):
            read_study([("a", mr_bytes(1, 0, 1, "1"))], ServingConfig(max_pixels_per_slice=10))


class TestParseAge:
    @pytest.mark.parametrize("text,years", [("045Y", 45), ("006M", 0.5), ("052W", 52 / 52.1775), ("365D", 365 / 365.25)])
    def test_units(self, text, years):
        """DICOM AS units Y, M, W, D convert to years."""
        assert parse_age(text) == pytest.approx(years)

    def test_malformed(self):
        """A malformed age string is an InputError quoting it."""
        with pytest.raises(InputError, match="45 years"):
            parse_age("45 years")
