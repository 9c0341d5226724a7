"""Detectors given as panels (Detector.panels) and a hierarchy of rigid groups
(Detector.groups): tiles against the one panel they cover, group motions against
geometry built by hand, and the derivatives of panel and group shifts and rotations."""

import importlib.util

import numpy as np
import pytest

import nbragg
from nbragg import Panel, PanelGroup
from nbragg.engine import build_model
from nbragg.errors import ParameterError
from nbragg.gradients import check_gradients

ARGS = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
        "-detpixels 12 -oversample 2 -polar 0.3 -detector_rotx 2 -twotheta 3 -detector_thick 300 "
        "-detector_thickstep 150 -detector_abs 200 -water 0.01 -hdivrange 2 -hdivsteps 2")
PIXEL = 0.4


def _one_panel(args=ARGS):
    return nbragg.Experiment.from_nanobragg_args(args.split(), warn=lambda m: None)


def _tiles(exp, rows=4, **kw):
    """Panels of ``rows`` rows each that cover nanoBragg's one panel exactly."""
    g = build_model(exp, warn=lambda m: None).detector
    n = g.spixels // rows
    sensor = dict(thickness=0.3, mu=5.0, thicksteps=2)
    sensor.update(kw)
    return [Panel(origin=tuple(g.pix0 * 1000 + rows * k * PIXEL * g.sdet), fast_axis=tuple(g.fdet),
                  slow_axis=tuple(g.sdet), image_size=(g.fpixels, rows), pixel_size=PIXEL, name=f"tile{k}",
                  **sensor) for k in range(n)]


def _tiled(exp, groups=None, **kw):
    return exp.replace(detector=exp.detector.replace(panels=_tiles(exp, **kw), groups=groups))


@pytest.fixture(scope="module")
def one():
    exp = _one_panel()
    return exp, nbragg.simulate(exp, warn=lambda m: None)


def test_tiles_give_the_panel(one):
    exp, ref = one
    r = nbragg.simulate(_tiled(exp), warn=lambda m: None)
    assert r.image.shape == (3, 4, 12)
    assert r.panels == ("tile0", "tile1", "tile2")
    np.testing.assert_allclose(r.image.reshape(12, 12), ref.image, rtol=1e-12, atol=0)
    # statistics over every panel: the same pixels
    assert r.stats.pixels == ref.stats.pixels
    assert r.stats.max_I == pytest.approx(ref.stats.max_I, rel=1e-12)
    assert r.stats.max_I_panel * 4 + r.stats.max_I_slow == ref.stats.max_I_slow


def test_tiles_in_single_precision(one):
    # in float32 the tiles' corners round differently from the one panel's sums: both
    # images are as far from the float64 one
    exp, ref = one
    one32 = nbragg.simulate(exp, warn=lambda m: None, precision="float32").image
    tiles32 = nbragg.simulate(_tiled(exp), warn=lambda m: None, precision="float32").image.reshape(12, 12)
    err_one = np.abs(one32 - ref.image).max()
    assert 0 < np.abs(tiles32 - ref.image).max() <= 3 * err_one
    assert np.corrcoef(tiles32.ravel(), ref.image.ravel())[0, 1] > 0.99999


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
def test_tiles_on_cuda():
    # small enough for the simulator: 6 x 6 pixels, one sample each
    args = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
            "-detpixels 6 -oversample 1 -polar 0.3 -detector_rotx 2")
    exp = _one_panel(args)
    ref = nbragg.simulate(exp, warn=lambda m: None)
    tiled = _tiled(exp, rows=3, thickness=0.0)
    r = nbragg.simulate(tiled, warn=lambda m: None, backend="cuda")
    np.testing.assert_allclose(r.image.reshape(6, 6), ref.image, rtol=1e-12, atol=0)
    np.testing.assert_allclose(r.image, nbragg.simulate(tiled, warn=lambda m: None).image, rtol=1e-12, atol=0)
    # the geometry's derivatives on the GPU equal the CPU's
    tiled = nbragg.set_params(tiled, {"panel_rot_z[1]": 0.2})
    names = ["panel_shift_x[0]", "panel_rot_z[1]", "panel_shift_z[1]"]
    w = np.random.default_rng(2).uniform(0.5, 1.5, r.image.shape)
    g_cpu = nbragg.gradient(tiled, names, w)
    g_gpu = nbragg.gradient(tiled, names, w, backend="cuda")
    for n in names:
        assert g_gpu[n] == pytest.approx(g_cpu[n], rel=1e-12, abs=1e-12 * max(map(abs, g_cpu.values())))


