"""-printout's trace walks the same pixel loop as the kernels: its value and samples agree
with the image."""

import numpy as np
import pytest

import nbragg
from nbragg.engine import build_model
from nbragg.trace import trace_pixel

BASE = "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 100 -pixel 0.4 -detpixels 12"


@pytest.mark.parametrize("extra", [
    "-oversample 2",
    "-oversample 2 -oversample_omega -oversample_polar -detector_thick 100 -detector_abs 300 -oversample_thick",
    "-oversample 1 -dmin 50 -water 0.01 -mosaic 0.5 -mosaic_dom 3 -phi 0 -osc 1 -phisteps 2",
    "-oversample 1 -round_xtal -hdivrange 1 -hdivsteps 2 -dispersion 2 -dispsteps 2",
])
def test_trace_value_is_the_pixel(extra):
    exp = nbragg.Experiment.from_nanobragg_args((BASE + " " + extra).split(), warn=lambda m: None)
    img = nbragg.simulate(exp).image
    model = build_model(exp, warn=lambda m: None)
    for f, s in ((0, 0), (5, 7), (11, 3)):
        value, omega, polar, capture, samples, I = trace_pixel(model, f, s)
        assert value == pytest.approx(img[s, f], rel=1e-14, abs=0.0)
        counted = [r for r in samples if r.get("F_cell") is not None]
        nominal = model.scene.det.oversample ** 2 * model.scene.det.thicksteps * len(model.sources.wavelengths) \
            * model.crystal.orientations.shape[0]
        assert len(samples) <= nominal and (len(counted) > 0 or img[s, f] == 0.0)
        if "-dmin" in extra and img[s, f] == 0.0:
            assert all(r.get("skipped") == "dmin" for r in samples)


def test_trace_records_the_running_sum():
    exp = nbragg.Experiment.from_nanobragg_args((BASE + " -oversample 1").split(), warn=lambda m: None)
    model = build_model(exp, warn=lambda m: None)
    value, omega, polar, capture, samples, I = trace_pixel(model, 4, 4)
    terms = [r["F_cell"] ** 2 * r["F_latt"] ** 2 for r in samples]
    assert samples[-1]["I"] == pytest.approx(model.I_bg + sum(terms), rel=1e-12)
    assert I == samples[-1]["I"]
    assert np.isclose(value, I * omega * polar * capture * model.scale, rtol=1e-14)
