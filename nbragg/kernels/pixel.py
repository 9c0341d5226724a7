"""The one pixel walk: nanoBragg's loops over sensor layers, sub-pixels and sources, with
every quirk of the C.  (Loops that mirror it for speed, each checked against it: the
forward kernel's row lanes, :func:`~nbragg.kernels.cpu._forward_row_lanes`, bit for bit;
the tangent's, :func:`~nbragg.kernels.tangent._tangent_lanes`; the adjoint's fast path,
:func:`~nbragg.kernels.adjoint.pixel_adjoint_fast`, and its row lanes,
:func:`~nbragg.kernels.adjoint._adjoint_lanes`.)

* the solid angle is taken at the first sub-pixel (at every one with ``-oversample_omega``),
  the capture fraction at the first sub-pixel of each sensor layer (every one with
  ``-oversample_thick``), the polarization at the first sample that ``-dmin`` keeps (every
  one with ``-oversample_polar``); the factors not oversampled multiply the pixel's sum
  once, at the end, with the values last taken;
* ``-dmin`` drops a (sub-pixel, source) sample before anything else is computed for it;
* the amorphous background (nonBragg's term: materials given by tables of F against
  sin(theta)/lambda) is a separate sum over the same samples, with the solid angle,
  polarization, capture fraction and source weight taken at every sample, added to the
  pixel after the Bragg sum's factors; -dmin does not cut it;
* each (sub-pixel, source) sample is a *block*: the sum over orientations (phi steps x
  mosaic domains) of F_cell^2 F_latt^2, which with ``-oversample_*`` flags multiplies the
  running sum after every term.

What a kernel does at each step is a *mode*: a set of hooks, small compiled functions
bound into a copy of :func:`walk` (:func:`specialise`, the same recompilation that makes
the float32 and CUDA twins).  Forward (the image), tangent (forward-mode derivatives),
adjoint replay (the record the backward sweep reads) and the ``-printout`` tracer are
modes.  A hook receives the mode's work state ``W`` (a tuple of arrays it owns)
and the scene ``S``; the ones a mode does not bind do nothing.  Hooks read ``W`` by index
(``W[i]``), never by unpacking it or by a named tuple's fields: inlined into a parallel
loop, Numba keeps the writes made through indexed reads only (the tests catch the others).

Hooks, in the order the walk calls them:

``begin(W, S, fpixel, spixel) -> (I0, go)``   the sum's start; ``go=False`` goes straight to
                                              ``finish`` (with zero factors), for modes that
                                              can tell from the start that they cannot go on
``layer(W, S, t)``                            a sensor layer starts
``subpixel(W, S, f, s, subF, subS, t, px, py, pz, R, dx, dy, dz)``
``omega_taken(W, S, R, omega, sub)``          the solid angle was (re)computed
``capture_taken(W, S, t, dx, dy, dz, capture, sub)``
``amorphous(W, S, bg, s, sub, t, R, ix, iy, iz, dx, dy, dz, lam, qx, qy, qz, omega,
capture) -> bg``                              adds an amorphous sample to the background
                                              sum (default: its factors -- polarization,
                                              the sub-pixel's omega and capture, the
                                              source weight -- times sum_m amount_m
                                              sign(F_m) F_m^2 at sin(theta)/lambda)
``cut(W, S, t, subS, subF, src, px, py, pz, qx, qy, qz)``    -dmin dropped this sample
``source(W, S, src, dx, dy, dz, qx, qy, qz, lam)``
``polarization(W, S, src, ix, iy, iz, dx, dy, dz, sub) -> polar``   takes the polarization
                                              factor (default: its value alone)
``block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, src, sub) -> I``
``subpixel_done(W, S, f, s, subF, subS, t, px, py, pz, R, dx, dy, dz)``
``finish(W, S, I, capture, polar, omega, omega_sum, bg) -> result``   bg: the amorphous
                                              background's sum, added after the factors

``sub`` numbers the sub-pixels in walk order: (t * oversample + subS) * oversample + subF.
"""

import types

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .physics import (amorphous_term, beyond_dmin, capture_fraction, direction, polarization_factor, scattering,
                      solid_angle)


