"""The CUDA backend against the CPU backend.

Run under Numba's CUDA simulator by default (see conftest.py), on 16x16 regions of the
golden cases; with NUMBA_ENABLE_CUDASIM=0 on a machine with an NVIDIA GPU the same
tests run on the device.  Skipped where numba-cuda is not installed.
"""

import importlib.util
import re

import numpy as np
import pytest

from conftest import copy_case_inputs, golden_case, golden_cases, golden_image

import nbragg
from nbragg.engine import build_model, check_backend
from nbragg.errors import BackendError
from nbragg.gradients import raw_gradient
from nbragg.params import SCALAR_PARAMS
from nbragg.refine import refine

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                 reason="numba-cuda is not installed"),
              # the structure-factor sums are 128-bit integers whose low word wraps on
              # purpose; the simulator does that arithmetic in numpy, which warns
              pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")]

SIDE = 16
SAMPLE_BUDGET = 4096   # inner evaluations per image: the simulator does a few thousand a second
RTOL = 1e-12
# parameters sharing a unit: a derivative that nearly cancels in this region (d/da at
# h = 0, or d/dmisset summed over symmetric sources) is compared against the largest of
# its unit, the size of the terms that cancel, not against itself
UNIT_GROUPS = [("cell_a", "cell_b", "cell_c", "wavelength"),
               ("cell_alpha", "cell_beta", "cell_gamma", "misset_x", "misset_y", "misset_z", "phi0", "osc",
                "mosaic_spread", "detector_rotx", "detector_roty", "detector_rotz", "twotheta"),
               ("Na", "Nb", "Nc"), ("distance", "beam_x", "beam_y")]
OUTPUT_FLAGS = {"-floatfile", "-intfile", "-noisefile", "-pgmfile", "-scale", "-adc", "-seed"}


def _strip_outputs(args):
    out, i = [], 0
    while i < len(args):
        if args[i] in OUTPUT_FLAGS:
            i += 2
            continue
        if args[i] in ("-nopgm", "-noisefile", "-nonoise"):
            i += 1
            continue
        out.append(args[i])
        i += 1
    return out


