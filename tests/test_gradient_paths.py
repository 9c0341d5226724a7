"""Derivatives on the paths the nine main configurations (test_gradients.py) do not take:
spot shapes, each -oversample_* flag alone, the curved detector, -point_pixel, -dmin and a
water-dominated background.  Adjoint gradients against central differences, and the
tangent Jacobian's J^T w against the adjoint.

Where nanoBragg's model jumps (the -dmin cut, top-hat edges) the pixels near the jump get
zero weight, so the comparison is on the smooth piece, as the derivative is defined."""

import numpy as np
import pytest

import nbragg
from nbragg.engine import build_model
from nbragg.gradients import check_gradients, gradient, jacobian
from nbragg.nbargs import parse_nanobragg_args
from nbragg.params import SCALAR_PARAMS

TRI = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
       "-detpixels 12 -oversample 1 -water 0.01 -polar 0.3")
SMALL_N = TRI.replace("-N 5", "-N 3")
OS2 = TRI.replace("-oversample 1", "-oversample 2")
THICK = " -detector_abs 320 -detector_thick 450 -detector_thicksteps 2"

CONFIGS = {
    "round_xtal": TRI + " -round_xtal",
    "round_xtal_fudge": TRI + " -round_xtal -fudge 1.7",
    "gauss_xtal": TRI + " -gauss_xtal",
    # N = 3 and a 100 A cell: every sample lies well inside its node's top hat (radius
    # 0.63 / N^3 1/A against at most 0.009 1/A from a node), so the image is smooth
    "tophat_inside": "-cell 100 100 100 90 90 90 -misset 10 5 3 -default_F 100 -N 3 -lambda 1.0 -distance 100 "
                     "-pixel 0.4 -detpixels 12 -oversample 1 -water 0.01 -polar 0.3 -tophat_spots",
    "oversample_omega": OS2 + " -oversample_omega",
    "oversample_polar": OS2 + " -oversample_polar",
    "oversample_thick": OS2 + THICK + " -oversample_thick",
    "curved_det": TRI + " -curved_det -detector_rotx 2 -twotheta 3",
    "point_pixel": TRI + " -point_pixel",
    "dmin": TRI + " -dmin 50",
    "water_background": SMALL_N.replace("-water 0.01", "-water 0.05"),   # background ~ the spots
}

MOSAIC_PHI = {"mosaic_spread", "osc"}   # one domain, one phi step: no smooth dependence
ORIENTATION = {"cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma", "misset_x", "misset_y",
               "misset_z", "phi0"}
INACTIVE = {name: MOSAIC_PHI for name in CONFIGS}
# inside the top hat the lattice factor is N_a N_b N_c whatever the orientation
INACTIVE["tophat_inside"] = MOSAIC_PHI | ORIENTATION | {"wavelength"}
# the Gaussian spot's metric is scaled by (V / V_cell)^2 (nanoBragg), which makes the image
# independent of the a edge here (central differences agree: exactly 0); the derivative's
# terms cancel, so the analytic value is 0 to round-off
CANCELS = {"gauss_xtal": {"cell_a"}}
# derivatives too small for central differences to resolve against the loss's round-off:
# with -oversample_omega every term multiplies the running sum, water included, by the
# sub-pixel's solid angle (~1e-5), so the background survives only as ~I_bg omega^4
BELOW_ROUNDOFF = {"oversample_omega": {"water"}}
DMIN = 50.0


def _exp(name):
    return parse_nanobragg_args(CONFIGS[name].split(), warn=lambda m: None).experiment


def _weights(name, exp, seed):
    """Random weights; zero on pixels whose resolution lies near the -dmin cut."""
    model = build_model(exp, warn=lambda m: None)
    w = np.random.default_rng(seed).uniform(0.5, 1.5, model.shape)
    if name == "dmin":
        det = model.detector
        s, f = np.mgrid[0:model.shape[0], 0:model.shape[1]]
        pos = (det.pix0[None, None, :] + ((f[..., None] + 0.5) * det.fdet + (s[..., None] + 0.5) * det.sdet)
               * det.pixel)
        d = pos / np.linalg.norm(pos, axis=-1, keepdims=True)
        q = (d - det.beam) / model.wavelength
        resolution = 1e10 / np.linalg.norm(q, axis=-1)     # Angstrom
        near = np.abs(resolution - DMIN) < 1.0
        assert near.any() and (resolution < DMIN - 1.0).any(), "the cut should cross the detector"
        w[near] = 0.0
    return w


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_matches_central_differences_on_more_paths(name):
    exp = _exp(name)
    w = _weights(name, exp, seed=4)
    check = check_gradients(exp, list(SCALAR_PARAMS), upstream=w)
    loss_size = float(np.sum(w * nbragg.simulate(exp).image))
    largest = max(abs(r[1]) for r in check.rows)
    for label, a, num, err, h, sweep in check.rows:
        if label in INACTIVE[name]:
            assert a == 0.0, (label, a)
            continue
        if label in CANCELS.get(name, ()):
            assert abs(a) <= 1e-12 * largest and abs(num) <= 1e-9 * largest, (label, a, num, largest)
            continue
        assert a != 0.0, label
        if label in BELOW_ROUNDOFF.get(name, ()):
            assert abs(a) * h < 1e-13 * loss_size, (label, a, h, loss_size)
            continue
        assert err <= 1e-6, f"{name} {label}: analytic {a:.10e}, best central difference {num:.10e} " \
                            f"({err:.2e})\n" + check.sweep_table()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jacobian_transpose_equals_gradient_on_more_paths(name):
    exp = _exp(name)
    w = _weights(name, exp, seed=6)
    g = gradient(exp, list(SCALAR_PARAMS), w)
    J = jacobian(exp, list(SCALAR_PARAMS))
    jw = J.T @ w.ravel()
    size = np.abs(J).T @ np.abs(w.ravel())
    for i, n in enumerate(SCALAR_PARAMS):
        if n in INACTIVE[name] or n in CANCELS.get(name, ()):
            # no dependence: the adjoint gives 0, the tangent round-off of cancelling terms
            assert abs(jw[i]) <= 1e-12 * size.max(), (name, n, jw[i])
            continue
        assert abs(jw[i] - g[n]) <= 1e-12 * size[i], (name, n, jw[i], g[n], size[i])


def test_dmin_cut_pixels_are_zero_with_zero_gradient():
    """A pixel whose every sample lies beyond -dmin is 0 in nanoBragg (its polarization
    factor is never computed, so even the water background is multiplied by 0); its
    gradient is 0 for every parameter."""
    exp = _exp("dmin")
    img = nbragg.simulate(exp).image
    cut = img == 0.0
    assert cut.any() and not cut.all()
    g = gradient(exp, list(SCALAR_PARAMS), cut.astype(float))
    assert all(v == 0.0 for v in g.values()), g
