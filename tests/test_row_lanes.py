"""The forward kernel's row path (pixels of a row as vector lanes) against the pixel walk.

``_forward_row_lanes`` is the walk's forward mode with the sample loop outside and the
pixel loop inside; it must give the walk's values bit for bit, in float64 and in the
single-precision twin, for every quirk it mirrors (first-sample factors, -dmin, layers,
sources, orientation counts around the 8-wide sum, a structure-factor grid, masks)."""

import numpy as np
import pytest

import nbragg
from nbragg.engine import build_model
from nbragg.kernels import cpu as K
from nbragg.kernels import tangent as T
from nbragg.kernels.precision import cpu_single
from nbragg.kernels.scene import FIELDS, as_single, field_slice

BASE = "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 60 -pixel 0.4 -detpixels 24"

CASES = {
    "still": "",
    "mosaic 30 orientations, oversample 2": "-mosaic 1 -mosaic_dom 10 -phi 0 -osc 1 -phisteps 3 -oversample 2",
    "9 orientations": "-mosaic 1 -mosaic_dom 9",
    "17 orientations, sources": "-mosaic 1 -mosaic_dom 17 -divergence 0.3 -divsteps 2 -dispersion 1 -dispsteps 2",
    "layers, dmin, Kahn factor, ROI and mask": "-detector_thick 100 -detector_abs 300 -detector_thicksteps 3 "
                                              "-dmin 13.5 -polar 0.8 -oversample 2 -roi 2 20 1 22",
    "curved, point pixel, no polarization": "-curved_det -point_pixel -nopolar -mosaic 0.5 -mosaic_dom 3",
    "B factor, off-centre beam, water": "-Xbeam 3 -Ybeam 7 -twotheta 10 -mosaic 1 -mosaic_dom 5 -water 50",
    # -dmin cuts some sources' samples and not others: the polarization is taken at the
    # first kept one
    "dmin across sources, Kahn factor": "-dmin 13.5 -divergence 0.3 -divsteps 2 -dispersion 8 -dispsteps 3 "
                                        "-polar 0.6 -oversample 2",
    "weighted spectrum": "-mosaic 1 -mosaic_dom 3",
}


def _model(extra, tmp_path, grid=False, B_iso=0.0, spectrum=None):
    return build_model(_experiment(extra, tmp_path, grid, B_iso, spectrum), warn=lambda m: None)


def _experiment(extra, tmp_path, grid=False, B_iso=0.0, spectrum=None):
    exp = nbragg.Experiment.from_nanobragg_args((BASE + " " + extra).split(), warn=lambda m: None)
    if grid:
        hkl = tmp_path / "F.hkl"
        rng = np.random.default_rng(3)
        hkl.write_text("".join(f"{h} {k} {l} {rng.uniform(10, 200):.3f}\n"
                               for h in range(-6, 5) for k in range(-3, 7) for l in range(-5, 6)))
        exp = nbragg.Experiment.from_nanobragg_args((BASE + " " + extra + f" -hkl {hkl}").split(),
                                                    warn=lambda m: None)
    exp = exp.replace(structure=exp.structure.replace(B_iso=B_iso))
    if spectrum is not None:
        exp = exp.replace(beam=exp.beam.replace(spectrum=spectrum))
    return exp


def _case(name, grid, tmp_path):
    """(model, scene) of case ``name`` (the scene masked where the name says so)."""
    model = _model(CASES[name], tmp_path, grid, B_iso=8.0 if "B factor" in name else 0.0,
                   spectrum=((0.98, 1.0, 1.03), (1.0, 3.0, 0.5)) if "spectrum" in name else None)
    S = model.scene
    if "mask" in name:
        S = _mask(S)
    assert K.derivative_row_path(S)
    return model, S


def _mask(S):
    mask = np.ones((S.det.spixels, S.det.fpixels), np.uint8)
    mask[::5, 1::3] = 0
    return S._replace(det=S.det._replace(mask=mask, use_mask=True))