@njit(cache=True, error_model="numpy")
def walk(fpixel, spixel, S, W):
    """One pixel, in nanoBragg's order, calling the mode's hooks (see the module)."""
    det = S.det
    beam = S.beam
    samp = S.samp
    os = det.oversample
    os_omega = samp.os_omega
    os_polar = samp.os_polar
    os_thick = samp.os_thick
    # (nanoBragg takes -oversample_thick's capture fraction even without a sensor, where it
    # is 0; the physical mode keeps 1 there)
    sensor = det.thick != 0.0 or not samp.physical
    sources = beam.sources
    lambdas = beam.lambdas
    nsrc = sources.shape[0]
    nbg = samp.bg_amount.shape[0]
    bragg = samp.bragg
    bg = np.float64(0.0)
    I, go = begin(W, S, fpixel, spixel)
    if not go:
        return finish(W, S, I, 0.0, 0.0, 0.0, 0.0, bg)
    polar = 1.0 if beam.nopolar else 0.0
    omega = 0.0
    omega_sum = 0.0
    capture = 0.0
    bg_omega = 0.0
    bg_capture = 1.0
    for t in range(det.thicksteps):
        capture = 1.0 if det.thick == 0.0 else 0.0
        layer(W, S, t)
        for subS in range(os):
            for subF in range(os):
                sub = (t * os + subS) * os + subF
                px, py, pz, R, dx, dy, dz = direction(fpixel, spixel, subF, subS, t, det, beam)
                subpixel(W, S, fpixel, spixel, subF, subS, t, px, py, pz, R, dx, dy, dz)
                if omega == 0.0 or os_omega:
                    omega = solid_angle(R, det)
                    omega_taken(W, S, R, omega, sub)
                omega_sum += omega
                if capture == 0.0 or (os_thick and sensor):
                    capture = capture_fraction(t, dx, dy, dz, det)
                    capture_taken(W, S, t, dx, dy, dz, capture, sub)
                if nbg > 0:
                    # the amorphous term takes its factors at every sample (nonBragg.c)
                    bg_omega = solid_angle(R, det)
                    if det.thick != 0.0:
                        bg_capture = capture_fraction(t, dx, dy, dz, det)
                for s in range(nsrc):
                    ix, iy, iz, lam, qx, qy, qz = scattering(sources, lambdas, s, dx, dy, dz)
                    if nbg > 0:
                        bg = amorphous(W, S, bg, s, sub, t, R, ix, iy, iz, dx, dy, dz, lam, qx, qy, qz, bg_omega,
                                       bg_capture)
                    if not bragg:
                        continue
                    if beyond_dmin(qx, qy, qz, samp.dmin):
                        cut(W, S, t, subS, subF, s, px, py, pz, qx, qy, qz)
                        continue
                    source(W, S, s, dx, dy, dz, qx, qy, qz, lam)
                    if polar == 0.0 or os_polar:
                        polar = polarization(W, S, s, ix, iy, iz, dx, dy, dz, sub)
                    I = block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub)
                subpixel_done(W, S, fpixel, spixel, subF, subS, t, px, py, pz, R, dx, dy, dz)
    return finish(W, S, I, capture, polar, omega, omega_sum, bg)


@njit(cache=True, error_model="numpy", inline="always")
def oversampled_factor(samp, capture, polar, omega):
    """m, the product of the factors that -oversample_* flags apply after every term
    (1 without them); modes with derivatives use it as I = (I + T) m."""
    m = 1.0
    if samp.os_thick:
        m *= capture
    if samp.os_polar:
        m *= polar
    if samp.os_omega:
        m *= omega
    return m


@njit(cache=True, error_model="numpy", inline="always")
def final_factor(samp, capture, polar, omega):
    """The product of the factors applied once, at the end (those not oversampled)."""
    post = 1.0
    if not samp.os_thick:
        post *= capture
    if not samp.os_polar:
        post *= polar
    if not samp.os_omega:
        post *= omega
    return post


@njit(cache=True, error_model="numpy", inline="always")
def _times_factors(I, samp, capture, polar, omega, oversampled):
    """I multiplied, one by one in nanoBragg's order, by the factors whose -oversample_*
    flag is ``oversampled``."""
    if samp.os_thick == oversampled:
        I *= capture
    if samp.os_polar == oversampled:
        I *= polar
    if samp.os_omega == oversampled:
        I *= omega
    return I


@njit(cache=True, error_model="numpy", inline="always")
def add_term(I, T, samp, capture, polar, omega):
    """The running sum after a term: I + T, then with -oversample_* flags multiplied by
    each oversampled factor in turn; in the physical mode I + T times the sample's factors
    (no compounding).  Every mode's value goes through here and :func:`apply_final`, so
    forward, tangent and replay images agree bit for bit."""
    if samp.physical:
        return I + _times_factors(T, samp, capture, polar, omega, True)
    return _times_factors(I + T, samp, capture, polar, omega, True)


