"""Values that mean "unset" or "none" on nanoBragg's command line: nbragg runs them as
nanoBragg.c does."""

import math

import numpy as np
import pytest

import nbragg
from nbragg import cli
from nbragg.engine import build_model
from nbragg.nbargs import parse_nanobragg_args

BASE = "-cell 100 100 100 90 90 90 -default_F 100 -N 3 -detpixels 32".split()


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
