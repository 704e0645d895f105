"""Decoding every transfer syntax scanners send, through wff's reader (wff.ensemble.dicom_series).

Three kinds of evidence, per transfer syntax family:

* real files (pydicom's bundled test files and the pydicom-data package): a lossless encoding
  must give exactly the pixels of the uncompressed original of the same image; where no
  uncompressed twin exists, the reader must agree with pydicom's own decoding;
* our synthetic sagittal series (signed, non-square, anisotropic spacing) encoded by pydicom
  into each syntax it can write, read back as a study: identical to the uncompressed study
  (lossless) or within the JPEG quantisation error (baseline);
* the served path: a patient sent compressed gets the same diagnosis as sent uncompressed.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from wff.client.grpc_client import read_patient_files
from wff.ensemble.dicom_pixels import decode_pixels as _pixels
from wff.ensemble.dicom_series import _parse, read_study

# Real files with an uncompressed twin of the same pixels: (encoded file, uncompressed reference).
# MR_small: 64 x 64 signed 16-bit MR; emri_small: enhanced MR, 10 frames of 64 x 64, 12-bit;
# MR2: 1024 x 1024 MR, the J2KI file is lossy and its twin holds the lossy result uncompressed.
LOSSLESS_TWINS = [
    ("MR_small_implicit.dcm", "MR_small.dcm"),  # implicit VR little endian
    ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
    ("MR_small_expb.dcm", "MR_small.dcm"),
    ("MR_small_padded.dcm", "MR_small.dcm"),  # explicit VR little endian, padded pixel data
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("emri_small_big_endian.dcm", "emri_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # JPEG 2000 lossless, 1024 x 1024
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm"),  # JPEG 2000 (lossy) against its decoded twin
]
# Real grey-level files without a twin; the reader must decode them as pydicom does.
NO_TWIN = [
    "JPEG-LL.dcm",  # JPEG lossless process 14 SV1, 16-bit
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless process 14 SV1, 8-bit
    "JPGExtended.dcm",  # JPEG extended (process 2 and 4), 12-bit
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    "693_J2KR.dcm",  # JPEG 2000 lossless, signed CT
    "image_dfl.dcm",  # deflated explicit VR little endian
]
SHAPE = (56, 40)  # rows x columns: a non-square matrix (JPEG 2000 needs >= 32 per side)
SPACING = [0.5, 1.25]  # anisotropic pixel spacing, mm
LOSSLESS_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless]
JPEG_BASELINE_QUALITY = 95
JPEG_BASELINE_MAX_MEAN_ERROR = 2.0  # grey levels of 255, at quality 95


def read_bytes(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is missing: install the dev extra (pydicom-data)"
    with open(path, "rb") as f:
        return f.read()


def reader_pixels(name: str) -> np.ndarray:
    """(frames, rows, cols) float32 as wff's reader decodes the file."""
    return _pixels(name, _parse(name, read_bytes(name)))


def sagittal_slice(pixels: np.ndarray, index: int, series_uid: str, signed: bool) -> Dataset:
    """One uncompressed sagittal MR slice (explicit VR little endian) holding ``pixels`` exactly."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.ImageType = "DEC", "MR", ["ORIGINAL", "PRIMARY"]
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 2, "sag T2 FSE"
    ds.InstanceNumber = index + 1
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [0, 1, 0, 0, 0, -1], [-3.5 * index, -80.0, 60.0]
    ds.PixelSpacing = SPACING
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -100
    ds.PixelData = pixels.tobytes()
    return ds


def synthetic_series(n: int = 4, dtype=np.int16, seed: int = 0) -> list[Dataset]:
    """n slices of SHAPE with a bright blob; int16 series have negative stored values."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    low = -2000 if info.min < 0 else 0
    high = min(3000, int(info.max))
    uid = generate_uid()
    slices = []
    for k in range(n):
        pixels = rng.integers(low, high // 2, SHAPE).astype(dtype)
        pixels[10:20, 5:15] = high - 10 * k  # a bright blob
        slices.append(sagittal_slice(pixels, k, uid, signed=info.min < 0))
    return slices


def encode(ds: Dataset, syntax: str) -> bytes:
    """Part 10 bytes of ``ds`` in transfer syntax ``syntax`` (pydicom's own encoders)."""
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))  # a copy
    if syntax in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
        ds.compress(syntax)
    else:
        if syntax == ExplicitVRBigEndian:  # pixel bytes swapped by hand: pydicom writes OW values as they are
            dtype = ds.pixel_array.dtype
            ds.PixelData = ds.pixel_array.astype(dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    if syntax == ExplicitVRBigEndian:  # pydicom only writes big endian when forced (the preamble is kept from the read)
        pydicom.dcmwrite(buf, ds, force_encoding=True, implicit_vr=False, little_endian=False)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg_baseline(ds: Dataset) -> bytes:
    """An 8-bit slice as JPEG baseline (process 1), encoded by Pillow and encapsulated."""
    frame = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(frame, format="JPEG", quality=JPEG_BASELINE_QUALITY)
    out = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    out.PixelData = encapsulate([frame.getvalue()])
    out["PixelData"].VR = "OB"
    out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out.LossyImageCompression = "01"
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class TestRealFiles:
    @pytest.mark.parametrize("name,reference", LOSSLESS_TWINS, ids=[n for n, _ in LOSSLESS_TWINS])
    def test_equals_uncompressed_twin(self, name, reference):
        """The reader gives exactly the pixels of the uncompressed file of the same image."""
        got, want = reader_pixels(name), reader_pixels(reference)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)

    @pytest.mark.parametrize("name", NO_TWIN)
    def test_matches_pydicom(self, name):
        """Files without an uncompressed twin decode to pydicom's pixels through the modality LUT, not to a constant."""
        ds = pydicom.dcmread(get_testdata_file(name))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32).reshape(frames, ds.Rows, ds.Columns)
        got = reader_pixels(name)
        np.testing.assert_array_equal(got, expected)
        assert got.std() > 0

    def test_signed_pixels_keep_their_sign(self):
        """A signed CT (PixelRepresentation 1) has negative stored values; they stay negative before rescale."""
        ds = pydicom.dcmread(get_testdata_file("693_J2KR.dcm"))
        assert ds.PixelRepresentation == 1 and ds.pixel_array.min() < 0
        np.testing.assert_allclose(reader_pixels("693_J2KR.dcm")[0].min(), float(ds.pixel_array.min()) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))

    def test_enhanced_mr_frames(self):
        """An enhanced multi-frame MR object gives one array per frame."""
        assert reader_pixels("emri_small_jpeg_2k_lossless.dcm").shape == (10, 64, 64)

    def test_undecodable_jpeg_names_the_file(self):
        """pydicom's JPEG-lossy.dcm (a known-damaged 12-bit JPEG) is refused with its name and the syntax."""
        with pytest.raises(Exception, match=r"JPEG-lossy.dcm: pixel data cannot be decoded \(JPEG Extended"):
            reader_pixels("JPEG-lossy.dcm")