@pytest.mark.parametrize("single", [False, True], ids=["float64", "float32"])
@pytest.mark.parametrize("grid", [False, True], ids=["default_F", "grid"])
@pytest.mark.parametrize("name", list(CASES))
def test_row_lanes_equal_the_walk(name, grid, single, tmp_path):
    model, S = _case(name, grid, tmp_path)
    lanes_image = _check_forward_lanes(S, single)
    if "mask" in name:
        # masked and out-of-ROI pixels untouched (by both: the byte comparison above)
        assert (lanes_image[S.det.mask == 0] == -1.0).all()
    if "spectrum" in name:
        assert len(set(model.scene.beam.weights)) == 3      # unequal source weights
    if "dmin" in name:
        # the cut is active: some pixels keep only part of their samples
        uncut = build_model(nbragg.Experiment.from_nanobragg_args(
            (BASE + " " + CASES[name].replace("-dmin 13.5", "")).split(), warn=lambda m: None),
            warn=lambda m: None)
        assert not np.array_equal(nbragg.engine.render(uncut)[0], nbragg.engine.render(model)[0])


# an amorphous background (nonBragg's term) on the row lanes: its factors taken at every
# sample, two materials' tables (water's evenly spaced, ice's not), with and without Bragg
# terms; nearer and at a shorter wavelength than BASE, so that the outer pixels reach
# sin(theta)/lambda 0.128, below which ice's table is zero
AMORPHOUS_GEOMETRY = "-distance 20 -lambda 0.7"
AMORPHOUS_CASES = {
    "mosaic": "-mosaic 1 -mosaic_dom 5",
    "structure-factor grid, ROI and mask": "-mosaic 1 -mosaic_dom 3 -roi 2 20 1 22",
    "layers, Kahn factor, sources, dmin, oversample 2": "-detector_thick 100 -detector_abs 300 -detector_thicksteps 3 "
                                                        "-polar 0.8 -divergence 0.3 -divsteps 2 -dispersion 1 "
                                                        "-dispsteps 2 -dmin 13.5 -oversample 2",
    "curved, point pixel, no polarization, B factor": "-curved_det -point_pixel -nopolar",
    "curved, Kahn factor, sources, layers, oversample 2": "-curved_det -polar 0.7 -oversample 2 -divergence 0.3 "
                                                          "-divsteps 2 -detector_thick 100 -detector_abs 300 "
                                                          "-detector_thicksteps 2",
    "no Bragg terms (default F 0)": "-oversample 2",
    "no Bragg terms, every sub-pixel's factors, layers": "-oversample 2 -oversample_omega -oversample_thick "
                                                         "-oversample_polar -detector_thick 100 -detector_abs 300 "
                                                         "-detector_thicksteps 2",
}


@pytest.mark.parametrize("single", [False, True], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(AMORPHOUS_CASES))
def test_row_lanes_with_an_amorphous_background_equal_the_walk(name, single, tmp_path):
    exp, model, S = _amorphous_case(name, tmp_path)
    assert K.forward_row_path(S)
    assert K.derivative_row_path(S) == S.samp.bragg
    assert S.fhkl.has_hkls == ("grid" in name)
    assert S.samp.bragg == ("no Bragg" not in name)
    image = _check_forward_lanes(S, single)
    # the background is there (in float64): the image differs from the one without it
    # everywhere, and from water's alone on the outer pixels (ice's signed F^2 is
    # negative at places)
    written = image != -1.0
    if not single:
        assert np.all(image[written] != _lanes_image(exp.replace(background=[]), name)[written])
        iced = image[written] != _lanes_image(exp.replace(background=exp.background[:1]), name)[written]
        assert 10 < iced.sum() < written.sum()
    if "mask" in name:
        assert (image[S.det.mask == 0] == -1.0).all() and written.sum() > 100


@pytest.mark.parametrize("name", [n for n in AMORPHOUS_CASES if "no Bragg" not in n])
def test_tangent_row_lanes_with_an_amorphous_background_agree_with_the_walk(name, tmp_path):
    """The tangent's row lanes take the amorphous background in loops over the lanes
    (tangent._amorphous_lanes_tangent): the image the forward's bit for bit, the
    derivatives the walk's to rounding (every input field moved, the materials' amounts
    among them)."""
    _, model, S = _amorphous_case(name, tmp_path)
    assert K.derivative_row_path(S)
    kL = model.kernel_layout
    assert field_slice(kL, "bg_amount").stop - field_slice(kL, "bg_amount").start == 2
    _check_tangent_lanes(model, S)


