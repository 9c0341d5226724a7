"""SMV (ADSC) images: the 512-byte ``KEY=value;`` header nanoBragg writes and reads.

Reading follows nanoBragg.c's rules where they matter for parity: the file must start
with ``{\\nHEADER_BYT``; a keyword's value is taken from its *last* occurrence anywhere
in the header (so ``DISTANCE`` also matches inside ``CLOSE_DISTANCE``, as in the C).
Unlike the C, the data are byte-swapped when ``BYTE_ORDER`` differs from this machine's.
"""

import math
import re
import sys

import numpy as np

from ..errors import InputFileError
from ._text import read_bytes
from .atomic import atomic_write

_MAGIC = b"{\nHEADER_BYT"
_NUMBER = re.compile(r"\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)")


class SMVImage:
    """An SMV file: its header text, the header size and the uint16 data (slow, fast)."""

    def __init__(self, header, header_bytes, data, path=None):
        self.header = header
        self.header_bytes = header_bytes
        self.data = data
        self.path = path

    def value(self, keyword):
        """Float value of ``keyword`` with nanoBragg.c's ``ValueOf`` semantics, or NaN."""
        return header_value(self.header, keyword)


def header_value(header, keyword):
    """Value after the last occurrence of ``keyword`` (C ``atof`` of the text after '=')."""
    pos = header.rfind(keyword)
    if pos < 0:
        return math.nan
    eq = header.find("=", pos + len(keyword))
    if eq < 0:
        return 0.0
    m = _NUMBER.match(header, eq + 1)
    if not m:
        return 0.0
    return float(m.group(1))


def read_smv(path, what="SMV", header_only=False):
    """Read an SMV file; errors name the file and what is wrong.  With ``header_only``
    the pixel data are neither needed nor read (``data`` is None)."""
    raw = read_bytes(path, what)
    if len(raw) < 512 or not raw.startswith(_MAGIC):
        raise InputFileError(f"{what} file {path!r} is not an SMV image (no '{{ HEADER_BYTES=' header)")
    head512 = raw[:512].decode("latin-1")
    nbytes = header_value(head512, "HEADER_BYTES")
    if not math.isfinite(nbytes) or nbytes < 1 or nbytes > len(raw) or nbytes != int(nbytes):
        raise InputFileError(f"{what} file {path!r}: bad HEADER_BYTES value {nbytes:g}")
    nbytes = int(nbytes)
    header = raw[:nbytes].decode("latin-1")
    width = header_value(header, "SIZE1")
    height = header_value(header, "SIZE2")
    if not (width == width) or width == 0:
        dim = header_value(header, "DETECTOR_DIMENSIONS")
        width = height = dim
    for name, v in (("SIZE1", width), ("SIZE2", height)):
        if not math.isfinite(v) or v < 1 or v != int(v) or v > 1e6:
            raise InputFileError(f"{what} file {path!r}: bad {name} value {v:g}")
    width, height = int(width), int(height)
    if header_only:
        image = SMVImage(header, nbytes, None, path=str(path))
        image.width, image.height, image.raw_header = width, height, raw[:nbytes]
        return image
    need = 2 * width * height
    body = raw[nbytes:]
    if len(body) < need:
        raise InputFileError(
            f"{what} file {path!r}: data hold {len(body) // 2} pixels, fewer than SIZE1*SIZE2 = {width}*{height}")
    order = "<"
    pos = header.rfind("BYTE_ORDER=")
    if pos >= 0 and header[pos + 11:pos + 21].startswith("big_endian"):
        order = ">"
    data = np.frombuffer(body[:need], dtype=order + "u2").reshape(height, width).astype(np.uint16)
    return SMVImage(header, nbytes, data, path=str(path))


def _byte_order():
    return "little_endian" if sys.byteorder == "little" else "big_endian"


