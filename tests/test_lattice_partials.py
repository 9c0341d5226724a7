"""The lattice factor's partials as the derivative kernels' vector loops take them: the
quotient rule with one reciprocal for three axes (physics.square_lattice_grad_far), and
the lanes next to a node, where that rule cancels, redone with the exact reference
(square_lattice_grad) inside derivs.orientation_lanes."""

import math

import numpy as np
from numba import njit

from nbragg.engine import build_model
from nbragg.kernels.derivs import lane_scratch, lane_sums, orientation_lanes
from nbragg.kernels.physics import (orientations_soa, square_lattice_grad, square_lattice_grad_far,
                                    square_lattice_sq)
from nbragg.nbargs import parse_nanobragg_args


def _near(delta, N):
    return N > 1.0 and abs(N * (math.pi * delta)) < 2e-3


def test_far_partials_equal_the_reference_away_from_nodes_and_flag_the_rest():
    rng = np.random.default_rng(11)
    for N in [(5.0, 8.0, 3.0), (1.0, 0.5, 5.0), (7.5, 1.0, 2.0)]:
        edges = [2e-3 / (math.pi * n) * f for n in N for f in (0.999999, 1.000001)]
        special = [0.0, 1e-15, -1e-15, 0.5, -0.5, 1e-9] + edges + [-e for e in edges]
        deltas = np.concatenate([rng.uniform(-0.5, 0.5, 60), special])
        checked = flagged = 0
        for _ in range(400):
            d = rng.choice(deltas, 3)
            far = square_lattice_grad_far(d[0], d[1], d[2], *N)
            ref = square_lattice_grad(d[0], d[1], d[2], *N)
            near = any(_near(x, n) for x, n in zip(d, N))
            assert far[8] == (1.0 if near else 0.0), (d, N)
            # F_latt^2: the forward's, bit for bit, flagged or not
            assert far[0] == ref[0] == square_lattice_sq(d[0], d[1], d[2], *N), (d, N)
            if near:
                flagged += 1
                continue
            checked += 1
            # one reciprocal for three axes moves each quotient by an ulp or two; just
            # outside the series' range the rule cancels by up to (N pi delta)^-2 ~ 2.5e5
            close = any(abs(x * n) < 1e-2 for x, n in zip(d, N))
            np.testing.assert_allclose(far[1:8], ref[1:8], rtol=1e-9 if close else 1e-12,
                                       atol=1e-12 * max(np.abs(ref[1:8]).max(), 1.0), err_msg=f"{d} {N}")
        assert checked > 100 and flagged > 10


@njit(error_model="numpy")
def _lanes(ori, norient, qx, qy, qz, wt, xt, fs):
    n = qx.shape[0]
    sc = lane_scratch(n, fs.default_F)
    sums = lane_sums(n, norient, True)
    orientation_lanes(ori, norient, qx, qy, qz, wt, xt, fs, fs.grid.ravel(), True, True, np.empty(0),
                      np.empty((0, 0)), sc, sums, n)
    return sums.acc.sum(axis=0), sums.Wx.copy(), sums.SNa.copy(), sums.SNb.copy(), sums.O.copy()


def test_orientation_lanes_redo_the_lanes_on_a_node():
    """Lanes whose q sits exactly on a node of the first orientation (0/0 in the quotient
    rule) among ordinary ones: every per-lane sum equals one built from the reference."""
    args = "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 6 -lambda 1 -distance 60 -detpixels 8"
    exp = parse_nanobragg_args((args + " -mosaic 0.5 -mosaic_dom 3").split(), warn=lambda m: None).experiment
    model = build_model(exp, warn=lambda m: None)
    xt, fs = model.scene.xtal, model.scene.fhkl
    orients = xt.orients
    rng = np.random.default_rng(2)
    n = 37
    A0 = orients[0]                                   # rows a, b, c: h = a . q
    q = rng.normal(size=(n, 3)) * 3e9
    for x, hkl in zip(range(0, 12, 2), [(0, 0, 0), (1, 0, 0), (2, -1, 3), (0, 4, -2), (-3, 1, 1), (1, 1, 1)]):
        q[x] = np.linalg.solve(A0, np.array(hkl, dtype=float))
    wt = rng.uniform(0.5, 1.5, n)
    acc, Wx, SNa, SNb, O = _lanes(orientations_soa(orients), orients.shape[0], q[:, 0].copy(), q[:, 1].copy(),
                                  q[:, 2].copy(), wt, xt, fs)
    F2 = fs.default_F ** 2
    for x in range(n):
        want_acc = want_W = want_Na = want_Nb = 0.0
        for m in range(orients.shape[0]):
            a = orients[m]                            # (as the kernel rounds: no FMA, this order)
            hkl = [a[i, 0] * q[x, 0] + a[i, 1] * q[x, 1] + a[i, 2] * q[x, 2] for i in range(3)]
            d = [v - math.ceil(v - 0.5) for v in hkl]
            latt, Lt, LH, LK, LL, LNa, LNb, LNc = square_lattice_grad(*d, xt.Na, xt.Nb, xt.Nc)
            c = 2.0 * F2 * Lt * wt[x]
            want_acc += latt * F2
            want_W += c * (LH * orients[m, 0, 0] + LK * orients[m, 1, 0] + LL * orients[m, 2, 0])
            want_Na += c * LNa
            want_Nb += c * LNb
            np.testing.assert_allclose(O[0, m, x], c * LH * q[x, 0], rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose([acc[x], Wx[x], SNa[x], SNb[x]], [want_acc, want_W, want_Na, want_Nb],
                                   rtol=1e-9, atol=1e-9 * abs(want_W) + 1e-300, err_msg=f"lane {x}")
    assert np.all(np.isfinite(Wx)) and acc[0] > 0.9 * (xt.Na * xt.Nb * xt.Nc) ** 2 * F2