@pytest.mark.parametrize("name", [n for n in AMORPHOUS_CASES if "no Bragg" not in n])
def test_adjoint_row_lanes_with_an_amorphous_background_agree_with_the_per_pixel_sweep(name, tmp_path):
    """The adjoint's row lanes take the amorphous background in loops over the lanes
    (adjoint._amorphous_lanes_vjp, its direction's and distance's gradients pushed with
    the lanes'): every partial the per-pixel sweep's to rounding, the materials' amounts
    among them."""
    _, model, S = _amorphous_case(name, tmp_path)
    assert K.derivative_row_path(S)
    g = _check_adjoint_lanes(model, S, cut="dmin" in name)
    amounts = g[field_slice(model.kernel_layout, "bg_amount")]
    assert amounts.shape == (2,) and np.all(amounts != 0.0)


def _lanes_image(exp, name):
    """The forward's row lanes' image of ``exp`` (masked where the name says so)."""
    S = build_model(exp, warn=lambda m: None).scene
    if "mask" in name:
        S = _mask(S)
    image = np.full((S.det.spixels, S.det.fpixels), -1.0)
    K.forward(*S, 0, S.det.spixels, image, np.zeros(S.det.spixels), True)
    return image


def _amorphous_case(name, tmp_path):
    """(experiment, model, scene) of AMORPHOUS_CASES[name], with water and ice."""
    exp = _experiment(AMORPHOUS_GEOMETRY + " " + AMORPHOUS_CASES[name], tmp_path, grid="grid" in name,
                      B_iso=8.0 if "B factor" in name else 0.0)
    background = [nbragg.Material("water", thickness=0.1), nbragg.Material("ice", thickness=0.05, scale=0.5)]
    exp = exp.replace(background=background)
    if "no Bragg" in name:
        exp = exp.replace(structure=exp.structure.replace(default_F=0.0))
    model = build_model(exp, warn=lambda m: None)
    S = model.scene
    if "mask" in name:
        S = _mask(S)
    return exp, model, S


@pytest.mark.parametrize("single", [False, True], ids=["float64", "float32"])
def test_amorphous_lanes_equal_amorphous_sum(single):
    """The row lanes' tables (physics.amorphous_lanes) against the walk's
    (physics.amorphous_sum), bit for bit, at sin(theta)/lambda below, at, between and past
    every material's rows: five tables, water's evenly spaced (its rows found at once), ice's
    not (found by search), both branches taken."""
    from nbragg.kernels import physics
    from nbragg.kernels.precision import cpu_single
    exp = nbragg.Experiment.from_nanobragg_args(BASE.split(), warn=lambda m: None)
    names = ["water", "ice", "nanoice", "air", "helium"]
    rng = np.random.default_rng(4)
    exp = exp.replace(background=[nbragg.Material(n, scale=rng.uniform(0.5, 2)) for n in names])
    S = build_model(exp, warn=lambda m: None).scene
    lanes, total = physics.amorphous_lanes, physics.amorphous_sum
    if single:
        S = as_single(S)
        lanes, total = cpu_single(lanes), cpu_single(total)
    dtype = np.float32 if single else np.float64
    xs = S.samp.bg_stol.astype(np.float64)
    stol = np.concatenate([np.linspace(0.0, 1.1 * xs.max(), 3001), xs, 0.5 * (xs[1:] + xs[:-1]), [-1.0]]).astype(dtype)
    n = stol.size
    weight = rng.uniform(0.5, 1.5, n).astype(dtype)
    bg = rng.uniform(0, 1, n)
    want = np.array([b + np.float64(w) * total(S.samp, x) for b, w, x in zip(bg, weight, stol)])
    redo = np.zeros(n, dtype=np.bool_)
    lanes(S.samp, stol, weight, bg, redo, n)
    assert bg.tobytes() == want.tobytes()
    # which lanes the last table (helium's, evenly spaced) searched for, and ice's alone
    assert 0 < redo.sum() < n / 4
    ice = S._replace(samp=S.samp._replace(bg_start=S.samp.bg_start[1:3].copy(), bg_amount=S.samp.bg_amount[1:2].copy()))
    lanes(ice.samp, stol, weight, bg, redo, n)
    assert n / 4 < redo.sum() < n


