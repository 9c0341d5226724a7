"""Labels for machine learning: a reflection table per image and per-pixel label images.

``nbragg.simulate(exp, labels=True)`` adds

* ``Result.reflections``: one row per reflection that carries at least ``min_fraction``
  of the strongest reflection's photons, with columns

  ====================  ==============================================================
  h k l                 Miller indices
  panel                 the panel holding the predicted spot centre (else the one
                        holding most of the reflection's photons)
  fast slow             the predicted spot centre in pixels on that panel, measured
                        from the outer corner of pixel (0, 0): pixel (i, j) spans
                        [i, i + 1) x [j, j + 1), so its centre is (i + 0.5, j + 0.5);
                        NaN when the diffracted ray misses every panel
  photons               the reflection's noiseless photons on the detector: the sum
                        over every pixel of the terms whose nearest reciprocal-lattice
                        node is this reflection, with the pixel's factors
  partiality            the fraction of the full reflection recorded (below)
  d                     resolution, Angstrom
  ====================  ==============================================================

  The predicted centre is where the diffracted ray s0 + r_h, brought onto the Ewald
  sphere along its own direction (the point of the sphere nearest the lattice point),
  meets the detector, with no mosaic rotation and the crystal as in a still, or, for an
  oscillation, turned to the centre of the part of the reflection's rocking curve inside
  the image.  nanoBragg's curved detector gets no predicted positions (NaN).

* ``Result.labels``: ``reflection`` (int32, the image's shape: the table row of the
  reflection with the largest share of the pixel's photons, -1 where it is not in the
  table or the pixel has no Bragg photons) and ``spot_mask`` (bool: pixels whose
  dominant reflection puts there at least ``spot_fraction`` of its own brightest pixel's
  share).

Partiality.  For a still, the reflection's recorded intensity over the intensity it would
give with its reciprocal-lattice point on the Ewald sphere: S(e) / S(0), where S(e) is the
lattice transform |F_latt|^2 integrated over the plane that touches the Ewald sphere
nearest the lattice point, at the excitation error e (the point's distance from the
sphere).  For an image with an oscillation, the fraction of the reflection's rocking
curve (S(e(phi)) integrated over the crystal's rotation) that the image's phi range
holds.  Both use the crystal's lattice-factor shape (square, round, gauss or tophat) at
the mean wavelength, without mosaic domains.

The photons are exact: summed over a reflection's label mask on an image of isolated
spots they give the table's value (tests/test_labels.py).  Labels are computed on the
CPU whatever the backend of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError

COLUMNS = ("h", "k", "l", "panel", "fast", "slow", "photons", "partiality", "d")
_OFF = 1 << 20
_MASK = (1 << 21) - 1


@dataclass
class Labels:
    """Per-pixel label images, in the image's shape."""

    reflection: np.ndarray
    spot_mask: np.ndarray


def _table(columns):
    """A pandas DataFrame of the columns (pandas is the ``labels`` extra)."""
    try:
        import pandas as pd
    except ImportError:
        raise ParameterError("labels need pandas: pip install pandas (or nbragg[labels])") from None
    return pd.DataFrame({c: columns[c] for c in COLUMNS})


def label_shares(model, threads=None):
    """(hkl (P, S, F, SLOTS, 3), photons (P, S, F, SLOTS), other (P, S, F)): every
    pixel's Bragg photons split among its reflections (kernels/labels.py)."""
    from .engine import _threads
    from .kernels.labels import SLOTS, label_pixels
    samp = model.scene.samp
    if samp.os_omega or samp.os_polar or samp.os_thick:
        raise ParameterError("labels: with -oversample_omega/-oversample_polar/-oversample_thick "
                             "(Sampling.oversample_*) nanoBragg's factors compound with the running sum, "
                             "so a pixel's photons do not split by reflection; leave those flags off")
    hkls, shares, others = [], [], []
    for S in model.scenes:
        shape = (S.det.spixels, S.det.fpixels)
        hkl = np.zeros(shape + (SLOTS, 3), dtype=np.int64)
        share = np.zeros(shape + (SLOTS,))
        other = np.zeros(shape)
        with _threads(threads):
            label_pixels(*S, hkl, share, other)
        hkls.append(hkl)
        shares.append(share * model.scale)
        others.append(other * model.scale)
    return np.stack(hkls), np.stack(shares), np.stack(others)


