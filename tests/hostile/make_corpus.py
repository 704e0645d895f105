"""Write the hostile-input corpus: crafted DICOM requests that must be refused quickly and clearly.

    .venv/bin/python tests/hostile/make_corpus.py      (rewrites tests/hostile/<case>/ and cases.json)

Each case is a folder of files sent as one request, in sorted order. cases.json gives, per case,
what it is, the regex the refusal must match (file names as the reader sees them: the path
relative to the case folder, or ``DICOM_FILES[i]`` on the served path) and which file
(index in sorted order) the message must name. The files are made from one small synthetic
sagittal slice with fixed UIDs, so rewriting gives the same bytes for a given pydicom and codec
build. Every file is at most a few KB except the deflate bomb (about 1 MB, inflating to 1 GiB).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

HERE = Path(__file__).resolve().parent
ROOT_UID = "1.2.826.0.1.3680043.10.1137"  # fixed UIDs: <root>.<kind>.<n>
SIZE = 48
BOMB_BYTES = 1 << 30  # what the deflate bomb inflates to
HUGE = 30000  # the side a crafted codestream declares


def uid(kind: int, n: int = 1) -> str:
    return f"{ROOT_UID}.{kind}.{n}"


def slice_dataset(index: int = 0, series: int = 1, description: str = "SAG T2", **tags) -> FileDataset:
    """One sagittal MR slice, 48 x 48 uint16 with a bright square, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid(3, series * 1000 + index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(1), uid(2, series)
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientAge = "MR", "HOSTILE", "Hostile^Corpus", "055Y"
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series, description, index + 1
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [float(index * 4), -100.0, 100.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 4.0
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pixels = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 7 + 100 * index) % 1000
    pixels[12:24, 12:24] += 2000
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_raw_value(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace one element value of the same length in written bytes (pydicom refuses to write malformed values)."""
    assert len(old) == len(new) and data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


def compressed(syntax, patch=None) -> bytes:
    """The slice encoded in ``syntax`` with ``patch(frame) -> frame`` applied to its one frame."""
    ds = slice_dataset()
    if syntax == JPEGBaseline8Bit:
        from PIL import Image

        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        pixels = (np.frombuffer(ds.PixelData, np.uint16).reshape(SIZE, SIZE) // 12).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
        frame = buf.getvalue()
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, encoding_plugin="pyjpegls" if syntax == JPEGLSLossless else "", generate_instance_uid=False)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([patch(frame) if patch else frame])
    ds["PixelData"].VR = "OB"
    return part10(ds)


def sof_declares(side: int):
    """Patch a JPEG / JPEG-LS frame header (SOF) to declare side x side pixels."""
    def patch(frame: bytes) -> bytes:
        out, pos = bytearray(frame), 2
        while pos < len(out):
            marker = out[pos + 1]
            if marker in (0xC0, 0xC1, 0xC3, 0xF7):
                struct.pack_into(">HH", out, pos + 5, side, side)
                return bytes(out)
            pos += 2 + struct.unpack_from(">H", out, pos + 2)[0]
        raise AssertionError("no SOF marker")
    return patch


def siz_declares(side: int):
    """Patch a JPEG 2000 codestream's SIZ marker to declare side x side pixels."""
    def patch(frame: bytes) -> bytes:
        assert frame[:4] == b"\xff\x4f\xff\x51"
        out = bytearray(frame)
        struct.pack_into(">LL", out, 8, side, side)
        return bytes(out)
    return patch


def rle_segments(count: int):
    def patch(frame: bytes) -> bytes:
        out = bytearray(frame)
        struct.pack_into("<L", out, 0, count)
        return bytes(out)
    return patch


def deflate_bomb() -> bytes:
    """A Deflated Explicit VR file of about 1 MB whose data set inflates to BOMB_BYTES."""
    ds = slice_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = io.BytesIO()
    header.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(header, ds.file_meta, enforce_standard=True)
    meta = header.getvalue()
    explicit = part10(slice_dataset())
    head = explicit[explicit.index(b"\x08\x00\x16\x00"):]  # the data set from SOPClassUID on, explicit VR little endian
    pixel_at = head.index(b"\xe0\x7f\x10\x00")
    padding = BOMB_BYTES - pixel_at - 12
    element = b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<L", padding)  # PixelData declaring the whole rest
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(head[:pixel_at] + element)]
    zeros = bytes(1 << 24)
    for _ in range(padding // len(zeros)):
        body.append(deflater.compress(zeros))
    body.append(deflater.compress(bytes(padding % len(zeros))))
    body.append(deflater.flush())
    return meta + b"".join(body)


def deflated(head: bytes, meta_explicit: bool = True) -> bytes:
    """A Deflated Explicit VR file: the slice's file meta (or the same meta in implicit VR, which PS3.10
    forbids and pydicom accepts) followed by ``head`` deflated."""
    ds = slice_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = io.BytesIO()
    header.write(b"\0" * 128 + b"DICM")
    if meta_explicit:
        pydicom.filewriter.write_file_meta_info(header, ds.file_meta, enforce_standard=True)
    else:
        meta = Dataset()
        meta.update(ds.file_meta)
        body = io.BytesIO()
        for elem in meta:
            value = elem.value.encode() if isinstance(elem.value, str) else bytes(elem.value)
            value += b"\0" * (len(value) % 2)
            body.write(struct.pack("<HHL", elem.tag.group, elem.tag.element, len(value)) + value)
        header.write(body.getvalue())
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return header.getvalue() + deflater.compress(head) + deflater.flush()


def tiny_elements(count: int) -> bytes:
    """The slice's data set with ``count`` empty private elements of 8 bytes each (a bomb of elements, not of bytes)."""
    explicit = part10(slice_dataset())
    head = explicit[explicit.index(b"\x08\x00\x16\x00"):]
    pixel_at = head.index(b"\xe0\x7f\x10\x00")
    element = b"\x09\x00\x10\x10UL\x00\x00"  # (0009,1010) UL, empty, repeated
    return head[:pixel_at] + element * count + head[pixel_at:]


def extended_offsets_case() -> bytes:
    """JPEG with two fragments: the Basic Offset Table path gives a good 48 x 48 frame, the Extended Offset
    Table (which the decoder follows) a frame declaring 30000 x 30000."""
    good = pydicom.dcmread(io.BytesIO(compressed(JPEGBaseline8Bit)))
    frame = next(generate_frames(good.PixelData, number_of_frames=1))
    bad = sof_declares(HUGE)(frame)
    bad += b"\0" * (len(bad) % 2)
    good.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)]) + b"\xfe\xff\x00\xe0" + struct.pack("<L", len(bad)) + bad
    good["PixelData"].VR = "OB"
    first = 8 + len(frame) + len(frame) % 2  # offset of the second fragment's item, from the first fragment's item
    good.ExtendedOffsetTable = struct.pack("<Q", first)
    good.ExtendedOffsetTableLengths = struct.pack("<Q", len(bad))
    return part10(good)