def test_amorphous_grad_lanes_agree_with_amorphous_F_grad():
    """The derivatives' row lanes' tables (physics.amorphous_grad_lanes) against the walk's
    amorphous_F_grad lane by lane, on amorphous_lanes' five tables and points, bit for bit:
    each material's sign(F) F^2, their sum and its slope in sin(theta)/lambda (whose closed
    form sums the walk's products in the walk's order)."""
    from nbragg.kernels import physics
    exp = nbragg.Experiment.from_nanobragg_args(BASE.split(), warn=lambda m: None)
    names = ["water", "ice", "nanoice", "air", "helium"]
    rng = np.random.default_rng(4)
    exp = exp.replace(background=[nbragg.Material(n, scale=rng.uniform(0.5, 2)) for n in names])
    samp = build_model(exp, warn=lambda m: None).scene.samp
    xs = samp.bg_stol
    stol = np.concatenate([np.linspace(0.0, 1.1 * xs.max(), 3001), xs, 0.5 * (xs[1:] + xs[:-1]), [-1.0]])
    n = stol.size
    nm = len(names)
    F = np.array([[physics.amorphous_F_grad(samp, m, x) for x in stol] for m in range(nm)])   # (m, lane, 2)
    sF2 = np.where(F[..., 0] < 0, -F[..., 0] * F[..., 0], F[..., 0] * F[..., 0])
    A_want = np.zeros(n)
    dA_want = np.zeros(n)
    for m in range(nm):      # (material by material, as both sum)
        A_want = A_want + samp.bg_amount[m] * sF2[m]
        dA_want = dA_want + samp.bg_amount[m] * 2.0 * np.abs(F[m, :, 0]) * F[m, :, 1]
    A, dA, sq = np.full(n, np.nan), np.full(n, np.nan), np.full((nm, n), np.nan)
    redo = np.zeros(n, dtype=np.bool_)
    physics.amorphous_grad_lanes(samp, stol, A, dA, sq, redo, n)
    assert A.tobytes() == A_want.tobytes()
    assert dA.tobytes() == dA_want.tobytes()
    assert sq.tobytes() == sF2.tobytes()
    assert np.abs(dA).max() > 0 and 0 < redo.sum() < n / 4


def _check_forward_lanes(S, single):
    """The forward's row lanes against its walk, bit for bit (image and solid-angle sums),
    in float64 or its single-precision twin; returns the lanes' image."""
    dtype = np.float32 if single else np.float64
    forward = cpu_single(K.forward) if single else K.forward
    if single:
        S = as_single(S)
    lanes_image = np.full((S.det.spixels, S.det.fpixels), -1.0, dtype)
    lanes_omega = np.zeros(S.det.spixels, dtype)
    forward(*S, 0, S.det.spixels, lanes_image, lanes_omega, True)
    walk_image = np.full_like(lanes_image, -1.0)
    walk_omega = np.zeros_like(lanes_omega)
    forward(*S, 0, S.det.spixels, walk_image, walk_omega, False)
    assert lanes_image.tobytes() == walk_image.tobytes()
    assert lanes_omega.tobytes() == walk_omega.tobytes()
    assert lanes_image.max() > 0
    return lanes_image


def test_row_path_is_taken_for_cheap_images_only_where_it_applies():
    model = _model("", None)
    assert K.derivative_row_path(model.scene) and K.forward_row_path(model.scene)
    # an amorphous background keeps every kernel on the lanes; -oversample_* flags and
    # round spots keep every kernel on the walk where there are Bragg terms
    exp = nbragg.Experiment.from_nanobragg_args(BASE.split(), warn=lambda m: None)
    amorphous = exp.replace(background=[nbragg.Material("water", thickness=0.1)])
    assert K.forward_row_path(build_model(amorphous, warn=lambda m: None).scene)
    assert K.derivative_row_path(build_model(amorphous, warn=lambda m: None).scene)
    for flags in ("-oversample 2 -oversample_omega", "-round_xtal"):
        assert not K.derivative_row_path(_model(flags, None).scene)
        assert not K.forward_row_path(_model(flags, None).scene)


