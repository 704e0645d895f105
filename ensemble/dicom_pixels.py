"""Pixel data of one parsed DICOM file: checked on its headers, then decoded to modality values.

Before anything is decoded, NumberOfFrames is checked against the native pixel data the file
holds, and every compressed frame's own header (found as the decoder will find it, the Extended
Offset Table included) against Rows, Columns and SamplesPerPixel
(:func:`wff.ensemble.dicom_guard.codestream_shape`): a decoder allocates what the codestream
declares, not what the DICOM header says. Problems raise InputError naming the file.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut

from wff.ensemble import dicom_guard
from wff.ensemble.dicom_tags import attribute, header_int, number
from wff.ensemble.types import InputError


def declared_frames(name: str, ds: Dataset) -> int:
    """NumberOfFrames, checked against the pixel data the file holds (native) before anything loops over it."""
    frames = header_int(name, ds, "NumberOfFrames", 1)
    if frames < 1:
        raise InputError(f"{name}: NumberOfFrames {frames} is not a positive number of frames; the header is malformed")
    if "PixelData" in ds and not is_encapsulated(ds):
        rows, cols = header_int(name, ds, "Rows", 0), header_int(name, ds, "Columns", 0)
        samples = header_int(name, ds, "SamplesPerPixel", 1)
        bits = header_int(name, ds, "BitsAllocated", 16)
        need = frames * rows * cols * samples * bits // 8
        have = len(ds.PixelData)
        if need > have:
            what = (f"NumberOfFrames {frames} x Rows {rows} x Columns {cols} x {bits} bits needs {need} bytes of pixel data"
                    if frames > 1 else f"Rows {rows} x Columns {cols} x {bits} bits needs {need} bytes of pixel data")
            raise InputError(f"{name}: {what}, the file holds {have} (truncated inside (7FE0,0010) PixelData, "
                             "or a malformed header); send the complete file again")
        if need and have > 2 * need:  # padding is a few bytes; more would be decoded as frames the header does not declare
            raise InputError(f"{name}: PixelData holds {have} bytes, more than twice the {need} that NumberOfFrames, Rows, "
                             "Columns and BitsAllocated declare; the header is malformed, send the file again")
    return frames


def is_encapsulated(ds: Dataset) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return bool(syntax is not None and getattr(syntax, "is_encapsulated", False))


def _stored_range(name: str, ds: Dataset) -> np.ndarray:
    bits = header_int(name, ds, "BitsStored", header_int(name, ds, "BitsAllocated", 16))
    if header_int(name, ds, "PixelRepresentation", 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return np.array([0, 2**bits - 1])


def check_codestreams(name: str, ds: Dataset, frames: int) -> None:
    """Every compressed frame's own header against Rows, Columns and SamplesPerPixel, before decoding.

    A decoder allocates what the codestream declares, not what the DICOM header says, so a frame
    that declares other dimensions is refused here; so is pixel data with fewer frames than
    NumberOfFrames.
    """
    syntax = str(ds.file_meta.TransferSyntaxUID)
    rows, cols = header_int(name, ds, "Rows", 0), header_int(name, ds, "Columns", 0)
    samples, bits = header_int(name, ds, "SamplesPerPixel", 1), header_int(name, ds, "BitsAllocated", 16)
    found = 0
    try:
        # the frames the decoder will read: pydicom follows the Extended Offset Table when the file has one
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths) if "ExtendedOffsetTable" in ds else None
        for found, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=extended), start=1):
            c_rows, c_cols, c_samples = dicom_guard.codestream_shape(f"{name} frame {found}", syntax, frame, bits)
            if syntax == dicom_guard.RLE_SYNTAX:
                c_rows, c_cols = rows, cols  # RLE carries no dimensions; its segment count was checked
            if (c_rows, c_cols, c_samples) != (rows, cols, samples):
                raise InputError(
                    f"{name} frame {found}: the compressed frame declares {c_rows}x{c_cols} pixels with {c_samples} "
                    f"component(s), the header (Rows, Columns, SamplesPerPixel) {rows}x{cols} with {samples}; "
                    "refused before decoding: the file is damaged or crafted, send it again from the scanner or PACS")
            if found == frames:
                break
    except InputError:
        raise
    except Exception as e:  # malformed item tags or offsets in the encapsulated pixel data
        raise InputError(f"{name}: encapsulated pixel data is malformed ({type(e).__name__}: {e}); send the file again") from e
    if found < frames:
        raise InputError(f"{name}: NumberOfFrames {frames} but the pixel data holds {found} frame(s); the file is truncated or malformed")


def decode_pixels(name: str, ds: Dataset, frames: int | None = None) -> np.ndarray:
    """(frames, rows, cols) float32 modality values, MONOCHROME1 inverted; ``frames``: NumberOfFrames if already checked."""
    frames = declared_frames(name, ds) if frames is None else frames
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = header_int(name, ds, "SamplesPerPixel", 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise InputError(f"{name}: expected grey-level MR pixels, got PhotometricInterpretation "
                         f"{str(ds.get('PhotometricInterpretation'))[:16]!r} with {samples} sample(s) per pixel")
    if is_encapsulated(ds):
        check_codestreams(name, ds, frames)
    try:
        stored = ds.pixel_array
    except Exception as e:  # missing decoder, truncated or inconsistent pixel data; cause chained
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        raise InputError(
            f"{name}: pixel data cannot be decoded ({syntax_name}: {type(e).__name__}); the file may be "
            "truncated or use a compression without an installed decoder: send uncompressed DICOM"
        ) from e
    if stored.ndim != (2 if frames == 1 else 3):
        raise InputError(f"{name}: expected grey-level MR pixels, got {ds.get('PhotometricInterpretation')} array of shape {stored.shape}")
    stored = stored.reshape(frames, *stored.shape[-2:])
    out = np.empty(stored.shape, np.float32)
    for f in range(frames):
        lut = _modality_lut(name, ds, f)
        try:
            out[f] = apply_modality_lut(stored[f], lut)
            if photometric == "MONOCHROME1":
                lo, hi = apply_modality_lut(_stored_range(name, ds), lut).astype(np.float64)
                out[f] = np.float32(lo + hi) - out[f]
        except InputError:
            raise
        except Exception as e:  # a malformed Modality LUT Sequence; cause chained
            raise InputError(f"{name}: the modality LUT cannot be applied ({type(e).__name__}); the header is malformed") from e
    return out


def _modality_lut(name: str, ds: Dataset, frame: int) -> Dataset:
    """What apply_modality_lut reads for one frame: the file's Modality LUT Sequence, else its rescale as
    numbers (top level, else the frame's functional groups; slope 1 and intercept 0 where absent)."""
    if "ModalityLUTSequence" in ds:
        return ds
    lut = Dataset()
    values = {k: attribute(ds, k, frame) for k in ("RescaleSlope", "RescaleIntercept")}
    if all(v is None for v in values.values()):
        return lut
    for keyword, value in values.items():
        parsed = number(value) if value is not None else (1.0 if keyword == "RescaleSlope" else 0.0)
        if parsed is None or not math.isfinite(parsed):
            raise InputError(f"{name}: {keyword} {str(value)[:16]!r} is not a number; the header is malformed")
        setattr(lut, keyword, parsed)
    return lut
