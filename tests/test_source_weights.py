"""Per-source weights, a kernel input (``Scene.beam.weights``, one per source) with its
derivative.  nanoBragg.c gives every source the same weight, so the set-up makes them all
1 and every other test checks that this changes nothing; here they are set on the scene
directly: the image is linear in them, the adjoint's cotangent matches central
differences, and the tangent kernel's J^T u matches the adjoint."""

import dataclasses

import numpy as np
import pytest

from nbragg.engine import adjoint_image, build_model, render, tangent_image
from nbragg.kernels.scene import field_slice, flatten
from nbragg.nbargs import parse_nanobragg_args

BASE = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
        "-detpixels 8 -oversample 1 -polar 0.3 -dispersion 4 -dispsteps 3")

CONFIGS = {
    "fast_square": BASE,                                   # the vectorised block paths
    "round_xtal": BASE + " -round_xtal",                   # the general block paths
    "oversample_omega": BASE.replace("-oversample 1", "-oversample 2") + " -oversample_omega",
    "water": BASE + " -water 0.05",
}


def _model(name):
    exp = parse_nanobragg_args(CONFIGS[name].split(), warn=lambda m: None).experiment
    return build_model(exp, warn=lambda m: None)


def _weighted(model, weights):
    beam = model.scene.beam._replace(weights=np.asarray(weights, dtype=np.float64))
    return dataclasses.replace(model, scenes=tuple(S._replace(beam=beam) for S in model.scenes))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_source_weights_gradient(name):
    model = _model(name)
    nsrc = model.scene.beam.sources.shape[0]
    assert nsrc == 3
    w0 = np.array([0.7, 1.3, 0.4])
    m = _weighted(model, w0)
    u = np.random.default_rng(5).uniform(0.5, 1.5, model.shape)

    # the image is affine in the weights: I_bg and sum_s w_s T_s (with -oversample_omega
    # each running sum is multiplied by omega, which keeps it affine)
    image = render(m)[0]
    parts = [render(_weighted(model, np.eye(nsrc)[s]))[0] for s in range(nsrc)]
    bg = render(_weighted(model, np.zeros(nsrc)))[0]
    np.testing.assert_allclose(image, bg + sum(w0[s] * (parts[s] - bg) for s in range(nsrc)),
                               rtol=1e-12, atol=1e-12 * image.max())

    # the adjoint's cotangent of the weights against central differences
    g, _, _ = adjoint_image(m, u)
    gw = g[field_slice(m.layout, "weights")]
    assert np.all(gw != 0.0)
    scale = np.sum(np.abs(u * image))
    for s in range(nsrc):
        h = 0.25
        plus, minus = w0.copy(), w0.copy()
        plus[s] += h
        minus[s] -= h
        num = (np.sum(u * render(_weighted(model, plus))[0]) - np.sum(u * render(_weighted(model, minus))[0])) / (2 * h)
        # affine in each weight: the central difference is exact up to the rounding of
        # the two sums it subtracts (about 1e-16 of them each, over 2h)
        assert abs(gw[s] - num) <= 1e-9 * abs(num) + 1e-14 * scale / h, (s, gw[s], num)

    # the tangent kernel along each weight: J^T u = the adjoint's cotangent
    d = np.array([flatten(m.layout, {"weights": np.eye(nsrc)[s]}) for s in range(nsrc)])
    J, timage = tangent_image(m, d)
    for s in range(nsrc):
        assert abs(np.sum(u * J[..., s]) - gw[s]) <= 1e-12 * abs(gw[s])
    np.testing.assert_allclose(timage, image, rtol=1e-14)