def _tangent_directions(model, rng):
    """One direction per input field (random values in that field alone), and one that
    moves every input at once: each of the tangent's flags on its own, and all together."""
    kL = model.kernel_layout
    norient = model.scene.xtal.orients.shape[0]
    rows = []
    for name in FIELDS:
        sl = field_slice(kL, name)
        if sl.stop <= sl.start:
            continue
        row = np.zeros(kL.size)
        row[sl] = rng.normal(size=sl.stop - sl.start)
        rows.append(row)
    rows.append(rng.normal(size=kL.size))
    d = np.array(rows)
    # the orientations' padding (past the real ones) is not an input
    ori = d[:, kL.orients:kL.orients + 9 * kL.npad].reshape(len(d), 9, kL.npad)
    ori[:, :, norient:] = 0.0
    return d


@pytest.mark.parametrize("grid", [False, True], ids=["default_F", "grid"])
@pytest.mark.parametrize("name", list(CASES))
def test_tangent_row_lanes_agree_with_the_walk(name, grid, tmp_path):
    """The tangent kernel's row lanes against its walk: the image bit for bit (the
    forward's), the derivatives to rounding (they are summed in another order)."""
    model, S = _case(name, grid, tmp_path)
    _check_tangent_lanes(model, S)


def test_tangent_row_lanes_in_chunks_agree_with_the_walk(tmp_path):
    """With many orientations a row is taken in chunks of pixels (their per-orientation
    sums within cpu.LANE_PARTIALS): here 200 orientations, chunks of 16 and 8."""
    model = _model("-mosaic 1 -mosaic_dom 200", tmp_path)
    assert model.shape[1] == 24 and K.lane_chunk(24, model.scene.xtal.orients.shape[0]) == 16
    _check_tangent_lanes(model, _mask(model.scene))


BASE_NAMES = ["cell_a", "cell_gamma", "misset_y", "phi0"]


def test_orientation_tangents_find_the_directions_that_move_the_unrotated_cell():
    """The cell's, the missetting's and phi0's directions move every orientation as C A_m
    (T_BASE, with that C); a mosaic spread's, an oscillation's and a random one's do not;
    one that moves no orientation has neither flag."""
    from nbragg.params import input_tangent
    model = _model("-mosaic 1 -mosaic_dom 10 -phi 0 -osc 1 -phisteps 3", None)
    kL = model.kernel_layout
    orients = model.scene.xtal.orients
    m = orients.shape[0]
    names = BASE_NAMES + ["mosaic_spread", "osc", "distance"]
    d = np.array([input_tangent(model, n) for n in names] + [_random_orientations(kL, m, np.random.default_rng(1))])
    flags, has_dori, base = T.orientation_tangents(d, kL, orients)
    assert list(has_dori) == [True] * 6 + [False, True]
    assert [bool(f & T.T_BASE) for f in flags] == [True] * 4 + [False] * 4
    assert list(flags & ~T.T_BASE) == list(T.tangent_flags(d, kL))
    for p in range(4):
        dA = d[p, kL.orients:kL.orients + 9 * kL.npad].reshape(3, 3, kL.npad)[..., :m].transpose(2, 0, 1)
        C = base[p].reshape(3, 3)
        assert np.abs(C @ orients - dA).max() <= 1e-14 * np.abs(dA).max()
    assert not np.any(base[4:])
    # with one orientation every orientation tangent is C A_0
    still = _model("", None)
    one = _random_orientations(still.kernel_layout, 1, np.random.default_rng(2))[None]
    assert T.orientation_tangents(one, still.kernel_layout, still.scene.xtal.orients)[0][0] & T.T_BASE
    bad = one.copy()
    bad[0, still.kernel_layout.orients] = np.nan
    assert not T.orientation_tangents(bad, still.kernel_layout, still.scene.xtal.orients)[0][0] & T.T_BASE