def _plane_profile(real, normal, eps, half, xtal, n=61):
    """S(e) for each offset in ``eps`` (1/m) along ``normal``: |F_latt|^2 summed over a
    square of side 2 ``half`` (1/m) in the plane perpendicular to ``normal``, within the
    node's own cell (|dh|, |dk|, |dl| <= 1/2: beyond, the samples belong to the next
    reflection, as in the pixel kernel)."""
    e1 = np.cross(normal, [1.0, 0.0, 0.0])
    if np.linalg.norm(e1) < 0.1:
        e1 = np.cross(normal, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    u = np.linspace(-half, half, n)
    U, V = np.meshgrid(u, u, indexing="ij")
    dq = (eps[:, None, None, None] * normal + U[None, ..., None] * e1 + V[None, ..., None] * e2)
    dhkl = dq @ real.T                       # fractional offsets h = a . q
    from .kernels.labels import lattice_sq_grid
    vals = lattice_sq_grid(np.ascontiguousarray(dhkl.reshape(-1, 3)), xtal).reshape(dhkl.shape[:-1])
    vals = np.where((np.abs(dhkl) <= 0.5).all(axis=-1), vals, 0.0)
    return vals.sum(axis=(1, 2))


def _rotate(v, axis, phi):
    from .models.geometry import rotate_axis
    return rotate_axis(v, axis / np.linalg.norm(axis), phi)


def _partiality(model, hkl):
    """The partiality of each reflection (see the module)."""
    cry = model.crystal
    xtal = model.scene.xtal          # the kernels' crystal block: their lattice factor
    real0 = np.real(cry.real0)
    lam = model.wavelength
    s0 = np.real(model.detector.beam) / lam
    k = 1.0 / lam
    spindle = np.real(cry.spindle)
    phis = np.real(cry.phis)
    phi_lo = float(phis[0])
    phi_hi = float(phis[0] + cry.osc) if cry.osc > 0 else phi_lo
    # the lattice point's size: the widest and narrowest reciprocal extents of one node
    # (1/m), which set the window and the grid's step
    recip = np.linalg.inv(real0).T           # rows a*, b*, c*
    Ns = np.array([max(cry.Na, 1.0), max(cry.Nb, 1.0), max(cry.Nc, 1.0)])
    widths = np.linalg.norm(recip, axis=1) / Ns
    half = min(4.0 * float(widths.max()), 0.5 * float(np.linalg.norm(recip, axis=1).sum()))
    n_still = int(min(161, max(61, 2.0 * half / (float(widths.min()) / 6.0))))
    eps = np.linspace(-half, half, 161)
    out = np.empty(len(hkl))
    centre_phi = np.empty(len(hkl))
    mid = 0.5 * (phi_lo + phi_hi)
    real_mid = np.array([_rotate(v, spindle, mid) for v in real0])
    recip_mid = np.linalg.inv(real_mid).T
    for i, h in enumerate(hkl):
        r = np.asarray(h, float) @ recip_mid
        s1 = s0 + r
        normal = s1 / np.linalg.norm(s1)
        centre_phi[i] = mid
        if phi_hi == phi_lo:              # a still: the plane at the excitation error, and at 0
            e = np.linalg.norm(s1) - k
            at, peak = _plane_profile(real_mid, normal, np.array([e, 0.0]), half, xtal, n=n_still)
            out[i] = min(float(at / peak), 1.0) if peak > 0.0 and abs(e) <= half else 0.0
            continue
        profile = _plane_profile(real_mid, normal, eps, half, xtal)
        if profile.max() <= 0.0:
            out[i] = 0.0
            continue
        # the rocking curve: the excitation error as the crystal turns about the spindle
        # (widened until the curve has died away at both ends)
        rho = np.linalg.norm(np.cross(spindle / np.linalg.norm(spindle), r))
        span = min(max(2.0 * half / max(rho, 1e-30), phi_hi - phi_lo), math.pi)
        for _ in range(6):
            phi = np.concatenate([np.linspace(mid - span, phi_lo, 600, endpoint=False),
                                  np.linspace(phi_lo, phi_hi, 400, endpoint=False),
                                  np.linspace(phi_hi, mid + span, 601)])
            a = spindle / np.linalg.norm(spindle)
            t = (phi - mid)[:, None]
            rot = r * np.cos(t) + np.cross(a, r) * np.sin(t) + a * (a @ r) * (1.0 - np.cos(t))
            e = np.linalg.norm(s0 + rot, axis=1) - k
            curve = np.interp(e, eps, profile, left=0.0, right=0.0)
            if max(curve[0], curve[-1]) <= 1e-6 * curve.max() or span >= math.pi:
                break
            span = min(2.0 * span, math.pi)
        total = np.trapezoid(curve, phi)
        inside = (phi >= phi_lo) & (phi <= phi_hi)
        held = np.trapezoid(curve[inside], phi[inside])
        out[i] = min(float(held / total), 1.0) if total > 0 else 0.0
        if held > 0:          # where the frame records it: the rocking curve's centre inside it
            centre_phi[i] = float(np.trapezoid(curve[inside] * phi[inside], phi[inside]) / held)
    return out, centre_phi


def _predicted(model, hkl, centre_phi):
    """(panel, fast, slow) of each reflection's predicted spot centre (-1, NaN, NaN when
    the ray misses every panel, and on nanoBragg's curved detector) and its resolution d
    (Angstrom); the crystal turned to ``centre_phi`` (radians, one per reflection)."""
    cry = model.crystal
    real0 = np.real(cry.real0)
    spindle = np.real(cry.spindle)
    a = spindle / np.linalg.norm(spindle)
    hkl = np.asarray(hkl, float)
    q = np.empty((len(hkl), 3))
    for i, (h, phi) in enumerate(zip(hkl, centre_phi)):
        real = np.array([_rotate(v, a, phi) for v in real0])
        q[i] = h @ np.linalg.inv(real).T                                   # 1/m
    s0 = np.real(model.detector.beam) / model.wavelength
    s1 = s0 + q
    d = s1 / np.linalg.norm(s1, axis=1)[:, None]
    panel = np.full(len(hkl), -1)
    fast = np.full(len(hkl), np.nan)
    slow = np.full(len(hkl), np.nan)
    for p, kp in enumerate(model.panels):
        if kp.curved:
            continue
        pix0, f, s, o = (np.real(v) for v in (kp.pix0, kp.fdet, kp.sdet, kp.odet))
        denom = d @ o
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (pix0 @ o) / denom
        x = t[:, None] * d - pix0
        fx = (x @ f) / kp.pixel
        sy = (x @ s) / kp.pixel
        hit = (denom > 0) & (fx >= 0) & (fx < kp.fpixels) & (sy >= 0) & (sy < kp.spixels) & (panel < 0)
        panel[hit], fast[hit], slow[hit] = p, fx[hit], sy[hit]
    with np.errstate(divide="ignore"):
        dA = 1e10 / np.linalg.norm(q, axis=1)
    return panel, fast, slow, dA


def label(model, threads=None, min_fraction=1e-4, spot_fraction=0.01):
    """(reflection table, Labels) for a model (see the module); the image's shape is the
    model's."""
    hkl, share, other = label_shares(model, threads)
    P = hkl.shape[0]
    flat_hkl = hkl.reshape(-1, 3)
    flat_share = share.reshape(-1)
    used = flat_share > 0.0
    # one integer per hkl (indices within +-2^20), so that the sort is of numbers, not rows
    code = (((flat_hkl[used, 0] + _OFF) << 42) | ((flat_hkl[used, 1] + _OFF) << 21) | (flat_hkl[used, 2] + _OFF))
    codes, inverse = np.unique(code, return_inverse=True)
    keys = np.column_stack([(codes >> 42) - _OFF, ((codes >> 21) & _MASK) - _OFF, (codes & _MASK) - _OFF])
    inverse = inverse.reshape(-1)
    photons = np.bincount(inverse, weights=flat_share[used], minlength=len(keys))
    # per panel, to name the panel holding most of a reflection's photons
    panel_of = np.repeat(np.arange(P), share[0].size)[used]
    by_panel = np.zeros((len(keys), P))
    np.add.at(by_panel, (inverse, panel_of), flat_share[used])
    keep = photons >= min_fraction * photons.max() if len(photons) else np.zeros(0, bool)
    keep &= np.any(keys != 0, axis=1)           # 0 0 0 is the direct beam, not a reflection
    order = np.argsort(-photons[keep], kind="stable")
    rows = np.flatnonzero(keep)[order]
    row_of = np.full(len(keys), -1)
    row_of[rows] = np.arange(len(rows))
    table_hkl = keys[rows]
    partiality, centre_phi = _partiality(model, table_hkl)
    panel, fast, slow, d = _predicted(model, table_hkl, centre_phi)
    missing = panel < 0
    panel[missing] = np.argmax(by_panel[rows[missing]], axis=1) if missing.any() else panel[missing]
    columns = dict(h=table_hkl[:, 0], k=table_hkl[:, 1], l=table_hkl[:, 2], panel=panel, fast=fast, slow=slow,
                   photons=photons[rows], partiality=partiality, d=d)
    # the dominant reflection of every pixel, and the spot mask
    dom = np.argmax(share, axis=-1)
    dom_share = np.take_along_axis(share, dom[..., None], axis=-1)[..., 0]
    slot_key = np.full(share.shape, -1)
    slot_key.reshape(-1)[np.flatnonzero(used)] = inverse
    dom_key = np.take_along_axis(slot_key, dom[..., None], axis=-1)[..., 0]
    refl = np.where(dom_key >= 0, row_of[np.maximum(dom_key, 0)], -1).astype(np.int32)
    refl[dom_share <= 0.0] = -1
    peak = np.zeros(len(keys))
    np.maximum.at(peak, inverse, flat_share[used])
    spot = refl >= 0
    spot &= dom_share >= spot_fraction * peak[np.maximum(dom_key, 0)]
    if P == 1:
        refl, spot = refl[0], spot[0]
    return _table(columns), Labels(reflection=refl, spot_mask=spot)