def smv_header(fields, noise=False):
    """The header text nanoBragg.c writes, from the resolved geometry ``fields``.

    ``fields`` is a mapping with fpixels, spixels, pixel_m, distance_m, wavelength_m,
    Xbeam, Ybeam, Fbeam, Sbeam, detsize_s, dials_origin (mm), ORGX, ORGY,
    close_distance_m, phi0_deg, osc_deg, twotheta_deg.  ``noise`` selects the
    noise-image variant (the C writes DENZO_X_BEAM with ``+0.0*pixel`` there).
    """
    f = fields
    px = f["pixel_m"]
    sign = 1.0 if noise else -1.0
    do = f["dials_origin"]
    text = (
        "{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=%s;\nTYPE=unsigned_short;\n" % _byte_order()
        + "SIZE1=%d;\nSIZE2=%d;\nPIXEL_SIZE=%g;\nDISTANCE=%g;\n" % (f["fpixels"], f["spixels"], px * 1000.0, f["distance_m"] * 1000.0)
        + "WAVELENGTH=%g;\n" % (f["wavelength_m"] * 1e10)
        + "BEAM_CENTER_X=%g;\nBEAM_CENTER_Y=%g;\n" % (f["Xbeam"] * 1000.0, f["Ybeam"] * 1000)
        + "ADXV_CENTER_X=%g;\nADXV_CENTER_Y=%g;\n" % (f["Fbeam"] * 1000.0, (f["detsize_s"] - f["Sbeam"]) * 1000)
        + "MOSFLM_CENTER_X=%g;\nMOSFLM_CENTER_Y=%g;\n" % ((f["Sbeam"] - 0.5 * px) * 1000.0, (f["Fbeam"] - 0.5 * px) * 1000)
        + "DENZO_X_BEAM=%g;\nDENZO_Y_BEAM=%g;\n" % ((f["Sbeam"] + sign * 0.0 * px) * 1000.0, (f["Fbeam"] + sign * 0.0 * px) * 1000)
        + "DIALS_ORIGIN=%g,%g,%g\n" % (do[0], do[1], do[2])
        + "XDS_ORGX=%g;\nXDS_ORGY=%g;\n" % (f["ORGX"], f["ORGY"])
        + "CLOSE_DISTANCE=%g;\n" % (f["close_distance_m"] * 1000.0)
        + "PHI=%g;\nOSC_START=%g;\nOSC_RANGE=%g;\n" % (f["phi0_deg"], f["phi0_deg"], f["osc_deg"])
        + "TWOTHETA=%g;\n" % f["twotheta_deg"]
        + "DETECTOR_SN=000;\nBEAMLINE=fake;\n}\f"
    )
    raw = text.encode("latin-1")
    if len(raw) < 512:
        raw = raw + b" " * (512 - len(raw))
    return raw


def write_smv(path, data, fields, noise=False):
    """Write uint16 ``data`` (slow, fast) with nanoBragg's header, atomically."""
    data = np.ascontiguousarray(data, dtype="<u2")
    atomic_write(path, smv_header(fields, noise=noise), data)


def noisify_header(xpixels, ypixels, pixel_mm, distance_mm, wavelength, beam_x_mm, beam_y_mm, phi, osc, bits=16):
    """The 512-byte header noisify.c writes (fewer fields than nanoBragg's; the beam
    centre and geometry as given on its command line)."""
    kind = "unsigned_short" if bits == 16 else "long_integer"
    text = ("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=%s;\nTYPE=%s;\n" % (_byte_order(), kind)
            + "SIZE1=%d;\nSIZE2=%d;\nPIXEL_SIZE=%g;\nDISTANCE=%g;\n" % (xpixels, ypixels, pixel_mm, distance_mm)
            + "WAVELENGTH=%g;\nBEAM_CENTER_X=%g;\nBEAM_CENTER_Y=%g;\n" % (wavelength, beam_x_mm, beam_y_mm)
            + "PHI=%g;\nOSC_START=%g;\nOSC_RANGE=%g;\n" % (phi, phi, osc)
            + "DETECTOR_SN=000;\nBEAMLINE=fake;\n}\f")
    raw = text.encode("latin-1")
    return raw + b" " * max(0, 512 - len(raw))


def write_smv_raw(path, header, data):
    """Write ``header`` (bytes) then ``data`` (uint16 or uint32, little-endian), atomically."""
    data = np.ascontiguousarray(data)
    data = data.astype("<u4" if data.dtype.itemsize == 4 else "<u2", copy=False)
    atomic_write(path, header, data)