def _random_orientations(kL, m, rng):
    row = np.zeros(kL.size)
    ori = row[kL.orients:kL.orients + 9 * kL.npad].reshape(9, kL.npad)
    ori[:, :m] = rng.normal(size=(9, m))
    return row


@pytest.mark.parametrize("name", ["still", "mosaic 30 orientations, oversample 2", "17 orientations, sources",
                                  "9 orientations"])
def test_tangents_through_C_equal_those_through_each_orientation(name, tmp_path):
    """Directions moving every orientation as C A_m (the cell's, the missetting's, phi0's,
    a random C with every other field moved too), taken by the pixel walk through one sum
    of dT/d(h, k, l) outer (h, k, l), against the same directions taken orientation by
    orientation (the flag T_BASE cleared): equal to rounding."""
    from nbragg.params import input_tangent
    model, S = _case(name, True, tmp_path)
    kL = model.kernel_layout
    orients = S.xtal.orients
    rng = np.random.default_rng(7)
    every = rng.normal(size=kL.size)
    ori = every[kL.orients:kL.orients + 9 * kL.npad].reshape(3, 3, kL.npad)
    ori[...] = 0.0
    ori[..., :orients.shape[0]] = np.einsum("ij,mjk->ikm", rng.normal(size=(3, 3)), orients)
    d = np.array([input_tangent(model, n) for n in BASE_NAMES] + [every])
    flags, has_dori, base = T.orientation_tangents(d, kL, orients)
    assert all(f & T.T_BASE for f in flags)
    shape = (S.det.spixels, S.det.fpixels)
    out = []
    for fl in (flags, flags & ~T.T_BASE):
        J = np.full(shape + (len(d),), -1.0)
        image = np.full(shape, -1.0)
        T.tangent(*S, d, kL, model.scale, has_dori, base, fl, J, image, False)
        out.append((J, image))
    (J, image), (Jo, image_o) = out
    assert image.tobytes() == image_o.tobytes()
    for p in range(len(d)):
        big = np.abs(Jo[..., p]).max()
        assert big > 0
        np.testing.assert_allclose(J[..., p], Jo[..., p], rtol=1e-11, atol=1e-12 * big, err_msg=f"direction {p}")
    # the flag is what sends them through C: with C zeroed, the named parameters' tangents,
    # which move nothing but the orientations, are lost
    Jz = np.full(shape + (len(d),), -1.0)
    T.tangent(*S, d, kL, model.scale, has_dori, np.zeros_like(base), flags, Jz, image, False)
    for p in range(len(BASE_NAMES)):
        assert np.abs(Jz[..., p]).max() < 1e-9 * np.abs(J[..., p]).max(), p


def _check_tangent_lanes(model, S):
    kL = model.kernel_layout
    d = _tangent_directions(model, np.random.default_rng(5))
    flags, has_dori, base = T.orientation_tangents(d, kL, S.xtal.orients)
    shape = (S.det.spixels, S.det.fpixels)
    out = {}
    for lanes in (True, False):
        J = np.full(shape + (len(d),), -1.0)
        image = np.full(shape, -1.0)
        T.tangent(*S, d, kL, model.scale, has_dori, base, flags, J, image, lanes)
        out[lanes] = J, image
    forward = np.full(shape, -1.0)
    K.forward(*S, 0, S.det.spixels, forward, np.zeros(S.det.spixels), True)
    forward[forward != -1.0] *= model.scale
    assert out[True][1].tobytes() == out[False][1].tobytes() == forward.tobytes()
    J, Jw = out[True][0], out[False][0]
    assert np.all((J == -1.0) == (Jw == -1.0))      # the same pixels written
    for p in range(len(d)):
        big = np.abs(Jw[..., p]).max()
        np.testing.assert_allclose(J[..., p], Jw[..., p], rtol=1e-11, atol=1e-12 * big, err_msg=f"direction {p}")
    assert np.abs(Jw).max() > 0


