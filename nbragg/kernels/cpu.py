"""CPU kernels (Numba, parallel over detector rows).

The forward kernel computes, for every pixel inside the ROI and the mask, nanoBragg's
accumulated intensity times the solid-angle, polarization and absorption factors.  The
engine multiplies by r_e^2 * fluence / steps.  Each pixel is computed by one thread
from start to end, so the image does not depend on the number of threads.

The kernels read a :class:`~nbragg.kernels.scene.Scene`: named blocks of SI values.
"""

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit, prange

from .physics import (REAL, SQUARE, bragg_weight, flat_grid_index, grid_extent, lattice_factor, lookup_F, miller,
                      orientations_soa, real, soa_miller, square_lattice_sq, sum_fixed)
from .pixel import add_term, apply_final, specialise
from .scene import Scene

@njit(cache=True, error_model="numpy", inline="always")
def square_terms(qx, qy, qz, ori, xt, fs, fflat, buf, ibuf):
    """F_cell^2 F_latt^2 for every orientation (parallelepiped shape, nearest F).

    The first loop has no calls, gathers or early exits, so LLVM vectorises it; the
    structure-factor gather, when there is a grid, runs in a second (scalar) loop.
    ``ori`` is (9, m8): rows a_x a_y a_z b_x ... c_z, zero-padded (see
    :func:`orientations_soa`); ``fflat`` the flattened grid.  Entries past the real
    orientations hold garbage and must be ignored.
    """
    n = ori.shape[1]
    use_grid = fs.has_hkls
    extent = grid_extent(fs)
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    for m in range(n):
        h, k, l, h0, k0, l0 = soa_miller(ori, m, qx, qy, qz)
        buf[m] = square_lattice_sq(h - real(h0), k - real(k0), l - real(l0), Na, Nb, Nc)
        if use_grid:
            ibuf[m] = flat_grid_index(h0, k0, l0, extent)
    Fdef2 = fs.default_F * fs.default_F
    if use_grid:
        for m in range(n):
            j = ibuf[m]
            if j >= 0:
                F = fflat[j]
                buf[m] *= F * F
            else:
                buf[m] *= Fdef2
    else:
        for m in range(n):
            buf[m] *= Fdef2


@njit(cache=True, error_model="numpy", inline="always")
def term(orients, o, qx, qy, qz, S, s):
    """One orientation's sample for source ``s``: (h, k, l, h0, k0, l0, F_latt, F_cell,
    counted, T) with the term T = w F_cell^2 F_latt^2 (w the source's weight times the
    Debye-Waller factor: physics.bragg_weight).
    nanoBragg skips the structure-factor lookup, and the term, where F_latt is 0 (unless
    there is water background): then F_cell and T are 0 and counted is False."""
    h, k, l, h0, k0, l0 = miller(orients, o, qx, qy, qz)
    F_latt = lattice_factor(h, k, l, h0, k0, l0, S.xtal)
    if F_latt == 0.0 and not S.samp.water:
        return h, k, l, h0, k0, l0, F_latt, 0.0, False, 0.0
    F_cell = lookup_F(h, k, l, h0, k0, l0, S.fhkl)
    T = bragg_weight(S, s, qx, qy, qz) * (F_cell * F_cell * F_latt * F_latt)
    return h, k, l, h0, k0, l0, F_latt, F_cell, True, T


@njit(cache=True, error_model="numpy", inline="always")
def _forward_block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    """The sum of one block's terms, added to I; with -oversample_* flags each term's
    running sum is multiplied by the factors, one by one, as the C does."""
    xt = S.xtal
    orients = xt.orients
    norient = orients.shape[0]
    if W[0]:      # W = (fast, ori, fflat, buf, ibuf), read by index (see pixel.py)
        buf = W[3]
        square_terms(qx, qy, qz, W[1], xt, S.fhkl, W[2], buf, W[4])
        return I + bragg_weight(S, s, qx, qy, qz) * sum_fixed(buf, norient)
    for m in range(norient):
        h, k, l, h0, k0, l0, F_latt, F_cell, counted, T = term(orients, m, qx, qy, qz, S, s)
        if counted:
            I = add_term(I, T, S.samp, capture, polar, omega)
    return I


