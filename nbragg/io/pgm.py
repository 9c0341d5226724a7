"""PGM (8-bit greymap) images as nanoBragg writes them."""

import numpy as np

from .atomic import atomic_write


def pgm_bytes(image8, scale):
    h, w = image8.shape
    header = b"P5\n%d %d\n" % (w, h) + ("# pixels scaled by %g\n" % scale).encode() + b"255\n"
    return header + np.ascontiguousarray(image8, dtype=np.uint8).tobytes()


def write_pgm(path, image8, scale):
    atomic_write(path, pgm_bytes(image8, scale))


def write_float(path, image):
    """Raw little-endian float32, fast index fastest (nanoBragg's -floatfile)."""
    atomic_write(path, np.ascontiguousarray(image, dtype="<f4"))