def _adjoint(model, S, upstream, lanes):
    from nbragg.kernels import adjoint as A
    kL = model.kernel_layout
    shape = (S.det.spixels, S.det.fpixels)
    nchunks = A.n_chunks(shape[0], S.fhkl.grid.size, 8 * upstream.size)
    g_c = np.zeros((nchunks, kL.size))
    gF_c = np.zeros((nchunks, S.fhkl.grid.size))
    image = np.zeros(shape)
    swept = A.adjoint(*S, kL, upstream, model.scale, nchunks, g_c, gF_c, image, lanes)
    return g_c.sum(axis=0), gF_c.sum(axis=0), image, swept


def _check_adjoint_lanes(model, S, seed=7, cut=False):
    rng = np.random.default_rng(seed)
    upstream = rng.normal(size=(S.det.spixels, S.det.fpixels))
    upstream[3, :] = 0.0            # pixels without upstream are skipped by both
    g, gF, image, swept = _adjoint(model, S, upstream, True)
    gw, gFw, imagew, swept_w = _adjoint(model, S, upstream, False)
    # the lanes take every pixel but those whose polarization -dmin moves past the first
    # sample, which they leave to the per-pixel sweep
    assert swept_w > 0
    assert (0 < swept < swept_w) if cut else swept == 0
    # the image: the per-pixel sweep's to rounding (both take the Bragg terms' polarization
    # and capture fraction from their derivative twins), zero where the upstream is
    np.testing.assert_allclose(image, imagew, rtol=1e-14, atol=0)
    assert image.max() > 0 and (image[3] == 0).all()
    # the gradient: the same sums in another order, field by field (their scales differ
    # by 30 orders of magnitude)
    kL = model.kernel_layout
    for name in FIELDS:
        sl = field_slice(kL, name)
        big = np.abs(gw[sl]).max(initial=0.0)
        np.testing.assert_allclose(g[sl], gw[sl], rtol=1e-11, atol=1e-13 * big, err_msg=name)
    for name in ("pix0", "sources", "orients", "Na", "default_F", "scale"):
        assert np.abs(gw[field_slice(kL, name)]).max() > 0, name
    if not S.beam.nopolar:
        assert gw[kL.kahn] != 0.0
    if S.fhkl.has_hkls:
        assert np.abs(gFw).max() > 0
    np.testing.assert_allclose(gF, gFw, rtol=1e-10, atol=1e-12 * max(np.abs(gFw).max(), 1e-300))
    return g


@pytest.mark.parametrize("grid", [False, True], ids=["default_F", "grid"])
@pytest.mark.parametrize("name", list(CASES))
def test_adjoint_row_lanes_agree_with_the_per_pixel_sweep(name, grid, tmp_path):
    """The adjoint's row lanes against its per-pixel sweep (pixel_adjoint_fast, and the
    walk's replay for the pixels the lanes leave to it): every partial to rounding."""
    model, S = _case(name, grid, tmp_path)
    _check_adjoint_lanes(model, S, cut="dmin" in name)


def test_adjoint_row_lanes_on_a_curved_detector_with_a_kahn_factor(tmp_path):
    model = _model("-curved_det -polar 0.7 -mosaic 0.5 -mosaic_dom 3 -oversample 2 -roi 1 20 2 22", tmp_path)
    _check_adjoint_lanes(model, _mask(model.scene))


def test_adjoint_row_lanes_in_chunks_agree_with_the_per_pixel_sweep(tmp_path):
    """200 orientations on rows of 160 pixels: each row is taken in chunks of 128 and 32
    (ADJOINT_LANES; a pixel with fewer terms would take the whole row at once)."""
    from nbragg.kernels import adjoint as A
    model = _model("-mosaic 1 -mosaic_dom 200 -detpixels_f 160 -detpixels_s 6 -pixel 0.1", tmp_path)
    terms = model.scene.xtal.orients.shape[0]          # one sub-pixel, source and layer
    assert model.shape == (6, 160) and terms == 200
    assert A.ADJOINT_LANES == 128 and A.ADJOINT_CHUNK_TERMS // terms < 128
    _check_adjoint_lanes(model, _mask(model.scene))
