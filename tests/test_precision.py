"""The single-precision (float32) forward model: really float32, accurate, clear errors."""

import re

import numpy as np
import pytest

import nbragg
from nbragg import cli
from nbragg.engine import build_model
from nbragg.errors import ParameterError
from nbragg.kernels import cpu as K
from nbragg.kernels.precision import cpu_single, float64_variables
from nbragg.kernels.scene import as_single

TRI = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -lambda 1 -distance 100 -pixel 0.2 "
       "-detpixels 64 -oversample 2")


def _exp(extra=""):
    return nbragg.Experiment.from_nanobragg_args((TRI + " " + extra).split(), warn=lambda m: None)


@pytest.mark.slow      # compiles the twin without the cache (about 40 s)
def test_twin_computes_in_float32_only():
    """No float64 value anywhere in the single-precision forward kernel and its callees."""
    model = build_model(_exp("-N 5"), warn=lambda m: None)
    twin = cpu_single(K.forward, cache=False)          # compiled here, so its types can be read
    y0, y1 = 0, model.shape[0] - 1
    twin(*as_single(model.scene), y0, y1, np.zeros(model.shape, np.float32), np.zeros(model.shape[0], np.float32),
         True)
    # the declared float64 values: the pixel's sum of samples (I, then value; v in the
    # caller), started by the walk's begin hook (np.float64(I_bg), the one call allowed
    # there) and carried through the block and finish hooks (arguments, returns, unpacking,
    # the results of add_term and apply_final, which update it), with the temporaries of
    # its updates
    def carries_the_sum(f, v):
        # an inlined function's variables are renamed <caller>_single_v<n>_<name>, with
        # "$" as "_v" and "." as "_"
        parts = re.split(r"_single_v\d+_", v)
        name = parts[-1]
        where = f if len(parts) == 1 else parts[-2].rsplit("_v", 1)[-1] + "_single"
        if re.fullmatch(r"(arg[._])?(I|value|v|\$v|_vv)([._]\d+)*", name):
            return True
        if any(k in name for k in ("binop_iadd", "binop_imul", "binop_add", "return_value", "unpack_sequence")):
            return True
        # the second declared sum: the amorphous background's (bg), and its sample's sum
        # over materials in amorphous_sum (acc, of np.float64(amount) * np.float64(F^2)),
        # which amorphous_term multiplies by the sample's factors for the walk's amorphous
        # hook, and amorphous_lanes lane by lane for the forward's row lanes (its float64
        # amount, as amorphous_sum's)
        if re.fullmatch(r"(arg[._])?(bg|acc|amount)([._]\d+)*", name):
            return True
        if where in ("amorphous_sum_single", "amorphous_term_single", "_amorphous_single",
                     "amorphous_lanes_single") and (
                "call" in name or "binop_mul" in name):
            return True
        # the row lanes' sums: the elements of their float64 arrays I and (amorphous_lanes)
        # acc (read: binary_subscr, merged: phi) and the pixel's value apply_final makes of
        # one (call); every other array there is float32, and its callees are checked on
        # their own
        if where in ("_forward_row_lanes_single", "amorphous_lanes_single") and any(
                k in name for k in ("binary_subscr", "phi", "call")):
            return True
        return where.endswith(("_begin_single", "_finish_single", "add_term_single", "apply_final_single")) \
            and "call" in name
    found = float64_variables(twin)
    leaks = {f: [v for v in names if not carries_the_sum(f, v)] for f, names in found.items()}
    assert {f: v for f, v in leaks.items() if v} == {}
    # the checker does see float64 in this tree: the declared sums it let through (the
    # walk's, inlined into the kernel, and the row lanes' array I), so the rules above had
    # something to sort (a second compile, with float64 arrays, would cost a minute)
    assert "forward_single" in found and "_forward_row_lanes_single" in found


@pytest.mark.parametrize("extra, tol", [
    ("-N 5", 1e-4), ("-N 5 -round_xtal", 1e-4), ("-N 5 -gauss_xtal", 1e-4), ("-N 5 -tophat_xtal", 1e-4),
    ("-N 5 -mosaic 0.5 -mosaic_dom 6 -phi 0 -osc 1 -phisteps 3 -divergence 0.2 -dispersion 0.5 -dispsteps 2", 1e-4),
    ("-N 5 -water 100 -detector_thick 100 -detector_abs 500 -detector_thicksteps 2 -oversample_thick", 1e-4),
    # large N h: h itself carries float32's 6e-8 relative error, which on a peak as
    # narrow as 1/60 of an order moves a pixel by a few 1e-3; sincg on the fractional
    # index keeps everything else (a phase pi N h would lose all digits)
    ("-N 60 -lambda 0.5", 5e-3),
])
def test_float32_follows_float64(extra, tol):
    exp = _exp(extra)
    a = nbragg.simulate(exp).image
    b = nbragg.simulate(exp, precision="float32").image
    assert b.dtype == np.float64 and a.max() > 0
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99999
    np.testing.assert_allclose(b, a, rtol=0, atol=tol * a.max())


def test_float32_long_sums_keep_their_digits():
    """A quarter of a million samples per pixel: the float64 accumulator keeps the sum."""
    exp = _exp("-N 5 -round_xtal -mosaic 0.5 -mosaic_dom 4000 -oversample 8 -roi 30 31 30 31")
    assert build_model(exp, warn=lambda m: None).inner_evaluations == 4 * 256000
    a = nbragg.simulate(exp).image
    b = nbragg.simulate(exp, precision="float32").image
    np.testing.assert_allclose(b, a, rtol=0, atol=5e-5 * a.max())


def test_float32_non_integer_N():
    """Refined (non-integer) Ncells: the lattice factor is smooth in N in float32 too."""
    exp = _exp("-N 5")
    exp = exp.replace(crystal=exp.crystal.replace(Na=5.3, Nb=7.7, Nc=4.5))
    a = nbragg.simulate(exp).image
    b = nbragg.simulate(exp, precision="float32").image
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * a.max())
    c = nbragg.simulate(exp.replace(crystal=exp.crystal.replace(Na=5.0, Nb=8.0, Nc=5.0)), precision="float32")
    assert np.abs(c.image - b).max() > 1e-2 * a.max()     # N moved the image


def test_float32_kernel_arguments_are_float32():
    model = build_model(_exp("-N 5"), warn=lambda m: None)
    scene = as_single(model.scene)
    values = [v for block in scene for v in block]
    assert all(v.dtype in (np.float32, np.int64, np.uint8) for v in values if isinstance(v, np.ndarray))
    assert all(isinstance(v, (np.float32, bool, int)) for v in values if not isinstance(v, np.ndarray))
    assert any(isinstance(v, np.float32) for v in values) and scene.xtal.orients.dtype == np.float32


def test_precision_errors_name_the_value(tmp_path, capsys):
    with pytest.raises(ParameterError, match="'float16'"):
        nbragg.simulate(_exp("-N 5"), precision="float16")
    argv = (TRI + " -N 5").split() + ["-floatfile", str(tmp_path / "x.bin"), "-precision", "half"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "-precision" in err and "'half'" in err
    assert not (tmp_path / "x.bin").exists()
