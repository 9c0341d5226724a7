"""The Numba kernel against the slow numpy reference, one feature at a time (1e-12)."""

import shutil

import numpy as np
import pytest

from conftest import GOLDEN, rows_as_panels
from reference import reference_image

import nbragg
from nbragg.nbargs import parse_nanobragg_args

BASE = "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 -detpixels 10".split()

FEATURES = {
    "plain": [],
    "oversample": ["-oversample", "3"],
    "mosaic": ["-mosaic", "1.5", "-mosaic_dom", "4"],
    "phi": ["-phi", "10", "-osc", "4", "-phisteps", "3"],
    "divergence_dispersion": ["-hdivrange", "8", "-vdivrange", "6", "-hdivsteps", "3", "-vdivsteps", "3",
                              "-dispersion", "6", "-dispsteps", "3"],
    "square_div": ["-hdivrange", "6", "-vdivrange", "4", "-hdivsteps", "4", "-vdivsteps", "3", "-square_div"],
    "thickness_last_value": ["-oversample", "2", "-detector_abs", "320", "-detector_thick", "450",
                             "-detector_thicksteps", "3", "-polar", "0.5"],
    "oversample_flags_compound": ["-oversample", "2", "-oversample_omega", "-oversample_polar", "-oversample_thick",
                                  "-detector_abs", "200", "-detector_thick", "300", "-polar", "0.5"],
    "gauss_dmin": ["-gauss_xtal", "-fudge", "0.8", "-dmin", "8"],
    "tophat": ["-tophat_spots", "-fudge", "1.2"],
    "round": ["-round_xtal", "-fudge", "1.5"],
    "curved_water": ["-curved_det", "-water", "0.05", "-oversample", "2"],
    "xds_rotations": ["-xds", "-ORGX", "5.5", "-ORGY", "7.25", "-close_distance", "95", "-detector_rotx", "3",
                      "-twotheta", "5"],
    "mosflm_rotations": ["-mosflm", "-Xbeam", "2", "-Ybeam", "2.5", "-detector_roty", "-4", "-detector_rotz", "5",
                         "-twotheta", "6"],
    "dials": ["-dials", "-detector_rotx", "2"],
    "custom_vectors": ["-fdet_vector", "0.9961946980917455", "0.08715574274765817", "0", "-sdet_vector",
                       "-0.08715574274765817", "0.9961946980917455", "0", "-odet_vector", "0", "0", "1",
                       "-beam_vector", "0.01", "-0.02", "1", "-close_distance", "100", "-pivot", "sample",
                       "-spindle_axis", "0.6", "0.8", "0", "-phi", "5", "-osc", "3", "-phisteps", "2"],
    "roi": ["-roi", "2", "7", "3", "8"],
    "point_pixel_nopolar": ["-point_pixel", "-nopolar"],
    "interpolate": ["-hkl", "tri.hkl", "-N", "2", "-interpolate", "-pixel", "0.1"],
    "nearest_hkl": ["-hkl", "tri.hkl", "-pixel", "0.1"],
    "sourcefile": ["-sourcefile", "sources.txt"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    shutil.copy(GOLDEN / "interpolate_N2" / "tri.hkl", d)
    shutil.copy(GOLDEN / "sourcefile_round_xtal" / "sources.txt", d)
    return d


@pytest.mark.parametrize("feature", list(FEATURES))
def test_kernel_matches_reference(feature, inputs):
    parsed = parse_nanobragg_args(BASE + FEATURES[feature], cwd=str(inputs), warn=lambda m: None)
    result = nbragg.simulate(parsed.experiment, warn=lambda m: None)
    ref = reference_image(result.model)
    assert ref.max() > 0
    floor = 1e-12 * np.abs(ref).max()
    err = np.abs(result.image - ref) / np.maximum(np.abs(ref), floor)
    assert err.max() <= 1e-12, err.max()


def test_weighted_sources_on_two_panels_match_reference(inputs):
    """The per-source weights and a detector of two panels (each with its own origin)."""
    import dataclasses
    from nbragg.engine import build_model, render
    args = BASE + FEATURES["divergence_dispersion"] + ["-oversample", "2", "-polar", "0.4"]
    exp = parse_nanobragg_args(args, cwd=str(inputs), warn=lambda m: None).experiment
    model = build_model(exp, warn=lambda m: None, panels=rows_as_panels(2))
    nsrc = model.scene.beam.sources.shape[0]
    weights = np.random.default_rng(3).uniform(0.2, 2.0, nsrc)
    beam = model.scene.beam._replace(weights=weights)
    model = dataclasses.replace(model, scenes=tuple(S._replace(beam=beam) for S in model.scenes))
    image = render(model)[0]
    ref = reference_image(model)
    assert image.shape == ref.shape == (2, 5, 10) and ref.max() > 0
    err = np.abs(image - ref) / np.maximum(np.abs(ref), 1e-12 * np.abs(ref).max())
    assert err.max() <= 1e-12, err.max()
