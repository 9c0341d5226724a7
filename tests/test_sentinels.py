"""Values that mean "unset" or "none" on nanoBragg's command line: nbragg runs them as
nanoBragg.c does, and settings that leave nothing to simulate stop with a clear error."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbragg
from nbragg import cli
from nbragg.engine import build_model
from nbragg.nbargs import parse_nanobragg_args

BASE = "-cell 100 100 100 90 90 90 -default_F 100 -N 3 -detpixels 32".split()
NO_SOURCE = "-hdivrange 1 -vdivrange 1 -hdivstep 1 -vdivstep 1".split()


def cli_image(tmp_path, name, extra, base=BASE):
    """Run the command line in tmp_path; return the float image."""
    status = cli.main(base + extra + ["-floatfile", str(tmp_path / f"{name}.bin"),
                                      "-intfile", str(tmp_path / f"{name}.img"),
                                      "-nonoise", "-nopgm", "-noprogress"])
    assert status == 0
    return np.fromfile(tmp_path / f"{name}.bin", dtype="<f4").reshape(32, 32)


def image(extra, base=BASE):
    p = parse_nanobragg_args(base + extra, warn=lambda m: None)
    return nbragg.simulate(p.experiment, warn=lambda m: None).image


@pytest.mark.parametrize("value", ["inf", "0", "-inf", "Infinity", "1e400"])
def test_detector_abs_inf_or_0_means_no_absorption(value, tmp_path, capsys):
    ref = cli_image(tmp_path, "ref", [])
    assert ref.max() > 0
    assert np.array_equal(cli_image(tmp_path, "abs", ["-detector_abs", value]), ref)
    assert "error" not in capsys.readouterr().err


def test_detector_abs_inf_drops_the_thickness_given_before_it(tmp_path):
    ref = cli_image(tmp_path, "ref", [])
    thick = ["-detector_thick", "100", "-detector_abs", "200"]
    assert not np.array_equal(cli_image(tmp_path, "thick", thick), ref)
    assert np.array_equal(cli_image(tmp_path, "inf", ["-detector_thick", "100", "-detector_abs", "inf"]), ref)


def test_api_absorption_depth_inf_or_0_means_no_absorption():
    det = dict(fpixels=16, spixels=16, thickness=100, thicksteps=2)
    exp = nbragg.Experiment(detector=nbragg.Detector(**det, absorption_depth=200),
                            structure=nbragg.Structure(default_F=100), crystal=nbragg.Crystal(Na=3, Nb=3, Nc=3))
    for depth in (math.inf, 0.0):
        e = exp.replace(detector=exp.detector.replace(absorption_depth=depth))
        assert build_model(e).detector.mu == 0.0
    with pytest.raises(nbragg.ParameterError, match="absorption_depth"):
        nbragg.Detector(**det, absorption_depth=math.nan)
    with pytest.raises(nbragg.ParameterError, match="absorption_depth"):
        nbragg.Detector(**det, absorption_depth=-math.inf)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_oversample_0_or_negative_is_automatic(value):
    p = parse_nanobragg_args(BASE + ["-oversample", value], warn=lambda m: None)
    auto = parse_nanobragg_args(BASE, warn=lambda m: None)
    m, ma = build_model(p.experiment), build_model(auto.experiment)
    assert m.oversample_auto and m.oversample == ma.oversample
    assert np.array_equal(image(["-oversample", value]), image([]))


@pytest.mark.parametrize("roi, same_as", [
    ("-1 -1 -1 -1", None),
    ("-1 20 -5 9", "0 20 0 9"),
    ("5 -1 3 -1", "5 32 3 32"),
])
def test_negative_roi_limits_are_unset(roi, same_as):
    got = image(["-roi", *roi.split()])
    want = image([] if same_as is None else ["-roi", *same_as.split()])
    assert np.array_equal(got, want)
    if same_as is not None:
        assert (got == 0).any() and (got > 0).any()


def test_no_source_left_from_the_command_line_process(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "nbragg"] + BASE + NO_SOURCE,
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nbragg: error: no source is left")
    assert "round-divergence cut" in lines[0] and "-square_div" in lines[0] and "-hdivsteps" in lines[0]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_source_left_from_python():
    exp = nbragg.Experiment(beam=nbragg.Beam(hdiv_range=1, vdiv_range=1, hdiv_step=1, vdiv_step=1),
                            detector=nbragg.Detector(fpixels=8, spixels=8),
                            structure=nbragg.Structure(default_F=100))
    with pytest.raises(nbragg.ParameterError, match="no source is left.*Beam.round_div=False"):
        nbragg.simulate(exp)
    square = exp.replace(beam=exp.beam.replace(round_div=False))
    assert np.isfinite(nbragg.simulate(square).image).all()


def test_no_phi_step_from_python():
    exp = nbragg.Experiment(crystal=nbragg.Crystal(osc=0, phistep=0.1),
                            detector=nbragg.Detector(fpixels=8, spixels=8),
                            structure=nbragg.Structure(default_F=100))
    with pytest.raises(nbragg.ParameterError, match="no phi step.*Crystal.phisteps"):
        nbragg.simulate(exp)
