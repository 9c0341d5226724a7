"""The set-up's derivatives (params.input_tangent) reuse the parts of the model's resolved
set-up that a parameter does not move (engine.resolve's ``reuse``), and take the imaginary
parts of only the kernel inputs the step reached.  They must be the very values of a
complex-step pass through the whole set-up, for every parameter, in every kind of
experiment: nanoBragg's one panel, panels cut by a panel maker, a DIALS experiment list's
panels and groups, the physical mode, a spectrum, an amorphous background and anisotropic
mosaicity."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conftest import rows_as_panels
from nbragg import Material
from nbragg.engine import build_model, detector_panels, kernel_inputs, resolve
from nbragg.errors import ParameterError
from nbragg.io.dials import read_experiments
from nbragg.nbargs import parse_nanobragg_args
from nbragg.kernels.scene import FIELDS, flatten
from nbragg.params import _STEP, RESPONSE_PARAMS, SCALAR_PARAMS, TERM_PARAMS, _stepped, input_tangent

ARGS = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
        "-detpixels 12 -oversample 1 -water 0.01 -polar 0.3 -mosaic 0.4 -mosaic_dom 3 -phi 1 -osc 0.3 "
        "-phisteps 2 -hdivrange 0.2 -hdivsteps 2 -dispersion 0.5 -dispsteps 2 -detector_rotx 2 -twotheta 3")
NAMES = [n for n in SCALAR_PARAMS + TERM_PARAMS if n not in RESPONSE_PARAMS]


def _exp(extra=""):
    return parse_nanobragg_args((ARGS + extra).split(), warn=lambda m: None).experiment


def _dials():
    exp = read_experiments(Path(__file__).parent / "data" / "dials" / "cspad_single_image.expt")[0]
    return exp.replace(crystal=exp.crystal.replace(Na=3, Nb=3, Nc=3))


def _spectrum_and_background():
    exp = _exp().replace(background=[Material("water", thickness=0.1, scale=0.5)])
    beam = exp.beam.replace(dispersion=None, disp_step=None, disp_steps=None)
    return exp.replace(beam=beam.replace(spectrum=([0.98, 1.0, 1.03], [0.5, 1.0, 0.7])))


def _anisotropic():
    exp = _exp()
    return exp.replace(crystal=exp.crystal.replace(mosaic_spread=None, mosaic_domains=6, mosaic_eta=(0.1, 0.2, 0.3)))


MODELS = {
    "one_panel": lambda: build_model(_exp()),
    "panel_maker": lambda: build_model(_exp(), panels=rows_as_panels(3)),
    "physical": lambda: build_model(_exp().replace(physics="physical")),
    "anisotropic_mosaic": lambda: build_model(_anisotropic()),
    "dials_panels": lambda: build_model(_dials()),
    "spectrum_background": lambda: build_model(_spectrum_and_background()),
}
EXTRA = {"dials_panels": ["panel_shift_z[0]", "panel_shift_z[7]", "panel_rot_x[3]", "group_rot_z[FS_D0Q1]",
                          "group_shift_x[AXIS_D0_R]"],
         "spectrum_background": ["background_scale_0", "background_thickness_0"]}


def _every_part_again(model, name):
    """The complex step through the whole set-up, every kernel input's imaginary part
    taken (what input_tangent computes with nothing reused and nothing skipped); the
    parameters it refuses, refused."""
    input_tangent(dataclasses.replace(model, resolved=None), name)
    exp = _stepped(model.experiment, name, _STEP)
    det, src, cry = resolve(exp, warn=lambda msg: None)
    panels = detector_panels(model.panel_maker, exp, det)
    u = kernel_inputs(exp, det, panels, src, cry, model.oversample, model.steps)
    if cry.orientations.shape != model.crystal.orientations.shape:
        return np.zeros(model.layout.size)
    return flatten(model.layout, {k: np.imag(u[k]) / _STEP for k in FIELDS})


@pytest.mark.parametrize("case", sorted(MODELS))
def test_reused_parts_give_the_whole_passes_values(case):
    model = MODELS[case]()
    names = NAMES + EXTRA.get(case, [])
    moved = 0
    for name in names:
        try:
            expected = _every_part_again(model, name)
        except ParameterError:
            with pytest.raises(ParameterError):
                input_tangent(model, name)
            continue
        got = input_tangent(model, name)
        assert np.array_equal(got, expected), name
        moved += bool(np.any(expected != 0))
    assert moved >= 20           # (the comparison is not between zero vectors)


def test_a_part_is_resolved_again_when_its_inputs_move():
    """The reuse keys: the same records, and the detector's vectors that the sources and
    the crystal read (a moved spindle turns the crystal's phi steps)."""
    exp = _exp(" -spindle_axis 0 0 1")
    base = resolve(exp)
    det, src, cry = resolve(exp, reuse=(exp, base))
    assert det is base[0] and src is base[1] and cry is base[2]
    spun = exp.replace(detector=exp.detector.replace(spindle_axis=np.array([0.0, 1.0, 0.0])))
    det, src, cry = resolve(spun, reuse=(exp, base))
    assert det is not base[0] and src is base[1] and cry is not base[2]
    assert not np.array_equal(cry.orientations, base[2].orientations)
    other_beam = exp.replace(beam=exp.beam.replace(wavelength=1.1))
    det, src, cry = resolve(other_beam, reuse=(exp, base))
    assert det is base[0] and src is not base[1] and cry is base[2]
    physical = exp.replace(physics="physical")
    assert all(a is not b for a, b in zip(resolve(physical, reuse=(exp, base)), base))


@pytest.mark.parametrize("mosaic", ["", " -mosaic 0.4 -mosaic_dom 3"])
def test_anisotropic_spreads_of_an_isotropic_crystal_are_refused(mosaic):
    """A step in eta would switch the mosaicity's kind (and with a spread, fail inside the
    set-up); the derivative is refused, naming the parameter and the field to set."""
    model = build_model(parse_nanobragg_args(("-cell 70 80 90 90 90 90 -default_F 1 -N 2 -lambda 1 -distance 100 "
                                              "-detpixels 8" + mosaic).split(), warn=lambda m: None).experiment)
    with pytest.raises(ParameterError, match=r"'eta_b'.*Crystal\.mosaic_eta"):
        input_tangent(model, "eta_b")