@njit(cache=True, error_model="numpy", inline="always")
def apply_final(samp, I, capture, polar, omega):
    """The pixel's value: its sum times the factors not oversampled, one by one."""
    return _times_factors(I, samp, capture, polar, omega, False)


# ----------------------------------------------------------------------------- defaults
# (one per hook, with its arity: GPU device functions take no *args)

@njit(cache=True, error_model="numpy", inline="always")
def _begin(W, S, fpixel, spixel):
    # the pixel's sum of samples: np.float64(), which single-precision twins keep, holds it
    # in float64 (one add per sample) so that long sums keep their digits there too
    return np.float64(S.samp.I_bg), True


@njit(cache=True, error_model="numpy", inline="always")
def _layer(W, S, t):
    pass


@njit(cache=True, error_model="numpy", inline="always")
def _subpixel(W, S, fpixel, spixel, subF, subS, t, px, py, pz, R, dx, dy, dz):
    pass


@njit(cache=True, error_model="numpy", inline="always")
def _omega_taken(W, S, R, omega, sub):
    pass


@njit(cache=True, error_model="numpy", inline="always")
def _capture_taken(W, S, t, dx, dy, dz, capture, sub):
    pass


@njit(cache=True, error_model="numpy", inline="always")
def _cut(W, S, t, subS, subF, s, px, py, pz, qx, qy, qz):
    pass


@njit(cache=True, error_model="numpy", inline="always")
def _source(W, S, s, dx, dy, dz, qx, qy, qz, lam):
    pass


@njit(cache=True, error_model="numpy", inline="always")
def _polarization(W, S, s, ix, iy, iz, dx, dy, dz, sub):
    pv = S.beam.polar_axis
    return polarization_factor(S.beam.kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2])


@njit(cache=True, error_model="numpy", inline="always")
def _block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    return I


@njit(cache=True, error_model="numpy", inline="always")
def _amorphous(W, S, bg, s, sub, t, R, ix, iy, iz, dx, dy, dz, lam, qx, qy, qz, omega, capture):
    return bg + amorphous_term(S, s, ix, iy, iz, dx, dy, dz, omega, capture, qx, qy, qz)


@njit(cache=True, error_model="numpy", inline="always")
def _finish(W, S, I, capture, polar, omega, omega_sum, bg):
    return I


# the names walk() calls, bound here to the defaults (the bare walk sums nothing); every
# mode binds its own in a copy (specialise)
begin = _begin
layer = _layer
subpixel = subpixel_done = _subpixel
omega_taken = _omega_taken
capture_taken = _capture_taken
cut = _cut
source = _source
polarization = _polarization
amorphous = _amorphous
block = _block
finish = _finish

HOOKS = ("begin", "layer", "subpixel", "omega_taken", "capture_taken", "amorphous", "cut", "source",
         "polarization", "block", "subpixel_done", "finish")
_DEFAULTS = {h: globals()[h] for h in HOOKS}    # the module-level bindings above


def specialise(name, **hooks):
    """A compiled copy of :func:`walk` with the given hooks bound (the others do nothing);
    ``block`` and ``finish`` are required.  ``name`` tells the copies apart (it is part of
    the on-disk cache key)."""
    unknown = set(hooks) - set(HOOKS)
    if unknown:
        raise TypeError(f"unknown hooks: {sorted(unknown)}")
    if "block" not in hooks or "finish" not in hooks:
        raise TypeError("a mode needs at least the block and finish hooks")
    # inlined into the mode's pixel function: a call would copy the scene (a tuple of
    # arrays, passed by value) once more per pixel
    return rebound(walk, name, {h: hooks.get(h, _DEFAULTS[h]) for h in HOOKS}, inline="always")


def rebound(fn, suffix, names, **options):
    """A compiled copy of the njit function ``fn`` with the global ``names`` ({name:
    value}) rebound, and with ``options`` on top of ``fn``'s; ``suffix`` tells the copies
    apart (it is part of the on-disk cache key)."""
    py = fn.py_func
    scope = dict(py.__globals__)
    scope.update(names)
    clone = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
    clone.__qualname__ = f"{py.__qualname__}_{suffix}"
    opts = {k: v for k, v in fn.targetoptions.items() if k != "nopython"}
    opts.update(options)
    return njit(**opts)(clone)
