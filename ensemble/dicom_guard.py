"""Checks on the raw bytes of a DICOM file, done before pydicom parses it or any pixel is decoded.

A request is hostile input until proven otherwise: one small file must not be able to make the
preprocess step inflate gigabytes, loop over billions of declared frames or hand a decoder a
codestream larger than its header says. The checks here read headers only:

* :func:`inflate_bounded`: a Deflated Explicit VR Little Endian file (PS3.5 A.5) is inflated
  with an output bound, and handed on as plain Explicit VR Little Endian bytes;
* :func:`truncation`: walks the element headers of a Part 10 file and names the element a
  file ends inside (pydicom reads a cut file without complaint, keeping the partial value);
* :func:`codestream_shape`: the (rows, columns, components) a compressed frame declares in
  its own header: the SOF segment of JPEG and JPEG-LS (ITU-T T.81 B.2.2, T.87), the SIZ
  segment of JPEG 2000 (ITU-T T.800 A.5.1, raw codestream or JP2 file), and for RLE
  (PS3.5 G.3.1) the segment count of its 64-byte header.

Every problem raises :class:`~wff.ensemble.types.InputError` naming the file, the element or
the limit, and what to do.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.datadict import keyword_for_tag
from pydicom.valuerep import VR

from wff.ensemble.types import InputError

PREAMBLE = 128
MAGIC = b"DICM"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
}
J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}
RLE_SYNTAX = "1.2.840.10008.1.2.5"
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2); the rest have a 2-byte length.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
PIXEL_DATA = (0x7FE0, 0x0010)
MAX_DEPTH = 16  # nested sequences: real MR objects use 3-4 levels
# Elements (all levels) a deflated data set may hold: an enhanced MR of 1,000 frames has about 40 per frame.
MAX_INFLATED_ELEMENTS = 200_000
# JPEG start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (T.81 Table B.1) and JPEG-LS SOF55 (T.87).
SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xDA)}  # TEM, RSTn, SOI, EOI: no length field
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
KNOWN_VRS = {vr.value.encode() for vr in VR}


def _tag_name(tag: tuple[int, int]) -> str:
    keyword = keyword_for_tag((tag[0] << 16) | tag[1]) or "private or unknown element"
    return f"({tag[0]:04X},{tag[1]:04X}) {keyword}"


def _file_meta(name: str, data: bytes) -> tuple[dict[tuple[int, int], tuple[int, int, int]], int, bool]:
    """File meta elements of a Part 10 file: {tag: (element offset, value offset, value length)}, the
    offset where the data set starts, and whether group 0002 is Explicit VR Little Endian as PS3.10
    requires. Like pydicom, a group whose first element has no valid VR is read as implicit VR."""
    start = PREAMBLE + len(MAGIC)
    explicit = data[start + 4 : start + 6] in KNOWN_VRS
    elements, pos = {}, start
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6] if explicit else b""
        if not explicit or vr in LONG_VRS:
            header = 8 if not explicit else 12
            if pos + header > len(data):
                raise InputError(f"{name}: file truncated inside the file meta information at {_tag_name((group, element))}; "
                                 "send the complete file")
            (length,) = struct.unpack_from("<L", data, pos + header - 4)
        else:
            header = 8
            (length,) = struct.unpack_from("<H", data, pos + 6)
        value = pos + header
        if length == UNDEFINED or value + length > len(data):
            raise InputError(f"{name}: truncated or malformed file meta information at {_tag_name((group, element))}; "
                             "send the complete file")
        elements[(group, element)] = (pos, value, length)
        pos = value + length
    return elements, pos, explicit


def _meta_and_syntax(name: str, data: bytes) -> tuple[dict, int, bool, str | None]:
    """:func:`_file_meta` and the TransferSyntaxUID it holds (None without one, or without a DICM preamble)."""
    if data[PREAMBLE : PREAMBLE + len(MAGIC)] != MAGIC:
        return {}, 0, False, None
    elements, start, explicit = _file_meta(name, data)
    found = elements.get((0x0002, 0x0010))
    if found is None:
        return elements, start, explicit, None
    _, value, length = found
    return elements, start, explicit, data[value : value + length].rstrip(b"\0 ").decode("ascii", "replace")


def inflate_bounded(name: str, data: bytes, budget: int) -> bytes:
    """A Deflated Explicit VR Little Endian file as the same file in Explicit VR Little Endian.

    The data set is inflated to at most ``budget`` bytes; a file that inflates beyond it raises
    InputError before more memory is spent. The inflated data set may hold at most
    ``MAX_INFLATED_ELEMENTS`` elements (walked before pydicom parses it, which costs it seconds
    per million): deflate shrinks a run of tiny elements a thousandfold. Files in any other
    transfer syntax come back as they are.
    """
    elements, start, explicit, syntax = _meta_and_syntax(name, data)
    if syntax != DEFLATED:
        return data
    if not explicit:  # pydicom would read it, and inflate without a bound
        raise InputError(f"{name}: deflated file whose file meta information is not Explicit VR Little Endian as PS3.10 "
                         "requires; the file is malformed, send it again from the scanner or PACS")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 specifies
    try:
        body = inflater.decompress(memoryview(data)[start:], budget + 1)
    except zlib.error as e:
        raise InputError(f"{name}: Deflated Explicit VR data set does not inflate ({e}); the file is damaged, send it again") from e
    if len(body) > budget:
        raise InputError(f"{name}: Deflated Explicit VR data set inflates beyond the {budget} bytes left of the request's "
                         "limit (serving.max_bytes); send the study uncompressed or split it")
    try:
        _walk(body, 0, len(body), False, True, 0, None, _Count(MAX_INFLATED_ELEMENTS))
    except _Truncated as e:
        raise InputError(f"{name}: Deflated Explicit VR data set is malformed ({e}); send the file again") from None
    except _TooMany:
        raise InputError(f"{name}: Deflated Explicit VR data set holds more than {MAX_INFLATED_ELEMENTS} elements, far more "
                         "than an MR image has; the file is malformed or crafted, send it uncompressed") from None
    ts_pos, ts_value, ts_length = elements[(0x0002, 0x0010)]
    uid = EXPLICIT_LE.encode() + b"\0"  # even length, NUL padded (PS3.5 9.1)
    meta = bytearray(data[:ts_pos + 6] + struct.pack("<H", len(uid)) + uid + data[ts_value + ts_length : start])
    if (0x0002, 0x0000) in elements:  # group length: the meta is now shorter by the UID difference
        _, gl_value, _ = elements[(0x0002, 0x0000)]
        (group_length,) = struct.unpack_from("<L", data, gl_value)
        struct.pack_into("<L", meta, gl_value, group_length + len(uid) - ts_length)
    return b"".join((meta, body))


def truncation(name: str, data: bytes) -> str | None:
    """Where a Part 10 file ends inside an element, e.g. "inside (7FE0,0010) PixelData: 4608 bytes
    declared, 4508 present"; None when every element is complete (or the layout is not walkable)."""
    _, start, _, syntax = _meta_and_syntax(name, data)
    if syntax is None:
        return None
    try:
        _walk(data, start, len(data), syntax == IMPLICIT_LE, syntax != EXPLICIT_BE, 0, None)
    except _Truncated as t:
        return str(t)
    return None


