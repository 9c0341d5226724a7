"""The detector's response in the Python API: from expected photons to pixel values.

:class:`~nbragg.experiment.Response` describes it; :func:`respond` applies it to an image
(one panel, or each panel of a ``(panel, slow, fast)`` stack), in this order:

1. ``scale`` (photons per input unit);
2. beam flicker: one Gaussian factor ``1 + flicker * N(0, 1)`` for the whole image (a
   shot's intensity), drawn from ``seed``;
3. calibration error: a fixed per-pixel factor ``1 + calibration * N(0, 1)`` drawn from
   ``calibration_seed`` alone, so the pattern is the same for every image, as a real
   detector's is;
4. Poisson counts (``noise=True``), from ``seed``;
5. the point-spread function, normalised to 1 (light that leaves the detector is lost):
   ``"gauss"`` the pixel integral of a 2D Gaussian of ``psf_fwhm`` microns (separable:
   two 1D passes), ``"fiber"`` noisify's fiber-optic profile (an FFT convolution);
6. ``gain`` (ADU per photon), ``adc`` offset and Gaussian read-out noise of ``readout``
   ADU rms, from ``seed``;
7. rounding to the nearest integer, clipped to [0, 2**bits - 1]; pixels at the top are
   overloads.

This is the physical model a user expects.  noisify.c (``nbragg-noisify`` reproduces it
bit for bit) differs: its flicker is an independent factor per pixel, its calibration
pattern shares its random stream with the noise (so it changes from shot to shot), its
PSF is cut to a disc with the lost light spread evenly over the image, and it truncates
pixel values instead of rounding them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

SQRT_LN16 = math.sqrt(math.log(16.0))
MAX_PHOTONS = 1e15      # per pixel: beyond, Poisson sampling and 64-bit counts lose meaning


@dataclass
class Detected:
    """What the detector records: ``adu`` (uint16 or uint32 pixel values), ``counts``
    (float photons after noise and the PSF, before gain), ``overloads`` (pixels at the
    top of the range) and ``underloads`` (pixels clipped at 0)."""

    adu: np.ndarray
    counts: np.ndarray
    overloads: int
    underloads: int


def gauss_weights(fwhm_pixels, radius):
    """1D pixel integrals of a unit Gaussian of that FWHM, for offsets -radius..radius,
    normalised to sum 1 (the 2D Gaussian's pixel integral is their outer product)."""
    from scipy.special import erf
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    w = 0.5 * (erf(SQRT_LN16 * (d + 0.5) / fwhm_pixels) - erf(SQRT_LN16 * (d - 0.5) / fwhm_pixels))
    return w / w.sum()


def fiber_kernel(fwhm_pixels, radius):
    """noisify's fiber-optic PSF integrated over pixels, offsets -radius..radius on both
    axes.  Not renormalised: the light beyond the radius (a fraction g / sqrt(g^2 + r^2)
    of its 1/r^3 tail) is lost, as the light that leaves the detector is."""
    g = fwhm_pixels * 0.652383013252053

    def integral(x, y):
        return np.arctan((x * y) / (g * np.sqrt(g * g + x * x + y * y))) / (2.0 * np.pi)

    d = np.arange(-radius, radius + 1, dtype=np.float64)
    x, y = np.meshgrid(d, d)
    return integral(x + 0.5, y + 0.5) - integral(x + 0.5, y - 0.5) - integral(x - 0.5, y + 0.5) + integral(x - 0.5, y - 0.5)


def psf_radius(kind, fwhm_pixels, shape, radius=0):
    """The kernel's radius in pixels: ``radius`` if given; otherwise 3 FWHM for the
    Gaussian (its tail beyond holds under 1e-10 of the light) and, for the fiber's long
    tail, 1000 g or the whole detector, whichever is smaller."""
    if radius:
        return int(radius)
    if kind == "gauss":
        return int(math.ceil(3.0 * fwhm_pixels)) + 1
    # the fiber's tail falls as 1/r^3: beyond 1000 g it holds under 0.1 % of the light
    return int(min(max(shape), math.ceil(1000.0 * fwhm_pixels * 0.652383013252053)))


@njit(parallel=True, cache=True)
def _separable(image, w):
    """image convolved with w along both axes (zero outside), rows in parallel."""
    S, F = image.shape
    r = (w.size - 1) // 2
    tmp = np.zeros((S, F))
    out = np.zeros((S, F))
    for s in prange(S):
        for k in range(-r, r + 1):
            t = s + k
            if 0 <= t < S:
                wk = w[k + r]
                for f in range(F):
                    tmp[s, f] += wk * image[t, f]
    for s in prange(S):
        for k in range(-r, r + 1):
            wk = w[k + r]
            for f in range(max(0, -k), min(F, F - k)):
                out[s, f] += wk * tmp[s, f + k]
    return out


def blur(image, kind, fwhm_pixels, radius=0):
    """Convolve a 2D image with the PSF (zero outside the detector)."""
    r = psf_radius(kind, fwhm_pixels, image.shape, radius)
    if kind == "gauss":
        return _separable(np.ascontiguousarray(image, dtype=np.float64), gauss_weights(fwhm_pixels, r))
    from scipy import signal
    return signal.fftconvolve(image, fiber_kernel(fwhm_pixels, r), mode="same")


POISSON_BLOCK = 1 << 18     # pixels per random stream: the counts do not depend on the thread count


def poisson_counts(photons, seed):
    """Poisson counts for an array of expected photons, in fixed blocks, each from its own
    stream spawned from ``seed``, drawn on all cores (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    flat = np.ascontiguousarray(photons, dtype=np.float64).ravel()
    out = np.empty(flat.size)
    starts = range(0, flat.size, POISSON_BLOCK)
    streams = np.random.SeedSequence(seed).spawn(len(starts))

    def block(k):
        a = starts[k]
        b = min(a + POISSON_BLOCK, flat.size)
        out[a:b] = np.random.default_rng(streams[k]).poisson(flat[a:b])
    workers = max(1, min(len(starts), numba.get_num_threads()))
    if workers == 1:
        for k in range(len(starts)):
            block(k)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(block, range(len(starts))))
    return out.reshape(np.shape(photons))


@functools.lru_cache(maxsize=2)
def _calibration_deviates(calibration_seed, shape):
    # the detector's fixed pattern: drawn once, not for every image of a dataset
    z = np.random.default_rng([calibration_seed, 2]).standard_normal(shape)
    z.setflags(write=False)
    return z


def calibration_pattern(response, shape):
    """The fixed per-pixel factors 1 + calibration * N(0, 1) (ones without calibration)."""
    if not response.calibration:
        return np.ones(shape)
    return 1.0 + response.calibration * _calibration_deviates(response.calibration_seed, tuple(shape))


def respond(image, response, pixel_size_mm, seed=None):
    """Apply ``response`` to ``image`` (expected photons; (slow, fast) or (panel, slow,
    fast)).  ``seed`` overrides ``response.seed`` (datasets give each frame its own)."""
    img = np.asarray(image, dtype=np.float64)
    rng = np.random.default_rng([response.seed if seed is None else seed, 1])     # flicker, read-out
    photons = img * response.scale
    if not np.all(np.isfinite(photons)) or (photons.size and np.max(np.abs(photons)) > MAX_PHOTONS):
        from .errors import ParameterError
        raise ParameterError(f"Response: the image times Response.scale = {response.scale:g} has values that are not "
                             f"finite or exceed {MAX_PHOTONS:g} photons per pixel")
    if response.flicker:
        photons = photons * max(0.0, 1.0 + response.flicker * rng.standard_normal())
    if response.calibration:
        photons = photons * calibration_pattern(response, img.shape)
    base = response.seed if seed is None else seed
    counts = poisson_counts(np.clip(photons, 0.0, None), [base, 3]) if response.noise else photons
    if response.psf is not None and response.psf_fwhm > 0:
        fwhm_pixels = response.psf_fwhm * 1e-3 / pixel_size_mm
        if counts.ndim == 3:
            counts = np.stack([blur(c, response.psf, fwhm_pixels, response.psf_radius) for c in counts])
        else:
            counts = blur(counts, response.psf, fwhm_pixels, response.psf_radius)
    adu = counts * response.gain + response.adc
    if response.readout:
        adu += response.readout * rng.standard_normal(adu.shape)
    top = float(2 ** response.bits - 1)
    adu = np.rint(adu)
    overloads = int(np.count_nonzero(adu >= top))
    underloads = int(np.count_nonzero(adu < 0))
    dtype = np.uint16 if response.bits == 16 else np.uint32
    return Detected(adu=np.clip(adu, 0.0, top).astype(dtype), counts=counts, overloads=overloads,
                    underloads=underloads)
