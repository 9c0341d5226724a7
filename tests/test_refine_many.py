"""Many-shot refinement (nbragg.refine_many): the reduction, the Schur step, the
structure-factor Jacobian, workers, checkpoints, dropped shots and recovery."""

import importlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import nbragg
from nbragg.errors import ParameterError
from nbragg.params import set_params
RM = importlib.import_module("nbragg.refine_many")   # the module (nbragg.refine_many is the function)

HMAX = 10


def _stills(nshots=4, pix=40, seed=0, N=6, fluence=3e26):
    """Stills of one orthorhombic crystal in random orientations, structure factors on a
    grid of random values (Friedel-symmetric)."""
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(seed)
    grid = rng.uniform(50.0, 150.0, size=(2 * HMAX + 1,) * 3)
    grid = 0.5 * (grid + grid[::-1, ::-1, ::-1])
    st = nbragg.Structure(Fhkl=grid, hkl_origin=(-HMAX,) * 3)
    exps = []
    for _ in range(nshots):
        U = Rotation.random(random_state=rng).as_matrix()
        exps.append(nbragg.Experiment(
            crystal=nbragg.Crystal(cell=(40.0, 40.0, 48.0, 90, 90, 90), Na=N, Nb=N, Nc=N, orientation=U),
            structure=st, beam=nbragg.Beam(wavelength=1.3, fluence=fluence),
            detector=nbragg.Detector(fpixels=pix, spixels=pix, pixel_size=0.5, distance=60)))
    return exps, grid


def _observed(exps, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.poisson(nbragg.simulate(e).image).astype(float) for e in exps]


@pytest.fixture(scope="module")
def case():
    exps, grid = _stills()
    return exps, grid, _observed(exps)


def _perturbed(exps, grid, seed=3, F_off=0.3):
    rng = np.random.default_rng(seed)
    g0 = grid * (1.0 + F_off * rng.uniform(-1, 1, size=grid.shape))
    g0 = 0.5 * (g0 + g0[::-1, ::-1, ::-1])
    return [set_params(e, {"misset_x": 0.03 * rng.normal(), "misset_y": 0.03 * rng.normal(),
                           "Na": e.crystal.Na * (1 + 0.05 * rng.normal()), "Fhkl": g0}) for e in exps], g0


def test_shared_gradient_is_the_sum_of_per_shot_gradients(case):
    exps, grid, obs = case
    shared, own = ["Fhkl", "distance", "cell_a"], ["misset_x", "Na"]
    value, g = RM.many_gradient(exps, obs, shared=shared, per_shot=own)
    total = 0.0
    want = {n: 0.0 for n in shared}
    for e, o in zip(exps, obs):
        m = nbragg.simulate(e).image
        lit = m > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(lit, 2.0 * (1.0 - o / m), 0.0)           # d(deviance)/dm
            d = np.where(o > 0, 2.0 * (m - o - o * np.log(m / o)), 2.0 * m)
        total += d[lit].sum()
        per = nbragg.gradient(e, shared + own, u)
        for n in shared:
            want[n] = want[n] + per[n]
        k = exps.index(e)
        for n in own:
            assert g["per_shot"][k][n] == pytest.approx(per[n], rel=1e-12, abs=1e-12 * abs(per[n]) + 1e-300)
    assert value == pytest.approx(total, rel=1e-10)
    for n in ("distance", "cell_a"):
        assert g["shared"][n] == pytest.approx(want[n], rel=1e-12)
    gF = g["shared"]["Fhkl"]
    scale = np.abs(want["Fhkl"]).max()
    assert np.abs(gF - want["Fhkl"]).max() <= 1e-12 * scale
    assert np.count_nonzero(gF) > 100


def test_structure_factor_jacobian_from_labels_matches_the_adjoint(case):
    """dm/dF from the labelling walk, contracted with an upstream, equals the adjoint's
    structure-factor gradient (up to the photons that overflow a pixel's slots)."""
    from nbragg.engine import build_model
    from nbragg.gradients import raw_gradient
    from nbragg.labels import label_shares
    exps, grid, obs = case
    e = exps[0]
    model = build_model(e)
    fmap = RM.FhklMap(grid, (-HMAX,) * 3)
    fmap.select(np.arange(grid.size))
    shot = RM._Shot(0, e, obs[0], None, "poisson", (), (), 1)
    sel = np.ones(model.shape, dtype=bool)
    JF, touched, complete = RM._fhkl_jacobian(shot, model, sel, 1.0, grid, fmap.index)
    u = np.random.default_rng(2).normal(size=model.shape)
    raw = raw_gradient(model, u, threads=1)
    adj = raw.Fgrid.ravel()[touched]
    lab = np.asarray(JF.T @ u.ravel())
    _, share, other = label_shares(model, threads=1)
    lost = np.abs(other).sum() / share.sum()
    # what overflows the slots is the tail far from every spot
    assert lost < 1e-6
    assert np.abs(lab - adj).max() <= max(1e-10, 10 * lost) * np.abs(adj).max()