class _Truncated(Exception):
    pass


class _TooMany(Exception):
    pass


class _Count:
    """How many more elements a walk may visit."""

    def __init__(self, limit: int) -> None:
        self.left = limit


def _walk(data: bytes, pos: int, end: int, implicit: bool, little: bool, depth: int, stop: tuple[int, int] | None,
          count: _Count | None = None, items_are_datasets: bool = True) -> int:
    """Walk element headers from ``pos`` up to ``end`` or the delimiter ``stop`` without converting a value;
    returns the offset after it. Sequences and their items are descended (defined-length ones when the VR
    says SQ), the items of encapsulated pixel data are skipped as fragments. _TooMany once ``count`` runs out."""
    if depth > MAX_DEPTH:
        raise _Truncated(f"sequences nested deeper than {MAX_DEPTH} levels")
    order = "<" if little else ">"
    last = None
    while pos < end:
        if count is not None:
            count.left -= 1
            if count.left < 0:
                raise _TooMany
        if pos + 8 > len(data):
            after = f" after {_tag_name(last)}" if last else ""
            raise _Truncated(f"inside the header of the element{after}: {len(data) - pos} of 8 bytes present")
        group, element = struct.unpack_from(order + "HH", data, pos)
        tag = (group, element)
        if group == 0xFFFE or implicit:
            (length,) = struct.unpack_from(order + "L", data, pos + 4)
            value, vr = pos + 8, b"SQ" if group != 0xFFFE else b""
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > len(data):
                    raise _Truncated(f"inside the header of {_tag_name(tag)}")
                (length,) = struct.unpack_from(order + "L", data, pos + 8)
                value = pos + 12
            else:
                (length,) = struct.unpack_from(order + "H", data, pos + 6)
                value = pos + 8
        if stop is not None and tag == stop:
            return value
        if length == UNDEFINED:
            if tag == ITEM:  # an item of undefined length ends with an item delimiter
                pos = _walk(data, value, len(data), implicit, little, depth + 1, ITEM_END, count)
            elif vr == b"UN":  # undefined-length UN holds implicit VR little endian (PS3.5 6.2.2)
                pos = _walk(data, value, len(data), True, True, depth + 1, SEQUENCE_END, count)
            else:  # a sequence, or encapsulated pixel data (fragments): items until a sequence delimiter
                fragments = tag == PIXEL_DATA or vr in (b"OB", b"OW")
                pos = _walk(data, value, len(data), implicit, little, depth + 1, SEQUENCE_END, count, not fragments)
        else:
            if value + length > len(data):
                raise _Truncated(f"inside {_tag_name(tag)}: {length} bytes declared, {max(len(data) - value, 0)} present")
            if (vr == b"SQ" and not implicit) or (tag == ITEM and items_are_datasets and group == 0xFFFE):
                _walk(data, value, value + length, implicit, little, depth + 1, None, count)
            pos = value + length
        last = tag
    if stop is not None:
        raise _Truncated(f"before the end of a sequence or item (no {_tag_name(stop)} delimiter)")
    return pos


