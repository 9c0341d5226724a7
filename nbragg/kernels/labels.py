"""The labelling mode of the pixel walk: each pixel's Bragg photons split by reflection.

Every sample's term F_cell^2 F_latt^2 belongs to the reflection whose node is nearest
(h0, k0, l0: the node the lattice factor is centred on), so a pixel's Bragg sum is the sum
of its reflections' shares.  The walk keeps up to SLOTS reflections per pixel (the largest
shares; a pixel that sees more -- only far from every spot, where the terms are tiny --
adds the rest to ``other``) and multiplies the shares by the factors the forward kernel
applies once per pixel, so slot values add up to the forward image's Bragg part before
r_e^2 fluence / steps.  Modes with -oversample_* flags (whose factors compound with the
running sum) have no such split: the engine refuses labels there.
"""

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit, prange

from .cpu import clipped_roi, term
from .physics import lattice_factor
from .pixel import final_factor, specialise
from .scene import Scene

SLOTS = 4


@njit(cache=True, error_model="numpy")
def _label_block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    hkl = W[0]            # W = (hkl (SLOTS, 3), share (SLOTS,), count (1,), other (1,)), by index
    share = W[1]
    count = W[2]
    other = W[3]
    orients = S.xtal.orients
    for o in range(orients.shape[0]):
        h, k, l, h0, k0, l0, F_latt, F_cell, counted, T = term(orients, o, qx, qy, qz, S, s)
        if not counted or T == 0.0:
            continue
        I += T
        n = count[0]
        j = 0
        while j < n and not (hkl[j, 0] == h0 and hkl[j, 1] == k0 and hkl[j, 2] == l0):
            j += 1
        if j < n:
            share[j] += T
        elif n < hkl.shape[0]:
            hkl[n, 0] = h0
            hkl[n, 1] = k0
            hkl[n, 2] = l0
            share[n] = T
            count[0] = n + 1
        else:
            # a new reflection in a full pixel takes the smallest slot's place if larger
            m = 0
            for q in range(1, n):
                if share[q] < share[m]:
                    m = q
            if T > share[m]:
                other[0] += share[m]
                hkl[m, 0] = h0
                hkl[m, 1] = k0
                hkl[m, 2] = l0
                share[m] = T
            else:
                other[0] += T
    return I


@njit(cache=True, error_model="numpy")
def _label_finish(W, S, I, capture, polar, omega, omega_sum, bg):
    return final_factor(S.samp, capture, polar, omega)


walk_label = specialise("label", block=_label_block, finish=_label_finish)


@njit(parallel=True, cache=True, error_model="numpy")
def label_pixels(det, beam, xtal, fhkl, samp, out_hkl, out_share, out_other):
    """Fill out_hkl (spixels, fpixels, SLOTS, 3), out_share (spixels, fpixels, SLOTS) and
    out_other (spixels, fpixels) inside the ROI and mask (shares already multiplied by the
    pixel's factors; empty slots hold 0)."""
    spixels, fpixels = out_other.shape
    xmin, xmax, ymin, ymax = clipped_roi(det, spixels, fpixels)
    for spixel in prange(ymin, ymax + 1):
        _label_row(Scene(det, beam, xtal, fhkl, samp), spixel, xmin, xmax, out_hkl, out_share, out_other)


@njit(cache=True, error_model="numpy", inline="always")
def _label_row(S, spixel, xmin, xmax, out_hkl, out_share, out_other):
    nslot = out_share.shape[2]
    hkl = np.zeros((nslot, 3), dtype=np.int64)
    share = np.zeros(nslot)
    count = np.zeros(1, dtype=np.int64)
    other = np.zeros(1)
    for fpixel in range(xmin, xmax + 1):
        if S.det.use_mask and S.det.mask[spixel, fpixel] == 0:
            continue
        count[0] = 0
        other[0] = 0.0
        post = walk_label(fpixel, spixel, S, (hkl, share, count, other))
        for j in range(count[0]):
            out_hkl[spixel, fpixel, j, 0] = hkl[j, 0]
            out_hkl[spixel, fpixel, j, 1] = hkl[j, 1]
            out_hkl[spixel, fpixel, j, 2] = hkl[j, 2]
            out_share[spixel, fpixel, j] = share[j] * post
        out_other[spixel, fpixel] = other[0] * post


@njit(cache=True, error_model="numpy")
def lattice_sq_grid(dhkl, xt):
    """|F_latt|^2 at fractional offsets dhkl (n, 3) from a node, by the kernels' own
    lattice factor (the partiality's integrals; nbragg.labels)."""
    out = np.empty(dhkl.shape[0])
    for i in range(dhkl.shape[0]):
        F = lattice_factor(dhkl[i, 0], dhkl[i, 1], dhkl[i, 2], 0, 0, 0, xt)
        out[i] = F * F
    return out

