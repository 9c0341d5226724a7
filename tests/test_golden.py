"""Every golden case, run through the nbragg command line, against nanoBragg.c's image."""

import io
import re

import numpy as np
import pytest

from conftest import copy_case_inputs, golden_case, golden_cases, golden_image

from nbragg import cli

CASES = [c["name"] for c in golden_cases()]


def run_cli(case, tmp, extra=()):
    copy_case_inputs(case, tmp)
    out = io.StringIO()
    err = io.StringIO()
    assert cli.run(case["args"] + ["-noprogress", *extra], stdout=out, stderr=err) == 0
    img = np.fromfile(tmp / "image.bin", dtype="<f4").reshape(case["spixels"], case["fpixels"])
    return img, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(name, monkeypatch=None):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            import os
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                cache[name] = run_cli(golden_case(name), tmp)
            finally:
                os.chdir(cwd)
        return cache[name]
    return get


@pytest.mark.parametrize("name", CASES)
def test_image_matches_nanobragg(name, runs):
    case = golden_case(name)
    ours, _ = runs(name)
    ours = ours.astype(np.float64)
    ref = golden_image(case).astype(np.float64)
    r = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert r >= 0.999999, r
    assert abs(ours.sum() / ref.sum() - 1) <= 1e-6
    tol = np.maximum(1e-5 * np.abs(ref), 1e-9 * np.abs(ref).max())
    within = np.mean(np.abs(ours - ref) <= tol)
    assert within >= 0.999, within
    # zero pixels (outside ROI or mask, or cut by -dmin) are zero in both
    assert np.array_equal(ours == 0, ref == 0)


@pytest.mark.parametrize("name", CASES)
def test_float32_image_matches_nanobragg(name, tmp_path, monkeypatch):
    """The single-precision twin of the kernel against nanoBragg.c's (double) image."""
    monkeypatch.chdir(tmp_path)
    case = golden_case(name)
    ours, _ = run_cli(case, tmp_path, ["-precision", "float32"])
    ours = ours.astype(np.float64)
    ref = golden_image(case).astype(np.float64)
    r = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert r >= 0.9999, r
    assert abs(ours.sum() / ref.sum() - 1) <= 1e-3
    # single-precision rounding, and samples that fall on the other side of a cut-off
    # (-dmin, the tophat edge) in a few pixels
    within = np.mean(np.abs(ours - ref) <= 1e-4 * np.abs(ref).max())
    assert within >= 0.999, within


_STAT_PATTERNS = {
    "max_I": r"max_I = (\S+)",
    "mean": r"mean= (\S+)",
    "rms": r"rms= (\S+)",
    "rmsd": r"rmsd= (\S+)",
    "solid_angle_sr": r"solid angle subtended by detector = (\S+)",
    "intfile_scale": r"intfile_scale = (\S+)",
    "pgm_scale": r"pgm_scale = (\S+)",
    "noise_photons": r"(\S+) photons on noise image",
}


@pytest.mark.parametrize("name", CASES)
def test_statistics_match_nanobragg(name, runs):
    case = golden_case(name)
    _, log = runs(name)
    for key, pat in _STAT_PATTERNS.items():
        want = case["c_stats"].get(key)
        m = re.search(pat, log)
        if want is None or (key == "noise_photons" and "-seed" not in case["args"]):
            continue  # unseeded nanoBragg noise comes from the clock
        assert m, f"{key} not printed"
        got = float(m.group(1))
        assert got == pytest.approx(want, rel=2e-5, abs=1e-12), (key, got, want)
    m = re.search(r"max_I = \S+  at (\S+) (\S+)", log)
    assert float(m.group(1)) == pytest.approx(case["c_stats"]["max_I_fast_m"], rel=1e-5)
    assert float(m.group(2)) == pytest.approx(case["c_stats"]["max_I_slow_m"], rel=1e-5)


def _close(a, b, path):
    if isinstance(b, list):
        assert isinstance(a, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(b, float) and not isinstance(b, bool):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("name", CASES)
def test_resolved_settings_match_nanobragg(name):
    from nbragg.engine import build_model
    from nbragg.nbargs import parse_nanobragg_args
    from nbragg.report import resolved_settings
    from conftest import GOLDEN
    case = golden_case(name)
    parsed = parse_nanobragg_args(case["args"], cwd=str(GOLDEN / name), warn=lambda m: None)
    got = resolved_settings(build_model(parsed.experiment, warn=lambda m: None))
    for key, want in case["c_resolved"].items():
        _close(got[key], want, key)


@pytest.mark.parametrize("name", CASES)
def test_log_matches_nanobragg_setup_lines(name, runs):
    """The set-up lines we print are nanoBragg's, so logs can be diffed."""
    from conftest import GOLDEN
    _, log = runs(name)
    c_log = (GOLDEN / name / "c_stdout.txt").read_text().splitlines()
    ours = log.splitlines()
    wanted = [ln for ln in c_log if ln.startswith(("  distance=", "  Xbeam=", "  Fbeam=", "  Xclose=", "  Fclose=",
                                                   "  DIRECTION_OF", "  INCIDENT_BEAM", "  spindle", "  dials origin",
                                                   "  roi:", "  created a total", "  wave=", "  incident fluence",
                                                   "pivoting", "XDS incident", "auto-selected", " ", "  sensor"))
              and "convention" not in ln]
    for line in wanted:
        if line.startswith("  seed:") or line.strip() == "" or line.startswith("X:") or line.startswith("Y:"):
            continue
        assert line in ours, line
