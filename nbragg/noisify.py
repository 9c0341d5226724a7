"""The detector's response as noisify.c (nanoBragg suite) computes it, bit for bit.

An image of expected photons becomes pixel values: beam flicker and calibration error
(Gaussian factors per pixel), Poisson counting, a point-spread function (Gaussian or
fiber-optic), gain, ADC offset and read-out noise, clipped to 16 or 32 bits.  The random
numbers come from :mod:`nbragg.rng`, whose generator state is shared by every seed as in
the C, so a run with the same seed gives the same bytes.

Where nbragg departs from the C on purpose (each a defect of the C, documented in the
README): a negative pixel value is clipped to 0 instead of wrapping around in the
integer cast, and a pixel whose automatic PSF radius is undefined (a Gaussian PSF on a
pixel under 0.01 photons, which only ``-nonoise`` allows) keeps no light, as in the C,
but without reading outside the kernel.
"""

from dataclasses import dataclass

import math

import numpy as np
from . import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .rng import NRGenerator, gaussdev, poidev

UNKNOWN, GAUSS, FIBER = 0, 1, 2
PSF_TYPES = {"gauss": GAUSS, "fiber": FIBER}
G_PER_FWHM = 0.652383013252053          # fiber PSF: g = this * fwhm
PHOTON_LOSS_FACTOR = 10.0                # auto radius: light below sqrt(I)/10 may be lost
R_E_SQR = 7.94079248018965e-30           # Thomson cross section (m^2)
UNIT_FLUENCE = 125932015286227086360700780544.0   # fluence * r_e^2 = 1: the input is photons


@njit(cache=True)
def _gauss_integral(x, y):
    # the integral of a unit-volume 2D Gaussian of FWHM 1 from the origin to (x, y)
    return 0.125 * (math.erf(2 * x * math.sqrt(math.log(2))) * math.erf(y * math.sqrt(math.log(16)))
                    * math.sqrt(math.log(16) / math.log(2)))


@njit(cache=True)
def _fiber_integral(x, y, g):
    return math.atan((x * y) / (g * math.sqrt(g * g + x * x + y * y))) / 2.0 / math.pi


@njit(cache=True)
def _pixel_weight(kind, dx, dy, fwhm_pixels, g):
    """The PSF's integral over pixel (dx, dy) (four corners, in the C's order)."""
    if kind == GAUSS:
        x = dx / fwhm_pixels
        y = dy / fwhm_pixels
        p = 1.0 / fwhm_pixels
        return (_gauss_integral(x + p / 2.0, y + p / 2.0) - _gauss_integral(x + p / 2.0, y - p / 2.0)
                - _gauss_integral(x - p / 2.0, y + p / 2.0) + _gauss_integral(x - p / 2.0, y - p / 2.0))
    x = float(dx)
    y = float(dy)
    return (_fiber_integral(x + 0.5, y + 0.5, g) - _fiber_integral(x + 0.5, y - 0.5, g)
            - _fiber_integral(x - 0.5, y + 0.5, g) + _fiber_integral(x - 0.5, y - 0.5, g))


@njit(cache=True)
def _auto_radius(kind, v, fwhm_pixels, g, per_pixel):
    """1 + ceil(the radius outside which fewer than sqrt(v)/10 of v's photons fall), or
    -1 where it is undefined (a Gaussian on v < 0.01, where the C's radius is garbage).
    The C spells ln 16 differently for the whole image and for one pixel; so does this."""
    lost = math.sqrt(v) / PHOTON_LOSS_FACTOR
    if kind == GAUSS:
        if per_pixel:
            arg = -math.log(lost / v) / math.log(16)
        else:
            arg = -math.log(lost / v) / math.log(4) / 2
        if not arg >= 0.0:
            return -1
        r = 1.0 + math.ceil(math.sqrt(arg) * fwhm_pixels)
    else:
        r = 1.0 + math.ceil(g * (v / lost))
    if r > 2147483647.0:
        r = 2147483647.0
    return int(r)