def _problem(exps, obs, shared, own, restraints=None):
    setup = RM._setup(exps, obs, shared, own, "poisson", None, None, 1)
    ex = RM._Serial(setup.shots)
    prob, _ = RM._build_problem(setup, ex, None, restraints, 1, 0.0, False)
    return prob


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5])
def test_schur_step_equals_the_dense_gauss_newton_step(case, lam):
    exps, grid, obs = case
    starts, g0 = _perturbed(exps, grid)
    prob = _problem(starts, obs, ["Fhkl", "distance"], ["misset_x", "misset_y", "Na", "scale"],
                    restraints={"Fhkl": (None, 30.0)})
    res, _ = prob.run(prob.x0, "normal", "")
    S0, gs, blocks, g = RM.normal_equations(prob, prob.x0, res)
    schur = RM.schur_step(prob, S0, gs, blocks, lam)
    dense = RM.dense_step(prob, S0, gs, blocks, lam)
    assert np.abs(schur - dense).max() <= 1e-10 * np.abs(dense).max()
    # the gradient the step uses is the exact one
    assert np.allclose(g, prob.gradient(prob.x0, res))


def test_refinement_recovers_truth_and_reports_uncertainties(case):
    exps, grid, obs = case
    starts, g0 = _perturbed(exps, grid)
    fit = nbragg.refine_many(starts, obs, shared=["Fhkl"], per_shot=["misset_x", "misset_y", "Na"],
                             space_group="P 1", workers=0, progress=False, max_iterations=25)
    assert fit.success, fit.message
    assert fit.history[-1] < fit.history[0]
    r = fit.reflections
    hkl = np.stack([r["h"], r["k"], r["l"]], axis=1)
    truth = grid[tuple((hkl + HMAX).T)]
    assert len(truth) > 100
    # a few stills measure each structure factor loosely: the errors against the truth
    # are as large as the reported uncertainties say, no larger
    z = (r["F"] - truth) / r["sigF"]
    assert 0.6 < np.sqrt(np.mean(z * z)) < 1.6
    # the minimum is at least as good as the truth's loss
    at_truth, _ = RM.many_gradient(exps, obs, shared=["Fhkl"], per_shot=["Na"])
    assert fit.final_loss <= at_truth
    # Friedel mates share a value in the refined grid
    G = fit.shared["Fhkl"]
    assert np.array_equal(G, G[::-1, ::-1, ::-1])
    for k in range(len(exps)):
        p, sd = fit.per_shot[k], fit.per_shot_uncertainties[k]
        for n in ("misset_x", "misset_y"):
            assert abs(p[n]) < 4 * sd[n]
        assert abs(p["Na"] - exps[k].crystal.Na) < 4 * sd["Na"]
        assert fit.experiments[k].crystal.Na == pytest.approx(p["Na"])
    assert np.all(np.isfinite(r["sigF"])) and np.all(r["sigF"] > 0)


def test_lbfgs_reaches_the_same_minimum(case):
    exps, grid, obs = case
    starts = [set_params(e, {"misset_x": 0.02, "Na": 6.3}) for e in exps[:2]]
    kw = dict(shared=["distance"], per_shot=["misset_x", "Na"], workers=0, progress=False)
    gn = nbragg.refine_many(starts, obs[:2], **kw)
    lb = nbragg.refine_many(starts, obs[:2], method="lbfgs", **kw)
    # nanoBragg's nearest-index structure-factor lookup makes the loss piecewise smooth
    # (a pixel's F jumps where its fractional index crosses a half-integer: here a step of
    # 0.016 in the deviance between the two answers), so the two methods stop at
    # neighbouring points: the same minimum to well within the uncertainties
    assert abs(lb.final_loss - gn.final_loss) < 0.05
    assert lb.shared["distance"] == pytest.approx(gn.shared["distance"], abs=0.1 * gn.shared_uncertainties["distance"])
    for a, b, sd in zip(lb.per_shot, gn.per_shot, gn.per_shot_uncertainties):
        for n in a:
            assert abs(a[n] - b[n]) < 0.5 * sd[n]