def _roi_around_peak(img, side):
    """A side x side region around the golden image's brightest pixel."""
    s, f = np.unravel_index(np.argmax(img), img.shape)
    x0 = int(np.clip(f - side // 2, 0, img.shape[1] - side))
    y0 = int(np.clip(s - side // 2, 0, img.shape[0] - side))
    return x0, x0 + side - 1, y0, y0 + side - 1


def case_experiment(name, tmp_path, budget=SAMPLE_BUDGET):
    """The golden case on a region around its peak: 16 x 16, or 8 x 8 / 4 x 4 where
    sources x domains x oversampling make a pixel expensive in the simulator."""
    for side in (SIDE, SIDE // 2, SIDE // 4):
        exp = _case_on_region(name, tmp_path, side)
        if build_model(exp, warn=lambda m: None).inner_evaluations <= budget:
            break
    return exp


def _case_on_region(name, tmp_path, side):
    case = golden_case(name)
    copy_case_inputs(case, tmp_path)
    args = _strip_outputs(case["args"])
    x0, x1, y0, y1 = _roi_around_peak(golden_image(case), side)
    if "-roi" in args:           # keep the case's own ROI, narrowed inside it
        i = args.index("-roi")
        rx0, rx1, ry0, ry1 = (int(v) for v in args[i + 1:i + 5])
        x0 = max(x0, rx0)
        y0 = max(y0, ry0)
        x0 = min(x0, max(rx1 - side + 1, rx0))
        y0 = min(y0, max(ry1 - side + 1, ry0))
        del args[i:i + 5]
        x1, y1 = x0 + side - 1, y0 + side - 1
    args += ["-roi", str(x0), str(x1), str(y0), str(y1)]
    return nbragg.Experiment.from_nanobragg_args(args, warn=lambda m: None, cwd=tmp_path)


def _close(gpu, cpu, rtol=RTOL):
    gpu = np.asarray(gpu, dtype=float)
    cpu = np.asarray(cpu, dtype=float)
    scale = np.max(np.abs(cpu)) if cpu.size else 0.0
    np.testing.assert_allclose(gpu, cpu, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", [c["name"] for c in golden_cases()])
def test_forward_matches_cpu(name, tmp_path):
    exp = case_experiment(name, tmp_path)
    cpu = nbragg.simulate(exp, warn=lambda m: None)
    gpu = nbragg.simulate(exp, backend="cuda", warn=lambda m: None)
    assert np.any(cpu.image != 0)
    _close(gpu.image, cpu.image)
    assert gpu.stats.max_I == pytest.approx(cpu.stats.max_I, rel=RTOL)
    assert gpu.stats.solid_angle_sr == pytest.approx(cpu.stats.solid_angle_sr, rel=1e-12)


FLOAT32_CASES = ["cubic_default_F", "interpolate_N2", "mat_hkl_nearest_nonsquare_mask", "mosaic_domains",
                 "phi_osc_dmin_gauss", "divergence_square_div_tophat", "sourcefile_round_xtal",
                 "curved_det_water_flux", "oversample3_omega_polar_thick", "mosflm_rotations_twotheta"]


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_forward_matches_cpu(name, tmp_path):
    exp = case_experiment(name, tmp_path)
    cpu = nbragg.simulate(exp, precision="float32", warn=lambda m: None).image
    gpu = nbragg.simulate(exp, backend="cuda", precision="float32", warn=lambda m: None).image
    assert cpu.max() > 0
    # both single precision; libm and CUDA's float32 functions differ in the last bits
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-5 * cpu.max())


# cases whose features reach every branch of the tangent and adjoint kernels: absorption
# and -oversample_* multipliers, sources and dispersion, mosaic and phi, detector
# rotations, curved detector and water, interpolated and nearest structure factors,
# round / gaussian / tophat shapes
GRADIENT_CASES = ["oversample3_omega_polar_thick", "divergence_round_dispersion", "phi_osc_dmin_gauss",
                  "mosflm_rotations_twotheta", "curved_det_water_flux", "interpolate_N2",
                  "mat_hkl_nearest_nonsquare_mask", "sourcefile_round_xtal", "divergence_square_div_tophat",
                  "mosaic_domains"]


def _names(exp):
    return list(SCALAR_PARAMS)


# The simulated tangent and adjoint kernels take about a minute to prepare on a cold cache
# and up to a minute per case to run: the tests that use them are in the full suite only
# (the quick set, -m "not slow", keeps the forward ones).
@pytest.mark.slow
@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_jacobian_matches_cpu(name, tmp_path, monkeypatch):
    exp = case_experiment(name, tmp_path)
    names = _names(exp)
    cpu = nbragg.jacobian(exp, names)
    from nbragg.kernels import cuda as C
    monkeypatch.setattr(C, "MAXP", 16)      # two launches: the grouping of parameters
    gpu = nbragg.jacobian(exp, names, backend="cuda")
    for p, n in enumerate(names):
        group = next((g for g in UNIT_GROUPS if n in g), (n,))
        scale = max(np.abs(cpu[:, names.index(m)]).max() for m in group)
        np.testing.assert_allclose(gpu[:, p], cpu[:, p], rtol=RTOL, atol=RTOL * scale, err_msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_gradient_matches_cpu(name, tmp_path):
    exp = case_experiment(name, tmp_path)
    names = _names(exp) + (["Fhkl"] if exp.structure.Fhkl is not None else [])
    rng = np.random.default_rng(1)
    w = rng.normal(size=(exp.detector.spixels, exp.detector.fpixels))
    cpu = nbragg.gradient(exp, names, w)
    gpu = nbragg.gradient(exp, names, w, backend="cuda")
    # a gradient is a sum over pixels and samples that may cancel: its size for the
    # comparison is that of the terms summed, sum |w| |dI/dp| over the parameter's unit
    # group (a fixed relative tolerance on that size)
    scalars = _names(exp)
    jac = nbragg.jacobian(exp, scalars)
    terms = dict(zip(scalars, np.abs(w).ravel() @ np.abs(jac)))
    for n in names:
        if n == "Fhkl":
            _close(gpu[n], cpu[n])
            assert np.any(cpu[n] != 0)
        else:
            group = next((g for g in UNIT_GROUPS if n in g), (n,))
            tol = RTOL * max(terms[m] for m in group)
            assert gpu[n] == pytest.approx(cpu[n], rel=RTOL, abs=tol + 1e-300), n


@pytest.mark.slow
def test_adjoint_image_and_determinism(tmp_path):
    exp = case_experiment("interpolate_N2", tmp_path)
    model = build_model(exp, warn=lambda m: None)
    w = np.ones(model.shape)
    a = raw_gradient(model, w, want_image=True, backend="cuda")
    b = raw_gradient(model, w, want_image=True, backend="cuda")
    assert np.array_equal(a.Fgrid, b.Fgrid) and np.array_equal(a.flat, b.flat)
    _close(a.image, nbragg.simulate(exp).image)


def test_reductions_are_exact_sums():
    from numba import cuda
    from nbragg.kernels import cuda as C
    rng = np.random.default_rng(0)
    acc = rng.normal(size=(3, C.SERIAL_REDUCE_MAX + 300))     # the tree reduction
    got = C._reduce(cuda.to_device(acc))
    np.testing.assert_allclose(got, acc.sum(axis=1), rtol=1e-13)
    small = rng.normal(size=(2, 5, 40))                      # the serial one
    np.testing.assert_allclose(C._reduce(cuda.to_device(small)), small.sum(axis=2), rtol=1e-13)


def test_fixed_point_round_trip():
    from nbragg.kernels import cuda as C
    values = np.array([0.0, 1.5, -1.5, 2.0 ** 70 + 3.0, -(2.0 ** 70) - 3.0, -1e-30, 123456.789])
    exponent = 40
    words = np.zeros((2, len(values)), dtype=np.uint64)
    for j, v in enumerate(values):
        n = int(round(v * 2.0 ** exponent)) % 2 ** 128
        words[0, j] = n % 2 ** 64
        words[1, j] = n >> 64
    np.testing.assert_allclose(C.fixed_to_float(words, exponent), np.round(values * 2.0 ** exponent) / 2.0 ** exponent,
                               rtol=1e-15)


def test_backend_errors_name_the_value():
    with pytest.raises(BackendError, match="'gpu'"):
        check_backend("gpu")
    exp = nbragg.Experiment(detector=nbragg.Detector(fpixels=4, spixels=4))
    with pytest.raises(BackendError, match="'tpu'"):
        nbragg.simulate(exp, backend="tpu")
    with pytest.raises(BackendError, match="'tpu'"):
        nbragg.jacobian(exp, ["cell_a"], backend="tpu")


def test_command_line_device(in_tmp, tmp_path, capsys):
    from nbragg import cli
    out = tmp_path / "gpu.bin"
    ref = tmp_path / "cpu.bin"
    base = ["-cell", "70", "80", "90", "75", "85", "95", "-misset", "10", "5", "3", "-default_F", "100", "-N", "5",
            "-lambda", "1", "-distance", "100", "-detpixels", "12", "-pixel", "0.5", "-oversample", "1"]
    assert cli.main(base + ["-floatfile", str(ref)]) == 0
    assert cli.main(base + ["-floatfile", str(out), "-device", "cuda"]) == 0
    a = np.fromfile(ref, dtype=np.float32)
    b = np.fromfile(out, dtype=np.float32)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    assert cli.main(base + ["-floatfile", str(out), "-device", "fpga"]) == 2
    assert "-device" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_backend_cuda(monkeypatch, capsys):
    from nbragg import bench
    monkeypatch.setitem(bench.CASES, "tiny", "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 "
                                             "-lambda 1 -distance 100 -detpixels 6 -pixel 0.5")
    assert bench.main(["--backend", "cuda", "--cases", "tiny", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "kernel" in out and "evaluations/s" in out and "x forward" in out
    with pytest.raises(SystemExit):
        bench.main(["--cases", "B9"])
    assert "'B9'" in capsys.readouterr().err


@pytest.mark.slow
def test_kernels_compile_for_a_real_gpu():
    """The simulator accepts code that CUDA does not: compile every kernel to PTX."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
               PYTHONPATH=os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p]))
    proc = subprocess.run([sys.executable, str(root / "tests" / "gpu_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip("the CUDA compiler libraries are not installed (pip install \"nbragg[cuda]\")")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("characters of PTX") == 6
    # the single-precision kernel is float32 but for the pixel's float64 sum of samples
    # and libdevice's sinf, which keeps a few float64 steps for huge arguments (14 of the
    # float64 kernel's 640 float64 instructions when this was written)
    f64 = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+): \d+ characters.*?, (\d+) float64", proc.stdout)}
    assert f64["_forward_kernel_single"] <= 0.05 * f64["_forward_kernel"], f64


@pytest.mark.slow
@pytest.mark.parametrize("method", ["least_squares", "lbfgs"])
def test_refine_on_cuda_follows_the_cpu(method):
    truth = nbragg.Experiment.from_nanobragg_args(
        ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 100 -pixel 0.5 "
         "-detpixels 128 -oversample 1 -roi 60 67 91 98").split(), warn=lambda m: None)
    obs = np.random.default_rng(3).poisson(nbragg.simulate(truth).image).astype(float)
    assert obs.sum() > 100
    start = nbragg.set_params(truth, {"cell_a": 70.2, "Na": 5.3})
    opts = {"max_nfev": 6} if method == "least_squares" else {"maxiter": 4}
    cpu = refine(start, obs, ["cell_a", "Na"], method=method, **opts)
    gpu = refine(start, obs, ["cell_a", "Na"], method=method, backend="cuda", **opts)
    assert gpu.nfev == cpu.nfev and gpu.njev == cpu.njev
    assert cpu.values["cell_a"] != 70.2 and cpu.final_loss < cpu.history[0]
    for n in ("cell_a", "Na"):
        assert gpu.values[n] == pytest.approx(cpu.values[n], rel=1e-9)
    assert gpu.final_loss == pytest.approx(cpu.final_loss, rel=1e-10)


def test_dataset_on_cuda_equals_cpu(tmp_path):
    from test_dataset import SPEC
    from nbragg.dataset import generate, read_frame
    spec = dict(SPEC, images=2, shard_size=2)
    cpu = generate(spec, tmp_path / "cpu.h5", workers=0, progress=False)
    gpu = generate(spec, tmp_path / "gpu.h5", progress=False, backend="cuda")
    for i in range(2):
        a, b = read_frame(cpu, i, "photons"), read_frame(gpu, i, "photons")
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * a.max())
        assert a.max() > 0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")   # on purpose, below
@pytest.mark.slow
def test_adjoint_image_of_a_one_pixel_detector_and_non_finite_bound():
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 1 "
        "-pixel 0.5 -oversample 2".split(), warn=lambda m: None)
    model = build_model(exp, warn=lambda m: None)
    raw = raw_gradient(model, np.ones(model.shape), want_image=True, backend="cuda")
    _close(raw.image, nbragg.simulate(exp).image)
    assert raw.image[0, 0] > 0
    # a structure-factor gradient that overflows (huge upstream weights) is reported as
    # NaN, not dropped; the CPU gives inf where it overflows
    grid = np.full((11, 11, 11), 1e10)
    exp = exp.replace(structure=exp.structure.replace(Fhkl=grid, hkl_origin=(-5, -5, -5), hkl_count=grid.size))
    model = build_model(exp, warn=lambda m: None)
    huge = np.full(model.shape, 1e305)
    assert np.any(np.isinf(raw_gradient(model, huge).Fgrid))
    assert np.all(np.isnan(raw_gradient(model, huge, backend="cuda").Fgrid))


@pytest.mark.slow
def test_weighted_sources_on_two_panels_match_cpu():
    """Per-source weights and a two-panel detector: image, Jacobian (named parameters and
    each weight) and adjoint contractions, GPU against CPU."""
    import dataclasses
    from conftest import rows_as_panels
    from nbragg.engine import adjoint_image, render, tangent_image
    from nbragg.kernels.scene import flatten
    from nbragg.params import input_tangent
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 100 -pixel 0.4 "
        "-detpixels 8 -oversample 1 -dispersion 4 -dispsteps 2 -polar 0.3 -detector_rotx 2".split(),
        warn=lambda m: None)
    model = build_model(exp, warn=lambda m: None, panels=rows_as_panels(2))
    beam = model.scene.beam._replace(weights=np.array([0.6, 1.7]))
    model = dataclasses.replace(model, scenes=tuple(S._replace(beam=beam) for S in model.scenes))
    assert model.shape == (2, 4, 8)
    _close(render(model, backend="cuda")[0], render(model)[0])
    names = ["cell_a", "misset_z", "Na", "distance", "beam_x", "detector_rotx", "wavelength", "polar"]
    d = np.array([input_tangent(model, n) for n in names]
                 + [flatten(model.layout, {"weights": e}) for e in np.eye(2)])
    J, image = tangent_image(model, d)
    Jg, image_g = tangent_image(model, d, backend="cuda")
    _close(image_g, image)
    for p in range(d.shape[0]):
        _close(Jg[..., p], J[..., p])
    u = np.random.default_rng(2).normal(size=model.shape)
    g, g_gpu = d @ adjoint_image(model, u)[0], d @ adjoint_image(model, u, backend="cuda")[0]
    terms = np.abs(u).ravel() @ np.abs(J).reshape(-1, d.shape[0])
    assert np.all(np.abs(g_gpu - g) <= RTOL * terms), (g_gpu, g)
    assert np.all(g != 0)


def _background_experiment():
    """A small crystal with two amorphous materials (one table going negative beyond its
    end), divergence, two sensor layers and oversampling."""
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 40 -pixel 1.6 "
        "-detpixels 6 -oversample 2 -hdivrange 4 -hdivsteps 2 -polar 0.4 -detector_abs 320 -detector_thick 450 "
        "-detector_thicksteps 2".split(), warn=lambda m: None)
    table = np.array([[0.004, 2.6], [0.012, 2.4], [0.02, 1.8], [0.03, 3.5], [0.04, 4.2], [0.05, 2.0], [0.06, -0.5]])
    return exp.replace(background=[nbragg.Material(table, thickness=0.2, scale=1e-11),
                                   nbragg.Material("water", scale=5e-13)])


def test_background_forward_matches_cpu():
    exp = _background_experiment()
    cpu = nbragg.simulate(exp, warn=lambda m: None)
    gpu = nbragg.simulate(exp, backend="cuda", warn=lambda m: None)
    assert np.any(cpu.image < 0) and np.any(cpu.image > 0)
    _close(gpu.image, cpu.image)
    cpu32 = nbragg.simulate(exp, precision="float32", warn=lambda m: None).image
    gpu32 = nbragg.simulate(exp, backend="cuda", precision="float32", warn=lambda m: None).image
    np.testing.assert_allclose(cpu32, cpu.image, rtol=0, atol=1e-4 * np.abs(cpu.image).max())
    np.testing.assert_allclose(gpu32, cpu32, rtol=0, atol=1e-5 * np.abs(cpu32).max())


@pytest.mark.slow
def test_background_gradients_match_cpu():
    exp = _background_experiment()
    names = ["background_scale_0", "background_scale_1", "background_thickness_0", "Na", "misset_y", "fluence",
             "distance", "beam_x", "wavelength", "polar", "twotheta"]
    J = nbragg.jacobian(exp, names)
    Jg = nbragg.jacobian(exp, names, backend="cuda")
    for p, n in enumerate(names):
        np.testing.assert_allclose(Jg[:, p], J[:, p], rtol=RTOL, atol=RTOL * np.abs(J[:, p]).max(), err_msg=n)
    w = np.random.default_rng(3).normal(size=(6, 6))
    g = nbragg.gradient(exp, names, w)
    gg = nbragg.gradient(exp, names, w, backend="cuda")
    terms = np.abs(w).ravel() @ np.abs(J)
    for i, n in enumerate(names):
        assert abs(gg[n] - g[n]) <= RTOL * terms[i], (n, gg[n], g[n])