def codestream_shape(name: str, syntax: str, frame: bytes, bits_allocated: int) -> tuple[int, int, int]:
    """(rows, columns, components) a compressed frame declares in its own header.

    For RLE, whose header has no dimensions, the segment table is checked against
    ``bits_allocated`` instead and (0, 0, segments // bytes per sample) is returned.
    InputError when the header is missing or malformed.
    """
    if syntax in JPEG_SYNTAXES:
        return _jpeg_shape(name, frame)
    if syntax in J2K_SYNTAXES:
        return _j2k_shape(name, frame)
    if syntax == RLE_SYNTAX:
        return _rle_shape(name, frame, bits_allocated)
    raise InputError(f"{name}: transfer syntax {syntax} is not supported for pixel data; send uncompressed, JPEG, "
                     "JPEG-LS, JPEG 2000 or RLE DICOM")


def _jpeg_shape(name: str, frame: bytes) -> tuple[int, int, int]:
    if frame[:2] != b"\xff\xd8":
        raise InputError(f"{name}: JPEG frame does not start with an SOI marker; the pixel data is damaged")
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            break
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if marker in SOF_MARKERS:
            if pos + 10 > len(frame):
                break
            rows, cols = struct.unpack_from(">HH", frame, pos + 5)
            return rows, cols, frame[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise InputError(f"{name}: JPEG frame without a readable frame header (SOF); the pixel data is damaged")


def _j2k_shape(name: str, frame: bytes) -> tuple[int, int, int]:
    stream = frame
    if frame.startswith(JP2_SIGNATURE):  # a JP2 file: the codestream is in the 'jp2c' box
        stream, pos = b"", 0
        while pos + 8 <= len(frame):
            size, kind = struct.unpack_from(">L4s", frame, pos)
            header = 8
            if size == 1 and pos + 16 <= len(frame):
                (size,) = struct.unpack_from(">Q", frame, pos + 8)
                header = 16
            if kind == b"jp2c":
                stream = frame[pos + header :]
                break
            if size < header:
                break
            pos += size
    if stream[:4] != b"\xff\x4f\xff\x51" or len(stream) < 42:
        raise InputError(f"{name}: JPEG 2000 frame without SOC and SIZ markers; the pixel data is damaged")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">LLLL", stream, 8)
    (components,) = struct.unpack_from(">H", stream, 40)
    if xosiz > xsiz or yosiz > ysiz:
        raise InputError(f"{name}: JPEG 2000 SIZ marker declares an image offset beyond its size; the pixel data is damaged")
    return ysiz - yosiz, xsiz - xosiz, components


def _rle_shape(name: str, frame: bytes, bits_allocated: int) -> tuple[int, int, int]:
    if len(frame) < 64:
        raise InputError(f"{name}: RLE frame shorter than its 64-byte header; the pixel data is damaged")
    segments, *offsets = struct.unpack_from("<16L", frame, 0)
    per_sample = max(bits_allocated // 8, 1)
    used = offsets[:segments]
    if not 1 <= segments <= 15 or segments % per_sample or used[0] != 64 or used != sorted(used) or used[-1] >= len(frame):
        raise InputError(f"{name}: RLE header declares {segments} segments at offsets that do not fit a "
                         f"{bits_allocated}-bit frame of {len(frame)} bytes; the pixel data is damaged")
    return 0, 0, segments // per_sample
