"""Poisson noise and integer images.

``c_noise_image`` reproduces nanoBragg.c's noise image bit for bit (same generator,
same order of draws: every pixel of the ROI in scan order, masked ones included).
``poisson_image`` is the fast numpy alternative for datasets.
"""

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
    v = np.asarray(float_image, dtype=np.float32).astype(np.float64)
    test = v * scale + adc_offset
    test = np.clip(test, 0.0, 65535.0)
    out = np.floor((test + 0.5).astype(np.float32)).astype(np.uint16)
    return _outside_roi_zero(out, roi)


def c_pgm_image(float_image, roi, scale):
    """nanoBragg's 8-bit greymap: min(value * scale, 255) truncated; 0 outside the ROI."""
    v = np.asarray(float_image, dtype=np.float32).astype(np.float64) * scale
    v = np.minimum(v, 255.0)
    # the C casts a double to unsigned char; values are >= 0 for photon images
    out = np.trunc(v).astype(np.int64).astype(np.uint8)
    return _outside_roi_zero(out, roi)


def _outside_roi_zero(img, roi):
    xmin, xmax, ymin, ymax = roi
    keep = np.zeros(img.shape, dtype=bool)
    keep[max(ymin, 0):ymax + 1, max(xmin, 0):xmax + 1] = True
    img[~keep] = 0
    return img


def poisson_image(image, rng=None):
    """Fast Poisson counts for an image of expected photons (numpy's generator)."""
    rng = np.random.default_rng(rng)
    lam = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    return rng.poisson(lam)