def test_no_attenuation_means_no_sensor_model(one):
    exp, _ = one
    bare = nbragg.simulate(_tiled(exp, thickness=0.0), warn=lambda m: None).image
    thick_no_mu = nbragg.simulate(_tiled(exp, mu=0.0), warn=lambda m: None).image   # mu = 0: no division by 0
    assert np.all(np.isfinite(thick_no_mu)) and np.array_equal(bare, thick_no_mu)
    with_sensor = nbragg.simulate(_tiled(exp), warn=lambda m: None).image
    assert np.all(with_sensor < bare)


def _rotation(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def test_group_motion_equals_moved_panels(one):
    """A group turned about its own normal and shifted gives the image of panels placed
    there by hand (a rotation matrix built independently of the package)."""
    exp, _ = one
    tiles = _tiles(exp)
    centre = np.array(tiles[1].origin) + 6 * PIXEL * np.array(tiles[1].fast_axis)
    fast, slow = np.array(tiles[0].fast_axis), np.array(tiles[0].slow_axis)
    normal = np.cross(fast, slow)
    group = PanelGroup(children=(PanelGroup(children=(1, 2), name="lower", origin=tuple(centre),
                                            fast_axis=tuple(fast), slow_axis=tuple(slow),
                                            rotation=(0.0, 0.0, 1.5), shift=(0.1, -0.2, 0.05)), 0))
    moved = nbragg.simulate(_tiled(exp, groups=group), warn=lambda m: None).image
    R = _rotation(normal, 1.5)
    by_hand = [t if i == 0 else t.replace(origin=tuple(centre + R @ (np.array(t.origin) - centre) + [0.1, -0.2, 0.05]),
                                          fast_axis=tuple(R @ fast), slow_axis=tuple(R @ slow))
               for i, t in enumerate(tiles)]
    ref = nbragg.simulate(exp.replace(detector=exp.detector.replace(panels=by_hand)), warn=lambda m: None).image
    np.testing.assert_allclose(moved, ref, rtol=1e-11, atol=1e-12 * ref.max())
    assert not np.allclose(moved[1:], nbragg.simulate(_tiled(exp), warn=lambda m: None).image[1:], rtol=1e-3)


GEOMETRY = ["panel_shift_x[0]", "panel_shift_z[tile1]", "panel_rot_x[2]", "panel_rot_z[1]",
            "group_shift_y[lower]", "group_rot_y[lower]", "group_rot_z[root]", "group_shift_z[root]"]


def _grouped(exp):
    tiles = _tiles(exp)
    lower = PanelGroup(children=(1, 2), name="lower", origin=tiles[1].origin, fast_axis=tiles[1].fast_axis,
                       slow_axis=tiles[1].slow_axis)
    root = PanelGroup(children=(0, lower), origin=tiles[0].origin, fast_axis=tiles[0].fast_axis,
                      slow_axis=tiles[0].slow_axis)
    e = _tiled(exp, groups=root)
    # away from 0, so that each derivative is taken where the motions compose
    return nbragg.set_params(e, {"group_rot_y[lower]": 0.2, "panel_rot_z[1]": -0.3, "group_shift_z[root]": 0.4})


def test_geometry_gradients_match_central_differences(one):
    exp = _grouped(one[0])
    res = check_gradients(exp, GEOMETRY)
    assert res.max_error < 1e-6, res.sweep_table()


def test_geometry_jacobian_equals_gradient(one):
    exp = _grouped(one[0])
    J, image = nbragg.jacobian(exp, GEOMETRY, return_image=True)
    assert image.shape == (3, 4, 12) and J.shape == (image.size, len(GEOMETRY))
    w = np.random.default_rng(3).uniform(0.5, 1.5, image.shape)
    g = nbragg.gradient(exp, GEOMETRY, w)
    scale = max(abs(v) for v in g.values())
    for k, n in enumerate(GEOMETRY):
        assert float(w.ravel() @ J[:, k]) == pytest.approx(g[n], rel=1e-10, abs=1e-12 * scale)


def test_parameter_names_and_errors(one):
    exp = _grouped(one[0])
    v = nbragg.get_params(exp, ["group_rot_y[root/1]", "group_rot_y[lower]", "panel_rot_z[tile1]"])
    assert v == {"group_rot_y[root/1]": 0.2, "group_rot_y[lower]": 0.2, "panel_rot_z[tile1]": -0.3}
    e = nbragg.set_params(exp, {"panel_shift_x[tile2]": 0.25, "group_rot_x[root]": 0.1})
    assert e.detector.panels[2].shift == (0.25, 0.0, 0.0) and e.detector.groups.rotation == (0.1, 0.0, 0.0)
    assert exp.detector.panels[2].shift == (0.0, 0.0, 0.0)
    for name, text in [("panel_shift_x[7]", "no panel '7'"), ("group_rot_z[upper]", "no group 'upper'"),
                       ("distance", "Detector.panels"), ("panel_shift_w[0]", "unknown parameter")]:
        with pytest.raises(ParameterError, match=text):
            nbragg.get_params(exp, [name])
    with pytest.raises(ParameterError, match="no hierarchy"):
        nbragg.get_params(_tiled(one[0]), ["group_rot_z[root]"])


def test_bad_panels_are_refused(one):
    exp, _ = one
    tiles = _tiles(exp)
    d = exp.detector
    with pytest.raises(ParameterError, match="differ in image size"):
        d.replace(panels=[tiles[0], tiles[1].replace(image_size=(12, 5))])
    with pytest.raises(ParameterError, match="square"):
        Panel(pixel_size=(0.1, 0.2))
    with pytest.raises(ParameterError, match="parallel"):
        Panel(fast_axis=(1, 0, 0), slow_axis=(2, 0, 0))
    with pytest.raises(ParameterError, match="names panel 5"):
        d.replace(panels=tiles, groups=PanelGroup(children=(0, 5)))
    with pytest.raises(ParameterError, match="more than once"):
        d.replace(panels=tiles, groups=PanelGroup(children=(0, PanelGroup(children=(0, 1)))))
    with pytest.raises(ParameterError, match="Detector.roi is given with Detector.panels"):
        d.replace(panels=tiles, roi=(0, 3, 0, 3))
    through = tiles[0].replace(origin=(0.0, 0.0, 0.0))
    with pytest.raises(ParameterError, match="passes through the sample"):
        build_model(exp.replace(detector=d.replace(panels=[through])))


def test_panel_mask_and_roi(one):
    exp, _ = one
    tiles = _tiles(exp)
    tiles[0] = tiles[0].replace(mask=((2, 1, 5, 3),))   # f 2..4, s 1..2
    tiles[2] = tiles[2].replace(roi=(0, 5, 0, 1))
    img = nbragg.simulate(exp.replace(detector=exp.detector.replace(panels=tiles)), warn=lambda m: None).image
    full = nbragg.simulate(_tiled(exp), warn=lambda m: None).image
    expect = full.copy()
    expect[0, 1:3, 2:5] = 0
    expect[2, :, 6:] = 0
    expect[2, 2:, :] = 0
    np.testing.assert_array_equal(img, expect)


def _quadrants(side=96, pixel=0.1, distance=50.0, gap=1.0):
    """Four panels around the beam (along -z), each in its own group: a small
    four-quadrant detector in DIALS's frame."""
    panels, groups = [], []
    half = side * pixel
    for k, (sx, sy) in enumerate([(-1, 1), (1, 1), (-1, -1), (1, -1)]):
        # corner of pixel (0, 0): fast along +x, slow along -y
        x0 = -half - gap / 2 if sx < 0 else gap / 2
        y0 = half + gap / 2 if sy > 0 else -gap / 2
        origin = (x0, y0, -distance)
        panels.append(Panel(origin=origin, fast_axis=(1, 0, 0), slow_axis=(0, -1, 0), image_size=(side, side),
                            pixel_size=pixel, name=f"P{k}"))
        centre = (x0 + half / 2, y0 - half / 2, -distance)
        groups.append(PanelGroup(children=(k,), name=f"Q{k}", origin=centre, fast_axis=(1, 0, 0),
                                 slow_axis=(0, -1, 0)))
    root = PanelGroup(children=tuple(groups), name="detector", origin=(0, 0, -distance), fast_axis=(1, 0, 0),
                      slow_axis=(0, -1, 0))
    return panels, root


def test_refinement_recovers_a_moved_quadrant():
    """One quadrant shifted 0.2 mm and turned 0.1 degree: refinement against a noisy
    still finds it within 3 reported standard uncertainties."""
    from nbragg.noise import poisson_image
    panels, root = _quadrants()
    exp = nbragg.Experiment(
        beam=nbragg.Beam(wavelength=1.0, fluence=1e28),
        detector=nbragg.Detector(convention="custom", beam_vector=(0, 0, -1), polar_vector=(1, 0, 0),
                                 spindle_axis=(1, 0, 0), panels=panels, groups=root),
        crystal=nbragg.Crystal(cell=(30, 32, 34, 90, 90, 90), misset=(12, 21, 33), Na=8, Nb=8, Nc=8),
        structure=nbragg.Structure(default_F=100), sampling=nbragg.Sampling(oversample=2))
    names = ["group_shift_x[Q1]", "group_shift_y[Q1]", "group_rot_z[Q1]"]
    truth = {"group_shift_x[Q1]": 0.2, "group_shift_y[Q1]": -0.1, "group_rot_z[Q1]": 0.1}
    true_exp = nbragg.set_params(exp, truth)
    photons = nbragg.simulate(true_exp, warn=lambda m: None).image
    assert photons.shape == (4, 96, 96) and photons[1].max() > 500
    observed = poisson_image(photons, np.random.default_rng(7))
    fit = nbragg.refine(exp, observed, names, loss="poisson")
    assert fit.success, fit.message
    for n in names:
        assert abs(fit.values[n] - truth[n]) <= 3 * fit.uncertainties[n], fit.table()
        assert fit.uncertainties[n] < abs(truth[n]) / 3, fit.table()


def test_panels_against_the_numpy_reference():
    """Turned, shifted and grouped panels with a sensor, a mask and an ROI: the kernel
    against the slow numpy reference (tests/reference.py) to 1e-12."""
    from reference import reference_image
    args = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
            "-detpixels 8 -oversample 2 -polar 0.3")
    exp = _one_panel(args)
    tiles = _tiles(exp, rows=4)
    tiles[0] = tiles[0].replace(mask=((2, 1, 5, 3),))
    tiles[1] = tiles[1].replace(roi=(1, 6, 0, 2), rotation=(0.0, 0.0, 2.0), shift=(0.3, -0.2, 0.1))
    group = PanelGroup(children=(0, PanelGroup(children=(1,), name="g", origin=tiles[1].origin,
                                               fast_axis=tiles[1].fast_axis, slow_axis=tiles[1].slow_axis,
                                               rotation=(1.0, -0.5, 0.0))))
    e = exp.replace(detector=exp.detector.replace(panels=tiles, groups=group))
    model = build_model(e, warn=lambda m: None)
    image = nbragg.simulate(e, warn=lambda m: None).image
    ref = reference_image(model)
    assert image.shape == ref.shape == (2, 4, 8)
    np.testing.assert_allclose(image, ref, rtol=1e-12, atol=1e-12 * ref.max())
    assert image[0, 1:3, 2:5].max() == 0 and image[1, 3:, :].max() == 0