@njit(cache=True, error_model="numpy", inline="always")
def _forward_finish(W, S, I, capture, polar, omega, omega_sum, bg):
    return apply_final(S.samp, I, capture, polar, omega) + bg, omega_sum


walk_forward = specialise("forward", block=_forward_block, finish=_forward_finish)


@njit(cache=True, error_model="numpy", inline="always")
def pixel_value(fpixel, spixel, S, fast, ori, fflat, buf, ibuf):
    """One pixel: returns (value before r_e^2*fluence/steps, sum of sub-pixel omegas).

    ``fast`` (see :func:`fast_path`) sums each block's orientations in bulk with
    :func:`square_terms` (CPU vector loops over ``ori``, ``buf``, ``ibuf``); otherwise
    they are summed one by one, as the GPU does.  The pixel's sum starts as
    np.float64(I_bg), which single-precision twins keep: long sums keep their digits in
    float64 there too."""
    return walk_forward(fpixel, spixel, S, (fast, ori, fflat, buf, ibuf))


@njit(cache=True)
def fast_path(S):
    """True when the kernels may use the bulk orientation loops (no -oversample_* flags,
    parallelepiped spots, nearest-neighbour F without anisotropic displacements)."""
    return (not S.samp.os_omega and not S.samp.os_polar and not S.samp.os_thick
            and S.xtal.shape == SQUARE and not S.fhkl.interpolate and not S.fhkl.aniso)


@njit(cache=True)
def clipped_roi(det, spixels, fpixels):
    """(xmin, xmax, ymin, ymax) of the ROI inside an image of that size."""
    return (max(det.roi[0], 0), min(det.roi[1], fpixels - 1), max(det.roi[2], 0), min(det.roi[3], spixels - 1))


@njit(parallel=True, cache=True, error_model="numpy")
def forward(det, beam, xtal, fhkl, samp, y0, y1, image, omega_rows):
    """Fill ``image`` (spixels, fpixels) inside ROI and mask, in rows y0..y1 (inclusive,
    within the ROI's); other pixels are left as they are.

    Parallel kernels take the scene's blocks one by one (``*scene``) and rebuild the
    Scene inside the parallel loop: Numba's parallel loops cannot take nested tuples of
    arrays from outside."""
    spixels, fpixels = image.shape
    xmin, xmax, ymin, ymax = clipped_roi(det, spixels, fpixels)
    ymin = max(ymin, y0)
    ymax = min(ymax, y1)
    ori = orientations_soa(xtal.orients)
    fflat = fhkl.grid.ravel()
    fast = fast_path(Scene(det, beam, xtal, fhkl, samp))
    for spixel in prange(ymin, ymax + 1):
        _forward_row(Scene(det, beam, xtal, fhkl, samp), spixel, xmin, xmax, fast, ori, fflat, image, omega_rows)


@njit(cache=True, error_model="numpy", inline="always")
def _forward_row(S, spixel, xmin, xmax, fast, ori, fflat, image, omega_rows):
    """One row of the forward kernel.  (A call per row from the parallel loop: the pixel
    walk is inlined here, where Numba keeps writes into arrays held in tuples, which it
    may lose when they are inlined into the parallel loop's body itself.)"""
    use_mask = S.det.use_mask
    mask = S.det.mask
    buf = np.empty(ori.shape[1], dtype=REAL)
    ibuf = np.empty(ori.shape[1], dtype=np.int64)
    osum = 0.0
    for fpixel in range(xmin, xmax + 1):
        if use_mask and mask[spixel, fpixel] == 0:
            continue
        v, o = pixel_value(fpixel, spixel, S, fast, ori, fflat, buf, ibuf)
        image[spixel, fpixel] = v
        osum += o
    omega_rows[spixel] = osum
