"""Poisson noise and integer images.

``c_noise_image`` reproduces nanoBragg.c's noise image bit for bit (same generator,
same order of draws: every pixel of the ROI in scan order, masked ones included).
``poisson_image`` is the fast numpy alternative for datasets.
"""

import math

import numpy as np
from . import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .rng import NRGenerator, poidev


@njit(cache=True)
def _noise_loop(values, roi, idum, state, fstate, adc, out):
    spixels, fpixels = values.shape
    xmin, xmax, ymin, ymax = roi[0], roi[1], roi[2], roi[3]
    total = 0.0
    overloads = 0
    for s in range(spixels):
        for f in range(fpixels):
            if f < xmin or f > xmax or s < ymin or s > ymax:
                continue
            test = np.float64(poidev(values[s, f], idum, state, fstate))
            total += test
            test += adc
            if test > 65535.0:
                test = 65535.0
                overloads += 1
            out[s, f] = np.uint16(test)
    return total, overloads


def c_noise_image(float_image, roi, seed, adc_offset=40.0, generator=None):
    """nanoBragg's noise image from a float32 image.

    Parameters
    ----------
    float_image : photons per pixel (converted to float32 as the C stores them)
    roi : (xmin, xmax, ymin, ymax), inclusive
    seed : the seed as nanoBragg stores it (``-atoi(-seed value)``)

    Returns (uint16 image, total photons, overload count).
    """
    gen = generator or NRGenerator()
    values = np.ascontiguousarray(float_image, dtype=np.float32)
    out = np.zeros(values.shape, dtype=np.uint16)
    idum = gen.seed_cell(seed)
    total, overloads = _noise_loop(values, np.asarray(roi, dtype=np.int64), idum, gen.state, gen.fstate,
                                   float(adc_offset), out)
    return out, total, overloads


def intfile_scale(given, max_I):
    """The SMV intfile's scale as nanoBragg and nonBragg choose it: the one given
    (``-scale``) if positive, else 55000 / max_I (1 when max_I is not positive)."""
    if given > 0.0:
        return given
    return 55000.0 / max_I if max_I > 0.0 else 1.0


def c_int_image(float_image, roi, scale, adc_offset):
    """nanoBragg's noiseless SMV image: round(value * scale + adc) clipped to uint16.

    Pixels outside the ROI are 0.  ``float_image`` is taken as float32, as the C stores it.
    """
    img = np.ascontiguousarray(float_image, dtype=np.float32)
    out = np.empty(img.shape, np.uint16)
    _int_pixels(img, _roi_bounds(roi), float(scale), float(adc_offset), out)
    return out


def c_pgm_image(float_image, roi, scale):
    """nanoBragg's 8-bit greymap: min(value * scale, 255) truncated; 0 outside the ROI."""
    img = np.ascontiguousarray(float_image, dtype=np.float32)
    out = np.empty(img.shape, np.uint8)
    _pgm_pixels(img, _roi_bounds(roi), float(scale), out)
    return out


def _roi_bounds(roi):
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    return np.array([max(xmin, 0), xmax, max(ymin, 0), ymax], dtype=np.int64)


# One pass over the pixels, no temporaries: a 2048x2048 image's int file took a quarter
# of a second in numpy's chain of whole-image arrays in a fresh process.

@njit(cache=True)
def _int_pixels(img, roi, scale, adc, out):
    # the C: test = value * scale + adc, clipped to [0, 65535], floorf(test + 0.5)
    for s in range(img.shape[0]):
        for f in range(img.shape[1]):
            if f < roi[0] or f > roi[1] or s < roi[2] or s > roi[3]:
                out[s, f] = 0
                continue
            test = np.float64(img[s, f]) * scale + adc
            if test > 65535.0:
                test = 65535.0
            if not test >= 0.0:            # (below zero, or NaN: 0)
                test = 0.0
            out[s, f] = np.uint16(math.floor(np.float32(test + 0.5)))


@njit(cache=True)
def _pgm_pixels(img, roi, scale, out):
    # the C casts min(value * scale, 255) to unsigned char: truncation, modulo 256 below
    # zero; NaN and -inf give 0
    for s in range(img.shape[0]):
        for f in range(img.shape[1]):
            if f < roi[0] or f > roi[1] or s < roi[2] or s > roi[3]:
                out[s, f] = 0
                continue
            v = np.float64(img[s, f]) * scale
            if v > 255.0:
                v = 255.0
            if v != v or v < -9.0e18:
                out[s, f] = 0
            else:
                out[s, f] = np.uint8(np.int64(v) & 255)


def poisson_image(image, rng=None):
    """Fast Poisson counts for an image of expected photons (numpy's generator)."""
    rng = np.random.default_rng(rng)
    lam = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    return rng.poisson(lam)
