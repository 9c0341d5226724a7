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

from . import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
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
    from scipy.special import erf          # (takes complex arguments: blur_derivative)
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
def _separable(image, w_slow, w_fast):
    """image convolved with w_slow along the slow axis and w_fast along the fast one
    (both of the same odd length; zero outside), rows in parallel."""
    S, F = image.shape
    r = (w_slow.size - 1) // 2
    tmp = np.zeros((S, F))
    out = np.zeros((S, F))
    for s in prange(S):
        for k in range(-r, r + 1):
            t = s + k
            if 0 <= t < S:
                wk = w_slow[k + r]
                for f in range(F):
                    tmp[s, f] += wk * image[t, f]
    for s in prange(S):
        for k in range(-r, r + 1):
            wk = w_fast[k + r]
            for f in range(max(0, -k), min(F, F - k)):
                out[s, f] += wk * tmp[s, f + k]
    return out


def _convolve(image, kind, fwhm_pixels, radius, of_kernel=None):
    """The image convolved with the PSF's kernel (zero outside the detector), or with
    ``of_kernel(make)`` where ``make(fwhm)`` gives the kernel (the Gaussian's 1D weights,
    the fiber's 2D kernel) at the radius of ``fwhm_pixels``; it returns one kernel, or a
    list of (slow, fast) weight pairs for the Gaussian, whose convolutions are summed."""
    r = psf_radius(kind, fwhm_pixels, image.shape, radius)
    img = np.ascontiguousarray(image, dtype=np.float64)
    if kind == "gauss":
        def make(f):
            return gauss_weights(f, r)
        pairs = of_kernel(make) if of_kernel else [(make(fwhm_pixels),) * 2]
        out = _separable(img, *pairs[0])
        for ws, wf in pairs[1:]:
            out += _separable(img, ws, wf)
        return out
    from scipy import signal

    def make(f):
        return fiber_kernel(f, r)
    return signal.fftconvolve(img, of_kernel(make) if of_kernel else make(fwhm_pixels), mode="same")


def blur(image, kind, fwhm_pixels, radius=0):
    """Convolve a 2D image with the PSF (zero outside the detector).  The kernels are
    symmetric, so the convolution is its own adjoint."""
    return _convolve(image, kind, fwhm_pixels, radius)


_STEP = 1e-150      # the complex step of the kernels' derivatives (see params.py)


def blur_derivative(image, kind, fwhm_pixels, radius=0):
    """d(blur(image))/d(fwhm in pixels), at the radius of ``fwhm_pixels`` (the radius
    is a whole number of pixels: the derivative is that of the smooth piece).  The
    kernel's derivative is its complex step: exact to rounding."""
    def derivative(make):
        k = make(fwhm_pixels)
        dk = np.imag(make(complex(fwhm_pixels, _STEP))) / _STEP
        return [(dk, k), (k, dk)] if kind == "gauss" else dk
    return _convolve(image, kind, fwhm_pixels, radius, derivative)


def blur_squared(image, kind, fwhm_pixels, radius=0):
    """The image convolved with the PSF's kernel squared (the variance of Poisson counts
    the PSF spreads)."""
    def squared(make):
        k = make(fwhm_pixels) ** 2
        return [(k, k)] if kind == "gauss" else k
    return _convolve(image, kind, fwhm_pixels, radius, squared)


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
    counts = convolve_psf(response, counts, pixel_size_mm)
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


# ----------------------------------------------------------------------------- expectation
# The detector's mean signal E = adc + gain * PSF * (scale * calibration * I): what a
# refinement compares with recorded pixels (flicker, a random factor per image, and the
# noise are left out; Poisson counts and read-out noise are the likelihood's business).
# It is linear in the photons I, so derivatives pass through it: a tangent dI becomes
# gain * PSF * (scale * calibration * dI), and an upstream u in ADU becomes
# scale * calibration * gain * PSF * u (the PSF's kernels are symmetric).

def _per_panel(fn, image):
    if image.ndim == 3:
        return np.stack([fn(p) for p in image])
    return fn(image)


def _with_psf(response, image, pixel_size_mm, fn):
    """fn(panel, kind, fwhm in pixels, radius) on each panel; the image itself without a
    PSF."""
    if response.psf is None or not response.psf_fwhm > 0:
        return image
    fwhm = response.psf_fwhm * 1e-3 / pixel_size_mm
    return _per_panel(lambda p: fn(p, response.psf, fwhm, response.psf_radius), image)


def convolve_psf(response, image, pixel_size_mm):
    """PSF * image (each panel of a stack; the image itself without a PSF)."""
    return _with_psf(response, image, pixel_size_mm, blur)


def expected_counts(image, response):
    """scale * calibration * I: the expected photons before the PSF."""
    img = np.asarray(image, dtype=np.float64)
    return img * (response.scale * calibration_pattern(response, img.shape))


def blurred_photons(image, response, pixel_size_mm):
    """B = PSF * (scale * calibration * I): the expected photons as the pixels see them."""
    return convolve_psf(response, expected_counts(image, response), pixel_size_mm)


def poisson_variance(image, response, pixel_size_mm):
    """The variance of the blurred counts, PSF^2 * (scale * calibration * I): Poisson
    counts spread by the PSF (each pixel's own variance; neighbours are correlated)."""
    return _with_psf(response, expected_counts(image, response), pixel_size_mm, blur_squared)


def expected_signal(image, response, pixel_size_mm):
    """E = adc + gain * B, the detector's mean signal in ADU (no flicker, no noise)."""
    return response.adc + response.gain * blurred_photons(image, response, pixel_size_mm)


def signal_tangent(dimage, response, pixel_size_mm):
    """dE for a tangent dI of the photons (an image)."""
    return response.gain * blurred_photons(dimage, response, pixel_size_mm)


def signal_vjp(upstream, response, pixel_size_mm):
    """The upstream of the photons, scale * calibration * gain * PSF * u, for an upstream
    u of E (the PSF is symmetric: its adjoint is itself)."""
    u = np.asarray(upstream, dtype=np.float64)
    return (response.gain * response.scale * calibration_pattern(response, u.shape)) * convolve_psf(response, u,
                                                                                                 pixel_size_mm)


def response_derivatives(image, response, pixel_size_mm, names):
    """{name: dE/d(name)} (images) for response parameters, at the photons ``image``."""
    img = np.asarray(image, dtype=np.float64)
    out = {}
    for n in names:
        if n == "adc":
            out[n] = np.ones_like(img)
        elif n == "gain":
            out[n] = blurred_photons(img, response, pixel_size_mm)
        elif n == "response_scale":
            out[n] = response.gain * convolve_psf(response, img * calibration_pattern(response, img.shape),
                                          pixel_size_mm)
        elif n == "psf_fwhm":
            if response.psf is None:
                from .errors import ParameterError
                raise ParameterError("parameter 'psf_fwhm': the response has no PSF (Response.psf is None)")
            out[n] = (response.gain * 1e-3 / pixel_size_mm) * _with_psf(
                response, expected_counts(img, response), pixel_size_mm, blur_derivative)
        else:
            raise KeyError(n)
    return out