def test_stages_then_everything_and_the_scale_in_the_fluence(case):
    """A first stage of each shot's own parameters, then all: the stages' iterations add
    up, a later stage starts where the earlier ended, and the refined experiments carry
    the per-shot scale in their fluence (they make the fitted image)."""
    exps, grid, obs = case
    starts, _ = _perturbed(exps, grid)
    own = ["misset_x", "misset_y", "Ncells", "scale"]
    kw = dict(shared=["Fhkl", "distance"], per_shot=own, space_group="P 1", restraints={"scale": (1.0, 0.1)},
              workers=0, progress=False, max_iterations=8)
    staged = nbragg.refine_many(starts, obs, stages=[own], **kw)
    first = nbragg.refine_many(starts, obs, shared=[], per_shot=own, restraints={"scale": (1.0, 0.1)},
                               workers=0, progress=False, max_iterations=8)
    assert staged.iterations > first.iterations
    assert staged.history[:len(first.history)] == first.history
    assert staged.history[-1] < first.history[-1]
    k = 1
    e = staged.experiments[k]
    assert e.beam.fluence == pytest.approx(starts[k].beam.fluence * staged.per_shot[k]["scale"], rel=1e-12)
    assert e.crystal.Na == e.crystal.Nb == e.crystal.Nc == pytest.approx(staged.per_shot[k]["Ncells"])
    with pytest.raises(ParameterError, match=r"stages\[0\]"):
        nbragg.refine_many(starts, obs, stages=[["cell_b"]], **kw)


def test_shots_without_spots_are_dropped_with_the_reason(case):
    exps, grid, obs = case
    dark = exps[1].replace(beam=exps[1].beam.replace(fluence=0.0))
    fit = nbragg.refine_many([exps[0], dark], obs[:2], per_shot=["Na"], workers=0, progress=False,
                             max_iterations=3)
    assert list(fit.dropped) == [1] and "no spots" in fit.dropped[1]
    assert fit.per_shot[1] is None and fit.experiments[1] is None
    assert fit.per_shot[0] is not None
    # a shot whose own parameter runs into its bound has diverged: dropped, the rest go on
    moved = set_params(exps[1], {"misset_x": 0.05})                 # shot 1's truth is at 0.05
    seen = [obs[0], np.random.default_rng(5).poisson(nbragg.simulate(moved).image).astype(float)]
    off = [set_params(exps[0], {"misset_x": 0.05}), moved]          # shot 0 starts 0.05 off its truth
    fit = nbragg.refine_many(off, seen, per_shot=["misset_x"], bounds={"misset_x": (0.045, 0.055)}, workers=0,
                             progress=False, max_iterations=5)
    assert list(fit.dropped) == [0] and fit.dropped[0].startswith("diverged: misset_x reached its lower bound")
    assert fit.per_shot[1] is not None


def test_bad_input_is_named():
    exps, grid = _stills(nshots=2, pix=16)
    obs = [np.zeros((16, 16))] * 2
    with pytest.raises(ParameterError, match="both shared and per shot"):
        nbragg.refine_many(exps, obs, shared=["Na"], per_shot=["Na"], workers=0)
    with pytest.raises(ParameterError, match="per_shot"):
        nbragg.refine_many(exps, obs, per_shot=["Fhkl"], workers=0)
    with pytest.raises(ParameterError, match="2 experiments"):
        nbragg.refine_many(exps, obs[:1], per_shot=["Na"], workers=0)
    with pytest.raises(ParameterError, match="loss"):
        nbragg.refine_many(exps, obs, per_shot=["Na"], loss="gaussian", workers=0)
    with pytest.raises(ParameterError, match="restraints"):
        nbragg.refine_many(exps, obs, per_shot=["Na"], restraints={"Nb": (1, 1)}, workers=0)
    other = exps[1].replace(structure=nbragg.Structure(Fhkl=np.ones((3, 3, 3)), hkl_origin=(-1, -1, -1)))
    with pytest.raises(ParameterError, match=r"experiments\[1\]"):
        nbragg.refine_many([exps[0], other], obs, shared=["Fhkl"], workers=0)
    with pytest.raises(ParameterError, match="space group"):
        nbragg.refine_many(exps, obs, shared=["Fhkl"], space_group="Q 9", workers=0)