def oblique(degrees: float) -> list[float]:
    """ImageOrientationPatient of a sagittal slice tilted ``degrees`` about the patient's z axis."""
    a = math.radians(degrees)
    return [round(math.sin(a), 6), round(math.cos(a), 6), 0.0, 0.0, 0.0, -1.0]


def cases() -> dict[str, dict]:
    """case -> {"what", "files": {name: bytes}, "expect": regex, "names": index of the file the message names or None}."""
    good = part10(slice_dataset())
    frames_huge = slice_dataset(NumberOfFrames=2**31 - 1)
    frames_huge.PixelData = bytes(128)
    enhanced = pydicom.dcmread(io.BytesIO(compressed(JPEGLSLossless)))
    enhanced.NumberOfFrames = 2**31 - 1
    cut_pixels = good[: len(good) - 1000]
    cut_header = good[: good.index(b"\x28\x00\x30\x00") + 12]  # inside PixelSpacing's value
    ct = slice_dataset(Modality="CT")
    many = {f"S{n:02d}.dcm": part10(slice_dataset(series=n, description=f"SAG T2 {n}")) for n in range(1, 10)}
    blank = {"a.dcm": part10(slice_dataset(PatientID="")),
             "b.dcm": part10(slice_dataset(index=1, PatientID="", PatientName="Other^Person"))}
    two_studies = {"a.dcm": good, "b.dcm": part10(slice_dataset(index=1, StudyInstanceUID=uid(1, 2)))}
    return {
        "frames_2e31_native": {
            "what": "a 1 KB sagittal file declaring NumberOfFrames 2^31-1",
            "files": {"frames.dcm": part10(frames_huge)},
            "expect": r"NumberOfFrames 2147483647 x Rows 48 x Columns 48 x 16 bits needs \d+ bytes of pixel data, the file holds 128",
            "names": 0},
        "frames_2e31_jpegls": {
            "what": "a compressed sagittal file declaring NumberOfFrames 2^31-1 with one frame",
            "files": {"frames.dcm": part10(enhanced)},
            "expect": r"2147483647 slices \(files and their NumberOfFrames\), more than the \d+ a patient may have \(serving.max_slices\)",
            "names": 0},
        "deflate_bomb": {
            "what": "a Deflated Explicit VR file of about 1 MB that inflates to 1 GiB",
            "files": {"bomb.dcm": deflate_bomb()},
            "expect": r"Deflated Explicit VR data set inflates beyond the \d+ bytes left of the request's limit \(serving.max_bytes\)",
            "names": 0},
        "deflate_implicit_meta": {
            "what": "a deflated file whose file meta is implicit VR (pydicom would inflate it without a bound)",
            "files": {"meta.dcm": deflated(bytes(16 * 1024 * 1024), meta_explicit=False)},
            "expect": r"deflated file whose file meta information is not Explicit VR Little Endian",
            "names": 0},
        "deflate_tiny_elements": {
            "what": "a deflated file of a few KB holding 250,000 empty elements (2 MB inflated)",
            "files": {"elements.dcm": deflated(tiny_elements(250_000))},
            "expect": r"holds more than 200000 elements",
            "names": 0},
        "truncated_in_file_meta": {
            "what": "a file cut short inside a long element header of its file meta information",
            "files": {"cut.dcm": good[:good.index(b"\x02\x00\x01\x00OB") + 10]},
            "expect": r"file truncated inside the file meta information at \(0002,0001\)",
            "names": 0},
        "excess_pixel_data": {
            "what": "a single-frame header whose native pixel data holds 64 frames",
            "files": {"excess.dcm": part10(slice_dataset(PixelData=bytes(64 * SIZE * SIZE * 2)))},
            "expect": r"PixelData holds 294912 bytes, more than twice the 4608",
            "names": 0},
        "jpeg_extended_offsets": {
            "what": "JPEG whose Extended Offset Table points the decoder at a frame declaring 30000 x 30000",
            "files": {"eot.dcm": extended_offsets_case()},
            "expect": r"frame 1: the compressed frame declares 30000x30000 pixels",
            "names": 0},
        "jpeg_sof_huge": {
            "what": "a JPEG baseline frame whose SOF declares 30000 x 30000 pixels, header 48 x 48",
            "files": {"jpeg.dcm": compressed(JPEGBaseline8Bit, sof_declares(HUGE))},
            "expect": r"frame 1: the compressed frame declares 30000x30000 pixels .* header .* 48x48 .*refused before decoding",
            "names": 0},
        "jpegls_sof_mismatch": {
            "what": "a JPEG-LS frame whose SOF55 declares 64 x 64 pixels, header 48 x 48",
            "files": {"jpegls.dcm": compressed(JPEGLSLossless, sof_declares(64))},
            "expect": r"frame 1: the compressed frame declares 64x64 pixels .* header .* 48x48",
            "names": 0},
        "j2k_siz_huge": {
            "what": "a JPEG 2000 frame whose SIZ declares 30000 x 30000 pixels, header 48 x 48",
            "files": {"j2k.dcm": compressed(JPEG2000Lossless, siz_declares(HUGE))},
            "expect": r"frame 1: the compressed frame declares 30000x30000 pixels .* header .* 48x48",
            "names": 0},
        "rle_segments": {
            "what": "an RLE frame whose header declares 15 segments for 16-bit grey pixels",
            "files": {"rle.dcm": compressed(RLELossless, rle_segments(15))},
            "expect": r"RLE header declares 15 segments at offsets that do not fit a 16-bit frame",
            "names": 0},
        "malformed_number_of_frames": {
            "what": "NumberOfFrames (IS) that is not a number",
            "files": {"frames.dcm": with_raw_value(part10(slice_dataset(NumberOfFrames=1)), b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x00x1")},
            "expect": r"NumberOfFrames 'x1' is not an integer",
            "names": 0},
        "malformed_pixel_spacing": {
            "what": "PixelSpacing (DS) that is not two numbers",
            "files": {"spacing.dcm": with_raw_value(good, b"\x28\x00\x30\x00DS\x08\x001.0\\1.0 ", b"\x28\x00\x30\x00DS\x08\x00a.0\\b.0 ")},
            "expect": r"PixelSpacing is not two numbers",
            "names": 0},
        "malformed_rescale_slope": {
            "what": "RescaleSlope (DS) that is not a number",
            "files": {"slope.dcm": with_raw_value(part10(slice_dataset(RescaleSlope=1, RescaleIntercept=0)),
                                                   b"\x28\x00\x53\x10DS\x04\x001.0 ", b"\x28\x00\x53\x10DS\x04\x00x.0 ")},
            "expect": r"RescaleSlope 'x.0' is not a number",
            "names": 0},
        "two_studies": {
            "what": "two sagittal files of one patient from two studies",
            "files": two_studies,
            "expect": r"different StudyInstanceUID from .*two examinations: send one study per request",
            "names": 1},
        "modality_ct": {
            "what": "an image with Modality CT",
            "files": {"ct.dcm": part10(ct)},
            "expect": r"Modality 'CT', not MR",
            "names": 0},
        "blank_patient_ids": {
            "what": "two files with blank PatientIDs (equal) but different patient names",
            "files": blank,
            "expect": r"different PatientName from .* \(PatientID blank in both\); the files belong to more than one patient",
            "names": 1},
        "oblique_35": {
            "what": "a sagittal oblique 35 degrees off axis",
            "files": {"oblique.dcm": part10(slice_dataset(ImageOrientationPatient=oblique(35)))},
            "expect": r"oblique: 35 degrees off the sagittal plane \(sagittal obliques are accepted up to 30 degrees\)",
            "names": 0},
        "truncated_in_pixel_data": {
            "what": "a file cut short inside its pixel data",
            "files": {"cut.dcm": cut_pixels},
            "expect": r"the file holds \d+ \(truncated inside \(7FE0,0010\) PixelData",
            "names": 0},
        "truncated_in_header": {
            "what": "a file cut short inside an element before the pixel data",
            "files": {"cut.dcm": cut_header},
            "expect": r"file truncated inside \(0028,0030\) PixelSpacing: \d+ bytes declared, \d+ present",
            "names": 0},
        "more_series_than_classifier_batch": {
            "what": "nine sagittal series, more than the classifier's batch of eight",
            "files": many,
            "expect": r"9 sagittal T1/T2/STIR series selected, more than the 8 one patient may have \(serving.max_batch_classifier",
            "names": None},
    }


def write(out: Path) -> dict:
    """Write every case under ``out`` (a folder per case and cases.json); returns the manifest."""
    manifest = {}
    for name, case in cases().items():
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for file_name, data in case["files"].items():
            (folder / file_name).write_bytes(data)
        manifest[name] = {"what": case["what"], "expect": case["expect"], "names": case["names"]}
    (out / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    manifest = write(HERE)
    total = sum(f.stat().st_size for f in HERE.rglob("*.dcm"))
    print(f"wrote {len(manifest)} cases ({total} bytes) to {HERE}")


if __name__ == "__main__":
    main()