@njit(cache=True)
def _apply_psf(image, xpixels, ypixels, kind, fwhm_pixels, user_radius, out):
    """noisify.c's ``apply_psf`` on float32 ``image`` (flat, raster order) into ``out``
    (float32, pixels + 10 entries, zeroed).  Returns (maximum input, automatic radius or
    0, photons added back, pixels whose light was dropped)."""
    g = fwhm_pixels * G_PER_FWHM
    pixels = xpixels * ypixels
    maxwidth = max(xpixels, ypixels)
    radius = user_radius
    max_I = 0.0
    auto = 0
    if radius <= 0:
        for i in range(pixels):
            if max_I < image[i]:
                max_I = image[i]
        if max_I <= 0.0:
            return max_I, 0, 0.0, 0
        radius = _auto_radius(kind, max_I, fwhm_pixels, g, False)
        auto = radius           # (reported before the C's corrections, as it prints it)
        if radius <= 0:
            radius = 1
    if radius > maxwidth:
        radius = maxwidth
    size = 2 * radius + 1
    kernel = np.zeros(size * size)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            kernel[size * (size // 2 + dy) + size // 2 + dx] = _pixel_weight(kind, dx, dy, fwhm_pixels, g)
    total_lost = 0.0
    dropped = 0
    for i in range(pixels):
        v = image[i]
        if v <= 0.0:
            continue
        x0 = i % xpixels
        y0 = (i - x0) // xpixels
        if user_radius != 0:
            r = user_radius
        else:
            r = _auto_radius(kind, np.float64(v), fwhm_pixels, g, True)
            if r < 0:
                dropped += 1
                continue
        if r == 0:
            r = 1
        if r > maxwidth:
            r = maxwidth
        if r > radius:      # (the C would read outside its kernel; cannot happen for r from v <= max)
            r = radius
        if kind == GAUSS:
            rsq = r / fwhm_pixels
            rsq = rsq * rsq
            total_lost += v * math.exp(-math.log(16) * rsq)
        else:
            total_lost += v * g / math.sqrt(g * g + r * r)
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                w = kernel[size * (size // 2 + dy) + size // 2 + dx]
                if w == 0.0:
                    continue
                if dx * dx + dy * dy > r * r:
                    continue
                x = x0 + dx
                y = y0 + dy
                # the C's bounds: x == xpixels wraps to the next row's first pixel, and
                # j == pixels lands in padding
                if x < 0 or x > xpixels or y < 0 or y > ypixels:
                    continue
                j = y * xpixels + x
                if j < 0 or j > pixels:
                    continue
                out[j] = np.float32(out[j] + v * w)
    share = total_lost / pixels
    for i in range(pixels):
        out[i] = np.float32(out[i] + share)
    return max_I, auto, total_lost, dropped


@dataclass
class PSFResult:
    image: np.ndarray           # float32 (ypixels, xpixels)
    max_input: float            # the maximum input pixel (automatic radius only, else 0)
    auto_radius: int            # the automatic radius (0 when one was given or nothing to blur)
    lost_added_back: float      # photons outside the radius, spread evenly over the image
    dropped_pixels: int         # pixels whose automatic radius is undefined (light dropped)


def apply_psf(image, kind, fwhm_pixels, radius=0):
    """Blur an image of photons with noisify.c's point-spread function.

    ``kind`` is "gauss" or "fiber"; ``fwhm_pixels`` the full width at half maximum in
    pixels; ``radius`` the kernel radius in pixels (0: chosen per pixel from its value,
    as the C does).  The image is taken as float32 (raster order, fast index last)."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    ypixels, xpixels = img.shape
    out = np.zeros(img.size + 10, dtype=np.float32)
    max_I, auto, lost, dropped = _apply_psf(img.ravel(), xpixels, ypixels, PSF_TYPES[kind], float(fwhm_pixels),
                                            int(radius), out)
    return PSFResult(out[:img.size].reshape(img.shape), float(max_I), int(auto), float(lost), int(dropped))


@njit(cache=True)
def _count_photons(photons, flicker, calibration, seed, calib_seed, state, fstate, out):
    """Flicker and calibration factors, then Poisson counts, pixel by pixel in the C's
    order of draws; returns the sum of the counts."""
    total = 0.0
    for i in range(photons.size):
        p = np.float64(photons[i])
        if flicker > 0.0:
            p *= 1.0 + flicker * np.float64(gaussdev(seed, state, fstate))
        if calibration > 0.0:
            p *= 1.0 + calibration * np.float64(gaussdev(calib_seed, state, fstate))
        out[i] = poidev(np.float32(p), seed, state, fstate)
        total += out[i]
    return total


@njit(cache=True)
def _to_adu(photons, gain, adc, readout, bits, noiseless, seed, state, fstate, out16, out32):
    """Pixel values: photons * gain + adc (+ read-out noise), clipped at 2^31 - 1 for the
    32-bit image and at 65535 for the 16-bit one, truncated; negative values clipped to
    0.  The C's noiseless image clips at 65535 before it makes either.  Returns (sum of
    photons, overloads at the chosen bit depth, pixels clipped at 0)."""
    total = 0.0
    overloads = 0
    negative = 0
    for i in range(photons.size):
        total += photons[i]
        adu = np.float64(photons[i]) * gain + adc
        if readout > 0.0:
            adu += readout * np.float64(gaussdev(seed, state, fstate))
        if adu > 2147483647.0:
            adu = 2147483647.0
            if bits == 32:
                overloads += 1
        if adu < 0.0:
            adu = 0.0
            negative += 1
        if noiseless and adu > 65535.0:
            adu = 65535.0
        out32[i] = np.uint32(adu)
        if adu > 65535.0:
            adu = 65535.0
            if bits == 16:
                overloads += 1
        out16[i] = np.uint16(adu)
    return total, overloads, negative


@dataclass
class NoisifyResult:
    """What noisify makes from an image of expected photons."""

    photons: np.ndarray         # float32: the input on the photon scale (blurred with -nonoise)
    int16: np.ndarray           # the noiseless pixel values, 16 and 32 bits
    int32: np.ndarray
    noise16: np.ndarray = None  # the noisy pixel values (None with calculate_noise=False)
    noise32: np.ndarray = None
    counts: np.ndarray = None   # float32 photon counts after the PSF, before gain and read-out
    photons_before_psf: float = 0.0
    photons_on_noise_image: float = 0.0
    overloads: int = 0
    negative_clipped: int = 0
    psf: PSFResult = None       # the PSF run (on the counts; on the photons with calculate_noise=False)


def noisify(image, scale=1.0, fluence=UNIT_FLUENCE, gain=1.0, adc=40.0, readout=0.0, flicker=0.0,
            calibration=0.03, psf=None, psf_fwhm_pixels=0.0, psf_radius=0, bits=16, seed=-1,
            calib_seed=123456789, calculate_noise=True, generator=None):
    """noisify.c's pipeline on ``image`` (expected photons, (ypixels, xpixels)).

    Seeds are given as the C holds them (``-seed N`` is held as -N); the defaults are the
    C's, except the noise seed, which the C takes from the clock.  ``generator`` (an
    :class:`~nbragg.rng.NRGenerator`) carries the random state shared by all streams."""
    gen = generator or NRGenerator()
    img = np.ascontiguousarray(image, dtype=np.float32)
    shape = img.shape
    photons = (((fluence * R_E_SQR) * scale) * img.astype(np.float64)).astype(np.float32).ravel()
    if not calculate_noise:
        flicker = calibration = readout = 0.0
    psf_run = None
    if not calculate_noise and psf is not None and psf_fwhm_pixels > 0.0:
        psf_run = apply_psf(photons.reshape(shape), psf, psf_fwhm_pixels, psf_radius)
        photons = psf_run.image.ravel()
    i16 = np.zeros(photons.size, dtype=np.uint16)
    i32 = np.zeros(photons.size, dtype=np.uint32)
    no_rng = np.zeros(1, dtype=np.int64)
    _, _, negative = _to_adu(photons, float(gain), float(adc), 0.0, bits, True, no_rng, gen.state, gen.fstate, i16, i32)
    out = NoisifyResult(photons=photons.reshape(shape), int16=i16.reshape(shape), int32=i32.reshape(shape),
                        negative_clipped=negative, psf=psf_run)
    if not calculate_noise:
        return out
    seed_cell = gen.seed_cell(seed)
    calib_cell = gen.seed_cell(calib_seed)
    counts = np.zeros(photons.size, dtype=np.float32)
    out.photons_before_psf = _count_photons(photons, float(flicker), float(calibration), seed_cell, calib_cell,
                                            gen.state, gen.fstate, counts)
    if psf is not None and psf_fwhm_pixels > 0.0:
        out.psf = apply_psf(counts.reshape(shape), psf, psf_fwhm_pixels, psf_radius)
        counts = out.psf.image.ravel()
    n16 = np.zeros(photons.size, dtype=np.uint16)
    n32 = np.zeros(photons.size, dtype=np.uint32)
    total, overloads, negative = _to_adu(counts, float(gain), float(adc), float(readout), bits, False, seed_cell, gen.state,
                                         gen.fstate, n16, n32)
    out.noise16 = n16.reshape(shape)
    out.noise32 = n32.reshape(shape)
    out.counts = counts.reshape(shape)
    out.photons_on_noise_image = total
    out.overloads = overloads
    out.negative_clipped += negative
    return out