def test_space_group_mates_share_one_value():
    pytest.importorskip("gemmi")
    grid = np.random.default_rng(0).uniform(1, 2, size=(9, 9, 9))
    fmap = RM.FhklMap(grid, (-4, -4, -4), "P 4")
    c = fmap.classes

    def cls(h, k, l):
        return c[h + 4, k + 4, l + 4]
    for h, k, l in [(1, 2, 3), (3, 0, 1), (2, 2, 4)]:
        mates = [(h, k, l), (-k, h, l), (-h, -k, l), (k, -h, l)]
        mates += [(-a, -b, -d) for a, b, d in mates]             # Friedel
        assert len({int(cls(*m)) for m in mates}) == 1
    assert cls(1, 2, 3) != cls(2, 1, 3)       # not related in P 4 (they are in P 4 2 2)
    assert cls(0, 0, 0) == -1
    absent = RM.FhklMap(grid, (-4, -4, -4), "P 41")      # 00l: l = 4n
    assert absent.classes[4, 4, 4 + 1] == -1 and absent.classes[4, 4, 4 + 4] >= 0


def _quick_kw():
    return dict(shared=["Fhkl", "distance"], per_shot=["misset_x", "Na", "scale"], restraints={"Fhkl": (None, 30.0)},
                max_iterations=3, progress=False)


def test_same_answer_for_1_2_and_4_workers(case):
    pytest.importorskip("distributed")
    exps, grid, obs = case
    starts, _ = _perturbed(exps, grid)
    fits = [nbragg.refine_many(starts, obs, workers=w, **_quick_kw()) for w in (0, 1, 2, 4)]
    for f in fits[1:]:
        assert f.history == fits[0].history
        assert f.shared["distance"] == fits[0].shared["distance"]
        assert np.array_equal(f.shared["Fhkl"], fits[0].shared["Fhkl"])
        assert [p["misset_x"] for p in f.per_shot] == [p["misset_x"] for p in fits[0].per_shot]


_RUNNER = r"""
import sys, pickle, numpy as np, nbragg
starts, obs, kw, ckpt, slow = pickle.load(open(sys.argv[1], "rb"))
if slow:
    import importlib; RM = importlib.import_module("nbragg.refine_many")
    real = RM._Problem.run
    def run(self, x, mode, label, **kw):
        import time; time.sleep(0.3)
        return real(self, x, mode, label, **kw)
    RM._Problem.run = run
fit = nbragg.refine_many(starts, obs, workers=0, checkpoint=ckpt, **kw)
pickle.dump((fit.history, fit.shared, fit.per_shot, fit.resumed), open(sys.argv[2], "wb"))
"""


@pytest.mark.parametrize("method", ["gauss_newton", "lbfgs"])
def test_killed_run_resumes_to_the_same_answer(case, tmp_path, method):
    import pickle
    exps, grid, obs = case
    starts, _ = _perturbed(exps[:2], grid)
    kw = dict(_quick_kw(), method=method, max_iterations=4 if method == "gauss_newton" else 8)
    script = tmp_path / "run.py"
    script.write_text(_RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))

    def launch(ckpt, slow, out):
        args = tmp_path / f"args_{out}.pkl"
        pickle.dump((starts, obs[:2], kw, ckpt, slow), open(args, "wb"))
        return subprocess.Popen([sys.executable, str(script), str(args), str(tmp_path / out)], env=env)

    whole = launch(None, False, "whole.pkl")
    assert whole.wait(timeout=600) == 0
    ckpt = str(tmp_path / "ckpt")
    p = launch(ckpt, True, "killed.pkl")
    marker = "state.npz" if method == "gauss_newton" else "eval_000004.npz"
    t0 = time.time()
    while not os.path.exists(os.path.join(ckpt, marker)):
        assert p.poll() is None and time.time() - t0 < 600
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(tmp_path / "killed.pkl")
    assert launch(ckpt, False, "resumed.pkl").wait(timeout=600) == 0
    a = pickle.load(open(tmp_path / "whole.pkl", "rb"))
    b = pickle.load(open(tmp_path / "resumed.pkl", "rb"))
    assert a[0][-1] == b[0][-1]
    assert np.array_equal(a[1]["Fhkl"], b[1]["Fhkl"]) and a[1]["distance"] == b[1]["distance"]
    assert a[2] == b[2]
    assert a[3] == 0 and b[3] >= (1 if method == "gauss_newton" else 4)     # it did resume