class TestSyntheticRoundTrip:
    @pytest.fixture
    def series(self):
        return synthetic_series()

    @pytest.fixture
    def reference(self, series):
        return read_study([(f"IM{k}", to_bytes(ds)) for k, ds in enumerate(series)]).series[0]

    def test_reference_is_signed_and_non_square(self, reference, series):
        """The uncompressed study keeps negative values, the 56 x 40 matrix and the 0.5 x 1.25 mm spacing."""
        assert reference.pixels.shape == (4, *SHAPE) and reference.pixel_spacing == tuple(SPACING)
        assert min(ds.pixel_array.min() for ds in series) < 0
        np.testing.assert_array_equal(reference.pixels[0], series[0].pixel_array * np.float32(1.5) - 100)

    @pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES, ids=lambda uid: uid.name)
    def test_lossless_syntax_reads_identically(self, series, reference, syntax):
        """Encoded by pydicom in this syntax and shuffled, the study reads back to the same pixels in the same order."""
        files = [(f"IM{k}", encode(ds, syntax)) for k, ds in enumerate(series)][::-1]
        assert all(pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax for _, data in files)
        (got,) = read_study(files).series
        np.testing.assert_array_equal(got.pixels, reference.pixels)
        assert got.files == reference.files and got.pixel_spacing == reference.pixel_spacing

    def test_jpeg_baseline(self):
        """8-bit slices as JPEG baseline read back within the quantisation error of quality 95."""
        series = synthetic_series(dtype=np.uint8, seed=1)
        reference = read_study([(f"IM{k}", to_bytes(ds)) for k, ds in enumerate(series)]).series[0]
        (got,) = read_study([(f"IM{k}", jpeg_baseline(ds)) for k, ds in enumerate(series)]).series
        error = np.abs(got.pixels - reference.pixels) / 1.5  # back to stored grey levels
        assert got.pixels.shape == reference.pixels.shape and error.mean() < JPEG_BASELINE_MAX_MEAN_ERROR


@pytest.mark.server
class TestServedCompressed:
    def test_compressed_patient_diagnosed_like_uncompressed(self, limited_server, dicom_patient):
        """The fixture patient re-encoded (RLE, JPEG 2000 and JPEG-LS lossless) gets the same served diagnosis."""
        from wff.client.grpc_client import DiagnosisClient

        files = read_patient_files(dicom_patient)
        syntaxes = [RLELossless, JPEG2000Lossless, JPEGLSLossless]
        compressed = [(name, encode(pydicom.dcmread(io.BytesIO(data)), syntaxes[k % 3])) for k, (name, data) in enumerate(files)]
        with DiagnosisClient(limited_server.grpc_url, timeout_s=60) as client:
            plain, packed = client.diagnose(files), client.diagnose(compressed)
        assert packed.label == plain.label and packed.series_info == plain.series_info
        for name in ("p_malignant", "series_m", "slice_d", "slice_score", "slice_box"):
            np.testing.assert_array_equal(getattr(packed, name), getattr(plain, name), err_msg=name)
