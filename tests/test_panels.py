"""Detectors as lists of panels: the drivers loop over panels, the kernels read one panel's
det block at a time, and derivatives hold the det fields once per panel.

Two ways to cut nanoBragg's one panel into three:
* by ROI: three copies of the panel, each rendering a band of rows.  Every pixel is then
  computed exactly as on the one panel, so images and Jacobians agree bit for bit;
* by moving the origin: three panels of four rows each, as a real multi-module detector
  is built.  The pixel positions are then sums in another order, so the images agree to
  rounding.
"""

import dataclasses

import numpy as np
import pytest

from conftest import rows_as_panels
from nbragg.engine import adjoint_image, build_model, compute_stats, render, tangent_image
from nbragg.gradients import jacobian
from nbragg.kernels.scene import field_slice, flatten
from nbragg.models.detector import nanobragg_panels
from nbragg.nbargs import parse_nanobragg_args
from nbragg.params import SCALAR_PARAMS, input_tangent

ARGS = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
        "-detpixels 12 -oversample 2 -water 0.01 -polar 0.3 -hdivrange 2 -hdivsteps 2 -detector_rotx 2 "
        "-twotheta 3")
NAMES = [n for n in SCALAR_PARAMS if n not in ("mosaic_spread", "osc")]   # one domain, one phi step


def _exp():
    return parse_nanobragg_args(ARGS.split(), warn=lambda m: None).experiment


def by_roi(geom):
    (panel,) = nanobragg_panels(geom)
    return [dataclasses.replace(panel, roi=(0, 11, 4 * k, 4 * k + 3)) for k in range(3)]


by_origin = rows_as_panels(3)


@pytest.fixture(scope="module")
def models():
    exp = _exp()
    return build_model(exp), build_model(exp, panels=by_roi), build_model(exp, panels=by_origin)


def test_images(models):
    one, roi, origin = models
    image = render(one)[0]
    assert image.shape == (12, 12)
    r, o = render(roi)[0], render(origin)[0]
    assert r.shape == (3, 12, 12) and o.shape == (3, 4, 12)
    assert np.array_equal(r.sum(axis=0), image)
    np.testing.assert_allclose(o.reshape(12, 12), image, rtol=1e-12)
    # statistics over all panels: the same pixels, sums in another order
    s1, s3 = compute_stats(one, image, 0.0), compute_stats(origin, o, 0.0)
    assert s3.pixels == s1.pixels and (s3.max_I_panel, s3.max_I_slow + 4 * s3.max_I_panel) == (
        s1.max_I_slow // 4, s1.max_I_slow) and s3.max_I_fast == s1.max_I_fast
    assert s3.mean == pytest.approx(s1.mean, rel=1e-12) and s3.rms == pytest.approx(s1.rms, rel=1e-12)


def test_layout_holds_the_det_fields_once_per_panel(models):
    one, roi, origin = models
    L1, L3 = one.layout, origin.layout
    assert (L3.panels, L3.det_size) == (3, L1.det_size)
    assert L3.size == L1.size + 2 * L1.det_size
    t = input_tangent(origin, "twotheta")    # a rotation moves each panel its own way
    moves = [t[field_slice(L3, "pix0", p)] for p in range(3)]
    assert all(np.any(m != 0) for m in moves) and not np.array_equal(moves[0], moves[1])


def _upstream(model, u):
    """u (12, 12) on a model: by origin, each panel's rows; by ROI, each panel's band."""
    if model.shape == (3, 4, 12):
        return u.reshape(model.shape)
    out = np.zeros((3, 12, 12))
    for k in range(3):
        out[k, 4 * k:4 * k + 4] = u[4 * k:4 * k + 4]
    return out


def test_named_derivatives_match_one_panel(models):
    one, roi, origin = models
    J1 = jacobian(_exp(), NAMES)
    u = np.random.default_rng(2).uniform(0.5, 1.5, (12, 12))
    g1 = np.array([input_tangent(one, n) for n in NAMES]) @ adjoint_image(one, u)[0]
    for model in (roi, origin):
        d = np.array([input_tangent(model, n) for n in NAMES])
        J, image = tangent_image(model, d)
        up = _upstream(model, u)
        g = d @ adjoint_image(model, up)[0]
        if model is roi:
            assert np.array_equal(J.sum(axis=0).reshape(-1, len(NAMES)), J1)
        else:
            # positions summed in another order: about 1e-13 of each column's largest entry
            assert np.all(np.abs(J.reshape(-1, len(NAMES)) - J1) <= 1e-11 * np.abs(J1).max(axis=0))
        np.testing.assert_allclose(g, g1, rtol=1e-11)
        # J^T u = the adjoint's contraction
        np.testing.assert_allclose((up[..., None] * J).reshape(-1, len(NAMES)).sum(axis=0), g, rtol=1e-12)


def test_one_panels_own_geometry(models):
    """Moving one panel: its det cotangent against central differences, and J^T u."""
    _, _, origin = models
    u = np.random.default_rng(4).uniform(0.5, 1.5, origin.shape)
    g = adjoint_image(origin, u)[0]
    for p in range(3):
        for j in range(3):
            h = 1e-7
            vals = []
            for sign in (1, -1):
                det = origin.scenes[p].det
                pix0 = det.pix0.copy()
                pix0[j] += sign * h
                scenes = list(origin.scenes)
                scenes[p] = scenes[p]._replace(det=det._replace(pix0=pix0))
                vals.append(np.sum(u * render(dataclasses.replace(origin, scenes=tuple(scenes)))[0]))
            num = (vals[0] - vals[1]) / (2 * h)
            ana = g[field_slice(origin.layout, "pix0", p)][j]
            assert ana == pytest.approx(num, rel=1e-5), (p, j, ana, num)
        e = np.zeros((3, 3))
        e[p, 0] = 1.0
        J, _ = tangent_image(origin, flatten(origin.layout, {"pix0": e})[None])
        assert np.sum(u * J[..., 0]) == pytest.approx(g[field_slice(origin.layout, "pix0", p)][0], rel=1e-12)
        assert not np.any(np.delete(J[..., 0], p, axis=0))    # the other panels do not move