def test_panel_geometry_as_a_shared_parameter():
    """A quadrant's shift shared by every shot of a four-panel detector: its gradient is
    the sum of the shots' and refinement moves it back toward the truth."""
    from scipy.spatial.transform import Rotation
    from test_multipanel import _quadrants
    panels, root = _quadrants(side=32, pixel=0.2, distance=40.0)
    rng = np.random.default_rng(4)
    exps = [nbragg.Experiment(
        beam=nbragg.Beam(wavelength=1.0, fluence=1e28),
        detector=nbragg.Detector(convention="custom", beam_vector=(0, 0, -1), polar_vector=(1, 0, 0),
                                 spindle_axis=(1, 0, 0), panels=panels, groups=root),
        crystal=nbragg.Crystal(cell=(30, 32, 34, 90, 90, 90), Na=8, Nb=8, Nc=8,
                               orientation=Rotation.random(random_state=rng).as_matrix()),
        structure=nbragg.Structure(default_F=100), sampling=nbragg.Sampling(oversample=1)) for _ in range(3)]
    obs = [rng.poisson(nbragg.simulate(e).image).astype(float) for e in exps]
    name = "group_shift_x[Q1]"
    starts = [set_params(e, {name: 0.1}) for e in exps]
    value, g = RM.many_gradient(starts, obs, shared=[name], per_shot=["misset_x"])
    want = 0.0
    for e, o in zip(starts, obs):
        m = nbragg.simulate(e).image
        u = np.where(m > 0, 2.0 * (1.0 - o / np.where(m > 0, m, 1.0)), 0.0)
        want += nbragg.gradient(e, [name], u)[name]
    assert g["shared"][name] == pytest.approx(want, rel=1e-12)
    fit = nbragg.refine_many(starts, obs, shared=[name], per_shot=["misset_x"], workers=0, progress=False)
    assert fit.success, fit.message
    assert abs(fit.shared[name]) < 3 * fit.shared_uncertainties[name] < 0.05


def test_interpolated_structure_factors_take_the_adjoint_gradient(case, monkeypatch):
    """With tricubic interpolation the gradient of the structure factors is still exact
    (the sum of the shots' adjoint passes), though the labels give the normal matrix --
    even where every pixel's photons fit its label slots (made so here)."""
    exps, grid, obs = case
    real = RM._fhkl_jacobian
    monkeypatch.setattr(RM, "_fhkl_jacobian", lambda *a: real(*a)[:2] + (True,))
    interp = [e.replace(structure=e.structure.replace(interpolate=True)) for e in exps[:2]]
    setup = RM._setup(interp, obs[:2], ["Fhkl"], ["misset_x"], "poisson", None, None, 1)
    prob, _ = RM._build_problem(setup, RM._Serial(setup.shots), None, None, 0, 0.0, False)
    normal, _ = prob.run(prob.x0, "normal", "")
    plain, _ = prob.run(prob.x0, "gradient", "")
    a, b = prob.gradient(prob.x0, normal), prob.gradient(prob.x0, plain)
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()



def test_ncells_is_na_nb_nc_together():
    """Ncells sets Na = Nb = Nc: the same image as setting the three (the reference), and
    its derivative is the sum of theirs (the chain rule), both against central differences."""
    exps, grid = _stills(nshots=1, pix=24)
    e = set_params(exps[0], {"Na": 5.5, "Nb": 5.5, "Nc": 5.5})
    by_ncells = set_params(exps[0], {"Ncells": 5.5})
    assert np.array_equal(nbragg.simulate(by_ncells).image, nbragg.simulate(e).image)
    w = np.random.default_rng(0).uniform(0.5, 1.5, (24, 24))
    g = nbragg.gradient(e, ["Ncells", "Na", "Nb", "Nc"], w)
    assert g["Ncells"] == pytest.approx(g["Na"] + g["Nb"] + g["Nc"], rel=1e-12)
    chk = nbragg.check_gradients(e, ["Ncells"], upstream=w)
    assert chk.rows[0][3] <= 1e-6
