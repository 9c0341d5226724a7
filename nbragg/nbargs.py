"""The nanoBragg command line, read the way nanoBragg.c reads it.

nanoBragg.c matches every argument that starts with '-' against all of its flag
patterns with ``strstr`` (a substring test), in a fixed order, and acts on every
pattern that matches.  That has side effects which change images, and nbragg keeps
them so that a command line gives the same image under both programs:

* ``-twotheta_axis x y z`` also sets ``-twotheta x`` (and the sample pivot);
* ``-misset_seed N`` also acts as ``-misset N <next> <next>``;
* an argument that is no flag but contains one (``-pixelsize``) acts as that flag.

Each of these is reported as a warning naming the argument.  Unlike the C, a flag's
own values must be numbers (a clear error otherwise), unknown flags are reported, and
so are flags that have no effect.  Values read through a side effect follow C
``atof`` (non-numbers read as 0), as in nanoBragg.c.

``-img`` and ``-mask`` SMV headers are read first and give defaults for pixel size,
detector size, distance, close distance, wavelength, beam centre, ORGX/ORGY, phi and
oscillation; flags override them.  A ``-mask`` header's BEAM_CENTER_Y is taken as
detsize_s minus the value; ``-img`` is read after ``-mask`` and wins.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .errors import ArgumentError, ParameterError
from .experiment import Beam, Crystal, Detector, Experiment, Sampling, Structure
from .models.crystal import _reciprocal_standard, cell_from_vectors, cell_vectors
from .models.geometry import cross, dot, rotate_xyz
from .rng import NRGenerator, mosaic_rotation_umat, umat2misset
from .units import DEFAULT_FLUENCE, HC_EV_ANGSTROM, RTD

DEFAULT_SEED = 1  # nanoBragg.c seeds the noise from the clock; nbragg uses a fixed, printed seed

_C_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf(inity)?|nan)", re.I)
_C_INT = re.compile(r"\s*[-+]?\d+")


def c_atof(text):
    """C ``atof``: the longest numeric prefix, 0.0 when there is none."""
    m = _C_NUMBER.match(text)
    return float(m.group(0)) if m else 0.0


def c_atoi(text):
    """C ``atoi``: the leading integer, 0 when there is none."""
    m = _C_INT.match(text)
    return int(m.group(0)) if m else 0


@dataclass
class Outputs:
    """Output files and run options from the command line (nanoBragg's defaults)."""

    floatfile: str = "floatimage.bin"
    intfile: str = "intimage.img"
    pgmfile: str = "image.pgm"
    noisefile: str = "noiseimage.img"
    nxmxfile: Optional[str] = None      # -nxmx: an HDF5 NXmx file of the photons (nbragg's own)
    write_pgm: bool = True
    calculate_noise: bool = True
    floatfile_named: bool = False
    intfile_named: bool = False
    pgmfile_named: bool = False
    noisefile_named: bool = False
    intfile_scale: float = 0.0
    pgm_scale: float = 0.0
    adc_offset: float = 40.0
    seed: int = -DEFAULT_SEED           # as the C stores it: -atoi(value)
    seed_given: bool = False
    printout: bool = False
    printout_pixel: Optional[tuple] = None   # (fpixel, spixel)
    progress: bool = True
    dumpfile: Optional[str] = None


@dataclass
class ParsedArgs:
    experiment: Experiment
    outputs: Outputs
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)     # lines nanoBragg prints while setting up
    hklfile: Optional[str] = None
    matfile: Optional[str] = None
    sourcefile: Optional[str] = None
    maskfile: Optional[str] = None
    imgfile: Optional[str] = None


class _State:
    """nanoBragg.c's variables during argument parsing (C units: metres, radians)."""

    def __init__(self):
        nan = math.nan
        self.Na = self.Nb = self.Nc = 1.0
        self.N_flag = False
        self.user_cell = False
        self.cell = [0.0] * 6          # a b c (A), alpha beta gamma (rad)
        self.misset = [0.0, 0.0, 0.0, 0.0]
        self.sample = [0.0, 0.0, 0.0]
        self.Xbeam = self.Ybeam = nan
        self.Xclose = self.Yclose = nan
        self.ORGX = self.ORGY = nan
        self.pivot = "beam"
        self.convention = "mosflm"
        self.custom_vectors = {}
        self.distance = 100.0e-3
        self.close_distance = nan
        self.detector_mu = -1.0
        self.detector_thick = 0.0
        self.detector_thicksteps = -1
        self.twotheta = 0.0
        self.rot = [0.0, 0.0, 0.0]
        self.detsize_f = 102.4e-3
        self.detsize_s = 102.4e-3
        self.fpixels = 0
        self.spixels = 0
        self.curved = False
        self.pixel = 0.1e-3
        self.point_pixel = False
        self.polarization = 0.0
        self.nopolar = False
        self.os_thick = self.os_polar = self.os_omega = False
        self.oversample = -1
        self.roi = None
        self.lambda0 = 1.0e-10
        self.fluence = DEFAULT_FLUENCE
        self.flux = 0.0
        self.exposure = 1.0
        self.beamsize = 1e-4
        self.mosaic_spread = -1.0
        self.mosaic_domains = -1
        self.dispersion = 0.0
        self.dispsteps = -1
        self.hdivrange = self.vdivrange = -1.0
        self.hdivstep = self.vdivstep = -1.0
        self.hdivsteps = self.vdivsteps = -1
        self.round_div = True
        self.phi0 = 0.0
        self.osc = -1.0
        self.phistep = -1.0
        self.phisteps = -1
        self.dmin = 0.0
        self.matfile = None
        self.hklfile = None
        self.mtzfile = None        # nbragg's own structure-factor sources (gemmi)
        self.sf_ciffile = None
        self.modelfile = None
        self.sf_column = None
        self.sf_dmin = None
        self.exptfile = None       # a DIALS experiment list, and which experiment and image
        self.expt_index = 0
        self.expt_image = None
        self.expt = None           # the experiment read from it
        self.cell_from_expt = False
        self.given = set()         # the flags given (their first names)
        self.default_F = 0.0
        self.imgfile = None
        self.maskfile = None
        self.sourcefile = None
        self.spectrumfile = None
        self.physics = "nanobragg"
        self.source_weights = False
        self.interpolate = 2
        self.shape = "square"
        self.fudge = 1.0
        self.mosaic_seed = -12345678
        self.misset_seed = -DEFAULT_SEED
        self.water = 0.0
        self.stolfile = None
        self.out = Outputs()


# --------------------------------------------------------------------------- handlers
#
# Each handler: (pattern test, number of values needed, canonical names, action).
# The order is nanoBragg.c's order; "stop" means the C's `continue` (no later pattern
# is tried for this argument).

class _H:
    def __init__(self, names, test, need, action, stop=False, no_effect=None):
        self.names = names          # exact spellings this handler is meant for
        self.test = test            # callable(arg) -> bool, the C's matching rule
        self.need = need            # the C's "argc > i + need" condition
        self.action = action        # callable(state, values, reader)
        self.stop = stop
        self.no_effect = no_effect  # message when the flag parses but changes nothing


def _ss(*pats):
    return lambda a: any(p in a for p in pats)


def _sslen(pat, n):
    return lambda a: pat in a and len(a) == n


def _eq(*names):
    return lambda a: a in names


def _set(attr, kind="f", scale=None, div=None, pivot=None, extra=None):
    def act(st, v, rd):
        x = rd.i(0) if kind == "i" else rd.f(0)
        if div is not None:
            x = x / div
        if scale is not None:
            x = x * scale
        setattr(st, attr, x)
        if pivot:
            st.pivot = pivot
        if extra:
            extra(st)
    return act


def _vec(key):
    def act(st, v, rd):
        st.convention = "custom"
        st.custom_vectors[key] = np.array([rd.f(0), rd.f(1), rd.f(2)])
    return act


def _cell(st, v, rd):
    st.user_cell = True
    for j in range(6):
        if not rd.has(j) or (rd.raw(j).startswith("-") and not _looks_numeric(rd.raw(j))):
            if rd.strict:
                raise ArgumentError(f"{rd.flag}: expects six values a b c alpha beta gamma, found {j}")
            return
        x = rd.f(j)
        if rd.strict and not x > 0:
            raise ArgumentError(f"{rd.flag}: value {rd.raw(j)!r} must be positive")
        st.cell[j] = x if j < 3 else x / RTD


def _looks_numeric(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _misset_random(st, v, rd):
    st.misset[0] = -1


def _misset(st, v, rd):
    st.misset = [1, rd.f(0) / RTD, rd.f(1) / RTD, rd.f(2) / RTD]


def _sample_all(st, v, rd):
    x = rd.f(0) / 1000
    st.sample = [x, x, x]


def _sample_i(i):
    def act(st, v, rd):
        st.sample[i] = rd.f(0) / 1000
    return act


def _pivot(st, v, rd):
    val = rd.raw(0)
    if "sample" in val:
        st.pivot = "sample"
    if "beam" in val:
        st.pivot = "beam"
    if "sample" not in val and "beam" not in val:
        rd.bad(0, "expected 'beam' or 'sample'")


def _conv(name, pivot):
    def act(st, v, rd):
        st.convention = name
        st.pivot = pivot
    return act


def _pix0(st, v, rd):
    st.convention = "custom"
    rd.f(0), rd.f(1), rd.f(2)


def _detector_abs(st, v, rd):
    # nanoBragg.c: a value containing "inf" (its documented default) or reading as 0
    # means no absorption, and also drops the sensor thickness given so far; any other
    # infinite value (1e400, INF) gives mu = 1/inf = 0, keeping the thickness
    if "inf" in rd.raw(0):
        depth = 0.0
    else:
        depth = rd.f(0, allow_inf=True)
    if depth == 0.0:
        st.detector_thick = 0.0
        st.detector_mu = 0.0
    else:
        st.detector_mu = 1.0 / (depth * 1e-6)


def _detsize(st, v, rd):
    st.detsize_f = st.detsize_s = rd.f(0) / 1000.0


def _detpixels(st, v, rd):
    st.fpixels = st.spixels = _positive_int(rd, 0)


def _positive_int(rd, j):
    n = rd.i(j)
    if rd.strict and n <= 0:
        raise ArgumentError(f"{rd.flag}: {n} pixels; the detector needs at least one")
    return n


def _curved(st, v, rd):
    st.curved = True


def _flag(attr, value=True):
    def act(st, v, rd):
        setattr(st, attr, value)
    return act


def _polar(st, v, rd):
    st.polarization = rd.f(0)
    st.nopolar = False


def _roi(st, v, rd):
    st.roi = [rd.i(0), rd.i(1), rd.i(2), rd.i(3)]


def _energy(st, v, rd):
    e = rd.f(0)
    if e == 0.0:
        rd.bad(0, "the photon energy must be positive")
    st.lambda0 = (HC_EV_ANGSTROM / e) / 1.0e10


def _divergence(st, v, rd):
    st.hdivrange = st.vdivrange = rd.f(0) / 1000.0


def _divsteps(st, v, rd):
    st.hdivsteps = st.vdivsteps = rd.i(0)


def _file(attr):
    def act(st, v, rd):
        setattr(st, attr, rd.raw(0))
    return act


def _out(attr, extra=None):
    def act(st, v, rd):
        setattr(st.out, attr, rd.raw(0))
        setattr(st.out, attr + "_named", True)
        if extra:
            extra(st.out)
    return act


def _outflag(attr, value):
    def act(st, v, rd):
        setattr(st.out, attr, value)
    return act


def _outnum(attr, extra=None):
    def act(st, v, rd):
        setattr(st.out, attr, rd.f(0))
        if extra:
            extra(st.out)
    return act


def _printout_pixel(st, v, rd):
    st.out.printout_pixel = (rd.i(0), rd.i(1))


def _seed(attr):
    def act(st, v, rd):
        val = -rd.i(0)
        if not -2 ** 62 < val < 2 ** 62:   # the generator's state is a 64-bit integer
            rd.bad(0, "a seed must lie within +-4.6e18")
        if attr == "seed":
            st.out.seed = val
            st.out.seed_given = True
        else:
            setattr(st, attr, val)
    return act


def _N(st, v, rd):
    n = rd.i(0)
    st.Na = st.Nb = st.Nc = float(n)


def _Ni(attr):
    def act(st, v, rd):
        setattr(st, attr, float(rd.i(0)))
    return act


def _shape(name):
    def act(st, v, rd):
        st.shape = name
    return act


def _set_physics(st, v, rd):
    st.physics = "physical"


def _mosaic_test(a):
    return ("-mosaic" in a and len(a) == 7) or "-mosaici" in a or "-mosaic_spr" in a


_NO_STOL = "nanoBragg.c reads this file but never uses it: it has no effect"

HANDLERS = [
    _H(("-Na",), _ss("-Na"), 1, _Ni("Na"), stop=True),
    _H(("-Nb",), _ss("-Nb"), 1, _Ni("Nb"), stop=True),
    _H(("-Nc",), _ss("-Nc"), 1, _Ni("Nc"), stop=True),
    _H(("-N",), _eq("-N"), 1, _N, stop=True),
    _H(("-cell",), _ss("-cell"), 1, _cell),
    _H(("-misset",), lambda a: "-misset" in a, ("rand",), _misset_random, stop=True),
    _H(("-misset",), _ss("-misset"), 3, _misset),
    _H(("-samplesize", "-sample_size"), _ss("-samplesize", "-sample_size"), 1, _sample_all),
    _H(("-sample_thick", "-sample_x"), _ss("-sample_thick", "-sample_x"), 1, _sample_i(0)),
    _H(("-sample_width", "-sample_y", "-width"), _ss("-sample_width", "-sample_y", "-width"), 1, _sample_i(1)),
    _H(("-sample_height", "-sample_z", "-height", "-sample_heigh", "-heigh"),
       _ss("-sample_heigh", "-sample_z", "-heigh"), 1, _sample_i(2)),
    _H(("-xtalsize", "-xtal_size"), _ss("-xtalsize", "-xtal_size"), 1, _sample_all),
    _H(("-xtal_thick", "-xtal_x"), _ss("-xtal_thick", "-xtal_x"), 1, _sample_i(0)),
    _H(("-xtal_width", "-xtal_y", "-width"), _ss("-xtal_width", "-xtal_y", "-width"), 1, _sample_i(1)),
    _H(("-xtal_height", "-xtal_z", "-height", "-xtal_heigh", "-heigh"),
       _ss("-xtal_heigh", "-xtal_z", "-heigh"), 1, _sample_i(2)),
    _H(("-density", "-sample_density", "-sample_den"), _ss("-density", "-sample_den"), 1,
       lambda st, v, rd: rd.f(0), no_effect="the sample density does not enter the image"),
    _H(("-MW", "-molecular_weight", "-molec"), lambda a: a == "-MW" or "-molec" in a, 1,
       lambda st, v, rd: rd.f(0), no_effect="the molecular weight does not enter the image"),
    _H(("-Xbeam",), _ss("-Xbeam"), 1, _set("Xbeam", div=1000.0, pivot="beam")),
    _H(("-Ybeam",), _ss("-Ybeam"), 1, _set("Ybeam", div=1000.0, pivot="beam")),
    _H(("-Xclose",), _ss("-Xclose"), 1, _set("Xclose", div=1000.0, pivot="sample")),
    _H(("-Yclose",), _ss("-Yclose"), 1, _set("Yclose", div=1000.0, pivot="sample")),
    _H(("-ORGX",), _ss("-ORGX"), 1, _set("ORGX", pivot="sample")),
    _H(("-ORGY",), _ss("-ORGY"), 1, _set("ORGY", pivot="sample")),
    _H(("-pivot",), _ss("-pivot"), 1, _pivot),
    _H(("-mosflm",), _ss("-mosflm"), 0, _conv("mosflm", "beam")),
    _H(("-xds",), _ss("-xds"), 0, _conv("xds", "sample")),
    _H(("-adxv",), _ss("-adxv"), 0, _conv("adxv", "beam")),
    _H(("-denzo",), _ss("-denzo"), 0, _conv("denzo", "beam")),
    _H(("-dials",), _ss("-dials"), 0, _conv("dials", "beam")),
    _H(("-fdet_vector",), _ss("-fdet_vector"), 3, _vec("fdet_vector")),
    _H(("-sdet_vector",), _ss("-sdet_vector"), 3, _vec("sdet_vector")),
    _H(("-odet_vector",), _ss("-odet_vector"), 3, _vec("odet_vector")),
    _H(("-beam_vector",), _ss("-beam_vector"), 3, _vec("beam_vector")),
    _H(("-polar_vector",), _ss("-polar_vector"), 3, _vec("polar_vector")),
    _H(("-spindle_axis",), _ss("-spindle_axis"), 3, _vec("spindle_axis")),
    _H(("-twotheta_axis",), _ss("-twotheta_axis"), 3, _vec("twotheta_axis")),
    _H(("-pix0_vector",), _ss("-pix0_vector"), 3, _pix0,
       no_effect="nanoBragg.c overwrites the pix0 vector with the one derived from the beam centre "
                 "(it only switches to the CUSTOM convention)"),
    _H(("-distance",), _ss("-distance"), 1, _set("distance", div=1000.0, pivot="beam")),
    _H(("-close_distance",), _ss("-close_distance"), 1, _set("close_distance", div=1000.0, pivot="sample")),
    _H(("-detector_abs", "-detector_absorb", "-detector_absorption"), _ss("-detector_abs"), 1, _detector_abs),
    _H(("-detector_thick",), _sslen("-detector_thick", 15), 1, _set("detector_thick", scale=1e-6)),
    _H(("-detector_thicksteps",), _ss("-detector_thicksteps"), 1, _set("detector_thicksteps", kind="i")),
    _H(("-thicksteps",), _ss("-thicksteps"), 1, _set("detector_thicksteps", kind="i")),
    _H(("-twotheta",), _ss("-twotheta"), 1, _set("twotheta", div=RTD, pivot="sample")),
    _H(("-detector_rotx",), _ss("-detector_rotx"), 1, lambda st, v, rd: st.rot.__setitem__(0, rd.f(0) / RTD)),
    _H(("-detector_roty",), _ss("-detector_roty"), 1, lambda st, v, rd: st.rot.__setitem__(1, rd.f(0) / RTD)),
    _H(("-detector_rotz",), _ss("-detector_rotz"), 1, lambda st, v, rd: st.rot.__setitem__(2, rd.f(0) / RTD)),
    _H(("-detsize",), _sslen("-detsize", 8), 1, _detsize),
    _H(("-detsize_f",), _ss("-detsize_f"), 1, _set("detsize_f", div=1000.0)),
    _H(("-detsize_s",), _ss("-detsize_s"), 1, _set("detsize_s", div=1000.0)),
    _H(("-detpixels",), _sslen("-detpixels", 10), 1, _detpixels),
    _H(("-detpixels_f", "-detpixels_x"), _ss("-detpixels_f", "-detpixels_x"), 1,
       lambda st, v, rd: setattr(st, "fpixels", _positive_int(rd, 0))),
    _H(("-detpixels_s", "-detpixels_y"), _ss("-detpixels_s", "-detpixels_y"), 1,
       lambda st, v, rd: setattr(st, "spixels", _positive_int(rd, 0))),
    _H(("-curved_det",), _ss("-curved_det"), 1, _curved),
    _H(("-pixel",), _ss("-pixel"), 1, _set("pixel", div=1000.0)),
    _H(("-point_pixel",), _ss("-point_pixel"), 0, _flag("point_pixel")),
    _H(("-polar",), _sslen("-polar", 6), 1, _polar),
    _H(("-nopolar",), _ss("-nopolar"), 0, _flag("nopolar")),
    _H(("-oversample_thick",), _ss("-oversample_thick"), 0, _flag("os_thick"), stop=True),
    _H(("-oversample_polar",), _ss("-oversample_polar"), 0, _flag("os_polar"), stop=True),
    _H(("-oversample_omega",), _ss("-oversample_omega"), 0, _flag("os_omega"), stop=True),
    _H(("-oversample",), _ss("-oversample"), 1, _set("oversample", kind="i")),
    _H(("-roi",), _ss("-roi"), 4, _roi),
    _H(("-lambda", "-wave", "-wavelength"), _ss("-lambda", "-wave"), 1, _set("lambda0", div=1.0e10)),
    _H(("-energy",), _ss("-energy"), 1, _energy),
    _H(("-fluence",), _ss("-fluence"), 1, _set("fluence")),
    _H(("-flux",), _ss("-flux"), 1, _set("flux")),
    _H(("-exposure",), _ss("-exposure"), 1, _set("exposure")),
    _H(("-beamsize",), _ss("-beamsize"), 1, _set("beamsize", div=1000)),
    _H(("-mosaic", "-mosaicity", "-mosaic_spread"), _mosaic_test, 1, _set("mosaic_spread", div=RTD)),
    _H(("-mosaic_dom", "-mosaic_domains"), _ss("-mosaic_dom"), 1, _set("mosaic_domains", kind="i")),
    _H(("-dispersion",), _ss("-dispersion"), 1, _set("dispersion", div=100.0)),
    _H(("-dispsteps",), _ss("-dispsteps"), 1, _set("dispsteps", kind="i")),
    _H(("-divergence",), _ss("-divergence"), 1, _divergence),
    _H(("-hdivrange",), _ss("-hdivrange"), 1, _set("hdivrange", div=1000.0)),
    _H(("-vdivrange",), _ss("-vdivrange"), 1, _set("vdivrange", div=1000.0)),
    _H(("-hdivstep",), _sslen("-hdivstep", 9), 1, _set("hdivstep", div=1000.0)),
    _H(("-hdivsteps",), _ss("-hdivsteps"), 1, _set("hdivsteps", kind="i")),
    _H(("-vdivstep",), _sslen("-vdivstep", 9), 1, _set("vdivstep", div=1000.0)),
    _H(("-vdivsteps",), _ss("-vdivsteps"), 1, _set("vdivsteps", kind="i")),
    _H(("-divsteps",), _ss("-divsteps"), 1, _divsteps),
    _H(("-round_div",), _ss("-round_div"), 0, _flag("round_div", True)),
    _H(("-square_div",), _ss("-square_div"), 0, _flag("round_div", False)),
    _H(("-adc",), _ss("-adc"), 1, _outnum("adc_offset")),
    _H(("-phi",), _sslen("-phi", 4), 1, _set("phi0", div=RTD)),
    _H(("-osc",), _ss("-osc"), 1, _set("osc", div=RTD)),
    _H(("-phistep",), _sslen("-phistep", 8), 1, _set("phistep", div=RTD)),
    _H(("-phisteps",), _ss("-phisteps"), 1, _set("phisteps", kind="i")),
    _H(("-dmin",), _ss("-dmin"), 1, _set("dmin", scale=1e-10)),
    _H(("-mat",), _ss("-mat"), 1, _file("matfile")),
    _H(("-hkl",), _ss("-hkl"), 1, _file("hklfile")),
    # nbragg's own (not nanoBragg.c's): matched exactly, never by substring
    _H(("-expt",), _eq("-expt"), 1, _file("exptfile")),
    _H(("-spectrum",), _eq("-spectrum"), 1, _file("spectrumfile")),
    _H(("-gauss_domain",), _eq("-gauss_domain"), 0, _shape("gauss_domain")),
    _H(("-physical",), _eq("-physical"), 0, _set_physics),
    _H(("-source_weights",), _eq("-source_weights"), 0, _flag("source_weights")),
    _H(("-expt_index",), _eq("-expt_index"), 1, _set("expt_index", kind="i")),
    _H(("-expt_image",), _eq("-expt_image"), 1, _set("expt_image", kind="i")),
    _H(("-mtz",), _eq("-mtz"), 1, _file("mtzfile")),
    _H(("-sf_cif",), _eq("-sf_cif"), 1, _file("sf_ciffile")),
    _H(("-model",), _eq("-model"), 1, _file("modelfile")),
    _H(("-column",), _eq("-column"), 1, _file("sf_column")),
    _H(("-sf_dmin",), _eq("-sf_dmin"), 1, _set("sf_dmin")),
    _H(("-default_F",), _ss("-default_F"), 1, _set("default_F")),
    _H(("-dump",), _ss("-dump"), 1, lambda st, v, rd: setattr(st.out, "dumpfile", rd.raw(0))),
    _H(("-img",), _ss("-img"), 1, _file("imgfile")),
    _H(("-stolout",), lambda a: "-stolout" in a and len(a) > 7, 1, lambda st, v, rd: rd.raw(0),
       no_effect="nanoBragg.c never writes the stol output file"),
    _H(("-stol",), _sslen("-stol", 5), 1, _file("stolfile"), no_effect=_NO_STOL),
    _H(("-4stol",), _sslen("-4stol", 6), 1, _file("stolfile"), no_effect=_NO_STOL),
    _H(("-Q",), _sslen("-Q", 2), 1, _file("stolfile"), no_effect=_NO_STOL),
    _H(("-sourcefile",), _ss("-sourcefile"), 1, _file("sourcefile")),
    _H(("-source_distance", "-source_dist"), _ss("-source_dist"), 1, lambda st, v, rd: rd.f(0),
       no_effect="sources are at infinity in nanoBragg's far-field model; only their directions count"),
    _H(("-floatfile", "-floatimage"), _ss("-floatfile", "-floatimage"), 1, _out("floatfile")),
    _H(("-intfile", "-intimage"), _ss("-intfile", "-intimage"), 1, _out("intfile")),
    _H(("-pgmfile", "-pgmimage"), _ss("-pgmfile", "-pgmimage"), 1,
       _out("pgmfile", extra=lambda o: setattr(o, "write_pgm", True))),
    _H(("-noisefile", "-noiseimage"), _ss("-noisefile", "-noiseimage"), 1,
       _out("noisefile", extra=lambda o: setattr(o, "calculate_noise", True))),
    _H(("-nxmx",), _eq("-nxmx"), 1, lambda st, v, rd: setattr(st.out, "nxmxfile", rd.raw(0))),
    _H(("-nonoise",), _ss("-nonoise"), 0, _outflag("calculate_noise", False)),
    _H(("-nopgm",), _ss("-nopgm"), 0, _outflag("write_pgm", False)),
    _H(("-scale",), _ss("-scale"), 1, _outnum("intfile_scale")),
    _H(("-pgmscale",), _ss("-pgmscale"), 1, _outnum("pgm_scale", extra=lambda o: setattr(o, "write_pgm", True))),
    _H(("-coherent",), _ss("-coherent"), 0, lambda st, v, rd: None,
       no_effect="nanoBragg.c parses -coherent but never uses it"),
    _H(("-printout",), _ss("-printout"), 0, _outflag("printout", True)),
    _H(("-noprogress",), _ss("-noprogress"), 0, _outflag("progress", False)),
    _H(("-progress",), _ss("-progress"), 0, _outflag("progress", True)),
    _H(("-interpolate",), _ss("-interpolate"), 0, _flag("interpolate", 1)),
    _H(("-nointerpolate",), _ss("-nointerpolate"), 0, _flag("interpolate", 0)),
    _H(("-round_xtal",), _ss("-round_xtal"), 0, _shape("round")),
    _H(("-square_xtal",), _ss("-square_xtal"), 0, _shape("square")),
    _H(("-gauss_xtal",), _ss("-gauss_xtal"), 0, _shape("gauss")),
    _H(("-binary_spots", "-tophat_spots"), _ss("-binary_spots", "-tophat_spots"), 0, _shape("tophat")),
    _H(("-fudge",), _ss("-fudge"), 1, _set("fudge")),
    _H(("-printout_pixel",), _ss("-printout_pixel"), 2, _printout_pixel),
    _H(("-seed",), _ss("-seed"), 1, _seed("seed")),
    _H(("-mosaic_seed",), _ss("-mosaic_seed"), 1, _seed("mosaic_seed")),
    _H(("-misset_seed",), _ss("-misset_seed"), 1, _seed("misset_seed")),
    _H(("-water",), _ss("-water"), 1, _set("water", div=1e6)),
]

# flags handled before the main loop (and again inside it, harmlessly)
_PREPASS_NAMES = ("-mask",)
# side effects that are intended (no warning)
_INTENDED = {("-printout_pixel", "-printout")}
_KNOWN = set(n for h in HANDLERS for n in h.names) | set(_PREPASS_NAMES)


class _Reader:
    """Reads the values after flag ``args[i]``; strict for the flag's own values."""

    def __init__(self, args, i, flag, strict):
        self.args = args
        self.i0 = i
        self.flag = flag
        self.strict = strict

    def has(self, j):
        return self.i0 + 1 + j < len(self.args)

    def raw(self, j):
        if not self.has(j):
            raise ArgumentError(f"{self.flag}: missing value")
        return self.args[self.i0 + 1 + j]

    def bad(self, j, why):
        raise ArgumentError(f"{self.flag}: bad value {self.raw(j)!r}: {why}")

    def f(self, j, allow_inf=False):
        text = self.raw(j)
        if not self.strict:
            return c_atof(text)
        try:
            x = float(text)
        except ValueError:
            raise ArgumentError(f"{self.flag}: value {text!r} is not a number") from None
        if not math.isfinite(x) and not (allow_inf and math.isinf(x)):
            raise ArgumentError(f"{self.flag}: value {text!r} is not a finite number")
        return x

    def i(self, j):
        text = self.raw(j)
        if not self.strict:
            return c_atoi(text)
        try:
            return int(text)
        except ValueError:
            pass
        try:
            x = float(text)
        except ValueError:
            raise ArgumentError(f"{self.flag}: value {text!r} is not an integer") from None
        if not math.isfinite(x) or x != int(x):
            raise ArgumentError(f"{self.flag}: value {text!r} is not an integer")
        return int(x)


def _read_header(st, path, is_mask, warn, cwd):
    from .io.smv import read_smv
    what = "-mask" if is_mask else "-img"
    img = read_smv(_path(path, cwd), what=f"{what}")
    st.fpixels = img.data.shape[1]
    st.spixels = img.data.shape[0]
    v = img.value("PIXEL_SIZE")
    if not math.isnan(v):
        st.pixel = v / 1000.0
    st.detsize_f = st.pixel * st.fpixels
    st.detsize_s = st.pixel * st.spixels
    v = img.value("DISTANCE")
    if not math.isnan(v):
        st.distance = v / 1000.0
    v = img.value("CLOSE_DISTANCE")
    if not math.isnan(v):
        st.close_distance = v / 1000.0
    v = img.value("WAVELENGTH")
    if not math.isnan(v):
        st.lambda0 = v / 1e10
    v = img.value("BEAM_CENTER_X")
    if not math.isnan(v):
        st.Xbeam = v / 1000.0
    v = img.value("BEAM_CENTER_Y")
    if not math.isnan(v):
        st.Ybeam = (st.detsize_s - v / 1000.0) if is_mask else v / 1000.0
    v = img.value("ORGX")
    if not math.isnan(v):
        st.ORGX = v
    v = img.value("ORGY")
    if not math.isnan(v):
        st.ORGY = v
    v = img.value("PHI")
    if not math.isnan(v):
        st.phi0 = v / RTD
    v = img.value("OSC_RANGE")
    if not math.isnan(v):
        st.osc = v / RTD
    return img


def _path(p, cwd):
    if cwd is None or os.path.isabs(p):
        return p
    return os.path.join(cwd, p)


# the nbragg command line's own flags (cli.py), each with one value
OWN_FLAGS = ("-threads", "-device", "-precision")


def _did_you_mean(flag):
    """'; did you mean -x?' for the known flag closest to a mistyped one (or '')."""
    close = difflib.get_close_matches(flag, sorted(_KNOWN | set(OWN_FLAGS)), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def parse_nanobragg_args(args, warn=None, cwd=None):
    """Parse a nanoBragg argument list into a :class:`ParsedArgs`.

    Raises :class:`~nbragg.errors.NbraggError` for anything the user must fix.  ``args``
    is a list of words; one string is split as a shell would.
    """
    if isinstance(args, str):
        import shlex
        args = shlex.split(args)
    args = [str(a) for a in args]
    warnings = []
    notes = []

    def _warn(msg):
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    st = _State()
    # pre-pass: -img and -mask are read before anything else
    for i, a in enumerate(args):
        if a.startswith("-") and i + 1 < len(args):
            if "-img" in a:
                st.imgfile = args[i + 1]
            if "-mask" in a:
                st.maskfile = args[i + 1]
    mask_img = None
    if st.maskfile is not None:
        mask_img = _read_header(st, st.maskfile, True, _warn, cwd)
    if st.imgfile is not None:
        _read_header(st, st.imgfile, False, _warn, cwd)

    consumed = set()
    for i, a in enumerate(args):
        if not a.startswith("-"):
            continue
        exact = a in _KNOWN
        matched = []
        for h in HANDLERS:
            if not h.test(a):
                continue
            if isinstance(h.need, tuple):   # "-misset random"
                if not (i + 1 < len(args) and "rand" in args[i + 1]):
                    continue
                need = 1
            else:
                need = h.need
            primary = exact and a in h.names
            if not len(args) > i + need:
                if primary or not exact:
                    if h.names == ("-curved_det",):
                        _warn("-curved_det is ignored when it is the last argument (as in nanoBragg.c)")
                        break
                    raise ArgumentError(f"{a}: expects {need} value(s), found {len(args) - i - 1}")
                continue
            strict = primary or (not exact and not matched)
            rd = _Reader(args, i, a, strict=strict)
            h.action(st, None, rd)
            matched.append(h)
            st.given.add(h.names[0])
            if primary or (not exact and len(matched) == 1):
                consumed.update(range(i + 1, i + 1 + need))
                if h.no_effect:
                    _warn(f"{a} has no effect: {h.no_effect}")
            elif (a, h.names[0]) not in _INTENDED:
                _warn(f"{a} also acts as {h.names[0]}, because nanoBragg.c matches flags by substring "
                      f"(read {' '.join(args[i:i + 1 + need])!r} as {h.names[0]})")
            if h.stop:
                break
        if a in _PREPASS_NAMES:
            consumed.add(i + 1)
            continue
        if not matched and i not in consumed:
            if re.fullmatch(r"-[0-9.]+([eE][-+]?\d+)?", a):
                continue
            _warn(f"unknown flag {a} ignored{_did_you_mean(a)}")
        elif matched and not exact:
            _warn(f"{a} is not a nanoBragg flag; nanoBragg.c reads it as {matched[0].names[0]}")
    return _finish(st, args, warnings, notes, _warn, mask_img, cwd)


def _finish(st, args, warnings, notes, warn, mask_img, cwd):
    """The parsed flags -> ParsedArgs: validation, nanoBragg's derived settings, the
    records in user units."""
    fpixels, spixels = _detector_pixels(st, mask_img)
    _beam_and_sample(st, warn)
    if st.exptfile is not None:
        _read_experiment_list(st, warn, cwd)
    _validate(st, fpixels, spixels)
    _validate_sf_sources(st, warn)
    crystal_kw, Na, Nb, Nc, fudge, interpolate_choice = _crystal_size(st, warn, notes, cwd)
    structure = _structure(st, st.out, warn, cwd, interpolate_choice, crystal_cell=crystal_kw.get("cell"))
    sources = None
    if st.sourcefile is not None:
        from .io.sourcefile import read_sourcefile
        sources = read_sourcefile(_path(st.sourcefile, cwd))
    spectrum = None
    if st.spectrumfile is not None:
        from .io.spectrum import read_spectrum
        spectrum = read_spectrum(_path(st.spectrumfile, cwd))
    if st.stolfile is not None:
        from .io._text import read_text
        read_text(_path(st.stolfile, cwd), "stol")
    _resolve_roi(st, fpixels, spixels)
    if st.exptfile is not None:        # -roi limits each panel of the list's, not nanoBragg's one
        st.expt_roi, st.roi = st.roi, None
    _convention_warnings(st, args, warn)
    _unit_warnings(st, args, warn)
    try:
        # records built in this order, so that the first bad value reported is the same
        detector = _detector_record(st, fpixels, spixels, mask_img)
        beam = _beam_record(st, sources, spectrum)
        crystal = _crystal_record(st, crystal_kw, Na, Nb, Nc, fudge)
        sampling = _sampling_record(st)
        exp = Experiment(beam=beam, detector=detector, crystal=crystal, structure=structure, sampling=sampling,
                         physics=st.physics)
    except ParameterError as exc:
        raise ArgumentError(_flagify(str(exc))) from None
    if st.exptfile is not None:
        exp = _on_experiment_list(st, exp, warn, cwd)
    out = st.out
    for name in ("floatfile", "intfile", "pgmfile", "noisefile"):
        setattr(out, name, _path(getattr(out, name), cwd))
    if out.dumpfile is not None:
        out.dumpfile = _path(out.dumpfile, cwd)
    if out.nxmxfile is not None:
        out.nxmxfile = _path(out.nxmxfile, cwd)
    return ParsedArgs(experiment=exp, outputs=out, warnings=warnings, notes=notes,
                      hklfile=st.hklfile, matfile=st.matfile, sourcefile=st.sourcefile,
                      maskfile=st.maskfile, imgfile=st.imgfile)


# flags that place nanoBragg's one panel: an experiment list's panels replace it
_PANEL_FLAGS = ("-distance", "-close_distance", "-pixel", "-detpixels", "-detpixels_f", "-detpixels_s", "-detsize",
                "-detsize_f", "-detsize_s", "-Xbeam", "-Ybeam", "-Xclose", "-Yclose", "-ORGX", "-ORGY", "-pivot",
                "-mosflm", "-xds", "-adxv", "-denzo", "-dials", "-fdet_vector", "-sdet_vector", "-odet_vector",
                "-pix0_vector", "-twotheta_axis", "-twotheta", "-detector_rotx", "-detector_roty", "-detector_rotz",
                "-curved_det", "-mask", "-detector_thick", "-detector_abs", "-detector_thicksteps",
                "-thicksteps")


def _read_experiment_list(st, warn, cwd):
    """-expt FILE: read the chosen experiment; without -cell or -mat its cell is the one
    the crystal-size flags and the structure-factor files see."""
    import json
    from .errors import InputFileError
    from .io.dials import read_experiment
    path = _path(st.exptfile, cwd)
    try:
        with open(path, "rb") as fh:
            n = len(json.loads(fh.read().decode("utf-8")).get("experiment") or [])
    except (OSError, ValueError, AttributeError):
        n = None          # read_experiment says what is wrong with the file
    if n is not None and not 0 <= st.expt_index < n:
        raise ArgumentError(f"-expt_index: {st.expt_index} is not an experiment of {st.exptfile} "
                            f"(it holds {n}: 0 to {n - 1})")
    try:
        # (a missing crystal is this command's error, below, or replaced by -cell / -mat)
        st.expt = read_experiment(path, st.expt_index, image=st.expt_image,
                                  warn=lambda m: None if "has no crystal" in m else warn(m))
    except InputFileError as e:
        raise ArgumentError(f"-expt: {e}") from None
    if st.matfile is None and not st.user_cell:
        if not st.expt.provenance.has_crystal:
            raise ArgumentError(f"-expt {st.exptfile}: experiment {st.expt_index} has no crystal; give -cell or -mat")
        c = st.expt.crystal.cell
        st.cell = list(c[:3]) + [x / RTD for x in c[3:]]
        st.user_cell = True
        st.cell_from_expt = True
    elif "-cell" in st.given and st.matfile is None and st.expt.provenance.has_crystal:
        warn("-cell with -expt: the cell replaces the list's; the crystal keeps the list's orientation")


def _on_experiment_list(st, exp, warn, cwd):
    """-expt FILE: the experiment list's beam, detector, crystal and rotation, with the
    flags given on the command line on top of them."""
    base = st.expt
    for flag in sorted(st.given & set(_PANEL_FLAGS)):
        warn(f"{flag} has no effect with -expt: the experiment list's panels place the detector")
    given = st.given
    b = exp.beam
    beam = b.replace(
        wavelength=b.wavelength if given & {"-lambda", "-energy"} else base.beam.wavelength,
        polarization=b.polarization if "-polar" in given else base.beam.polarization,
        **({} if given & {"-divergence", "-hdivrange", "-vdivrange", "-hdivstep", "-vdivstep", "-hdivsteps",
                          "-vdivsteps", "-divsteps"}
           else dict(hdiv_range=base.beam.hdiv_range, vdiv_range=base.beam.vdiv_range)))
    d = base.detector
    vectors = {name: st.custom_vectors[name] for name, flag in
               (("beam_vector", "-beam_vector"), ("polar_vector", "-polar_vector"),
                ("spindle_axis", "-spindle_axis")) if flag in given}
    panels = d.panels
    if st.expt_roi is not None:      # -roi: the same pixels of every panel
        try:
            panels = tuple(p.replace(roi=st.expt_roi) for p in panels)
        except ParameterError as e:
            raise ArgumentError(f"-roi: {e}") from None
    detector = d.replace(point_pixel=exp.detector.point_pixel, panels=panels, **vectors)
    c, x = exp.crystal, base.crystal
    kw = {}
    if not given & {"-cell", "-mat"}:
        kw.update(cell=x.cell, orientation=x.orientation)
    elif "-mat" not in given and base.provenance.has_crystal:
        # -cell: its lengths and angles in the list's orientation (as -cell with -mat keeps
        # the matrix's directions)
        kw.update(orientation=x.orientation)
    if not given & {"-N", "-Na", "-Nb", "-Nc", "-xtalsize", "-xtal_size", "-samplesize", "-sample_size",
                    "-xtal_thick", "-xtal_width", "-xtal_height", "-sample_thick", "-sample_width",
                    "-sample_height"}:
        kw.update(Na=x.Na, Nb=x.Nb, Nc=x.Nc)
    if "-mosaic" not in given:
        kw.update(mosaic_spread=x.mosaic_spread)
    if not given & {"-phi", "-osc", "-phistep", "-phisteps"}:
        kw.update(phi0=x.phi0, osc=x.osc)
    elif "-phi" not in given:
        kw.update(phi0=x.phi0)
    try:
        return exp.replace(beam=beam, detector=detector, crystal=c.replace(**kw), provenance=base.provenance)
    except ParameterError as e:
        raise ArgumentError(f"-expt {st.exptfile}: {e}") from None


def _detector_pixels(st, mask_img):
    """(fpixels, spixels) from -detpixels / -detsize / -pixel, as nanoBragg.c rounds them."""
    if st.pixel <= 0:
        raise ArgumentError(f"-pixel: pixel size {st.pixel * 1000:g} mm must be positive")
    if st.fpixels < 0 or st.spixels < 0:
        raise ArgumentError(f"-detpixels: {st.fpixels}x{st.spixels} pixels is not a detector size")
    if st.fpixels:
        st.detsize_f = st.pixel * st.fpixels
    if st.spixels:
        st.detsize_s = st.pixel * st.spixels
    if st.detsize_f <= 0 or st.detsize_s <= 0:
        raise ArgumentError(f"-detsize: {st.detsize_f * 1000:g} x {st.detsize_s * 1000:g} mm is not a detector size")
    fpixels = math.ceil(st.detsize_f / st.pixel - 0.5)
    spixels = math.ceil(st.detsize_s / st.pixel - 0.5)
    if fpixels < 1 or spixels < 1:
        raise ArgumentError(f"-detpixels/-detsize: the detector has {fpixels}x{spixels} pixels")
    if mask_img is not None and mask_img.data.shape != (spixels, fpixels):
        raise ArgumentError(
            f"-mask: the mask is {mask_img.data.shape[1]}x{mask_img.data.shape[0]} pixels but the detector is "
            f"{fpixels}x{spixels}")
    return fpixels, spixels


def _beam_and_sample(st, warn):
    """-flux/-exposure/-beamsize make the fluence; the beam clips the sample."""
    if st.flux != 0.0 and st.exposure > 0.0 and st.beamsize >= 0:
        if st.beamsize == 0:
            raise ArgumentError("-beamsize: a beam size of 0 with -flux gives an infinite fluence")
        st.fluence = st.flux * st.exposure / st.beamsize / st.beamsize
    if st.beamsize >= 0:
        if st.beamsize < st.sample[1]:
            warn(f"clipping sample ({st.sample[1]:g} m high) with beam ({st.beamsize:g} m)")
            st.sample[1] = st.beamsize
        if st.beamsize < st.sample[2]:
            warn(f"clipping sample ({st.sample[2]:g} m wide) with beam ({st.beamsize:g} m)")
            st.sample[2] = st.beamsize


def _validate(st, fpixels, spixels):
    """Values no simulation can use: one error naming the flag."""
    for name, v in (("-lambda", st.lambda0), ("-fluence", st.fluence)):
        if not math.isfinite(v):
            raise ArgumentError(f"{name}: value {v:g} is not finite")
    if not st.lambda0 > 0:
        raise ArgumentError(f"-lambda: wavelength {st.lambda0 * 1e10:g} A must be positive")
    if st.fluence < 0:
        if st.flux < 0:
            raise ArgumentError(f"-flux: {st.flux:g} photons/s must not be negative")
        raise ArgumentError(f"-fluence: {st.fluence:g} photons/m^2 must not be negative")
    if not (st.distance > 0 or (st.close_distance == st.close_distance and st.close_distance > 0)):
        raise ArgumentError(f"-distance: {st.distance * 1000:g} mm must be positive")
    if st.close_distance == st.close_distance and not st.close_distance > 0:
        raise ArgumentError(f"-close_distance: {st.close_distance * 1000:g} mm must be positive")
    for name, n in (("-Na", st.Na), ("-Nb", st.Nb), ("-Nc", st.Nc)):
        if n < 0:
            raise ArgumentError(f"{name}: {n:g} unit cells; the number of cells must not be negative")
    if st.out.printout_pixel is not None:
        pf, ps = st.out.printout_pixel
        if not (0 <= pf < fpixels and 0 <= ps < spixels):
            raise ArgumentError(f"-printout_pixel: pixel ({pf}, {ps}) is outside the {fpixels}x{spixels} detector")
    if not _sf_sources(st) and st.out.dumpfile is None and st.default_F == 0.0:
        raise ArgumentError("no structure factors: give -hkl FILE (or -mtz, -sf_cif, -model FILE) or -default_F F > 0 "
                            "(usage: nbragg -mat auto.mat -hkl Fs.hkl ...)")
    if st.matfile is None and st.cell[0] == 0.0:
        raise ArgumentError("no unit cell: give -cell a b c alpha beta gamma or -mat FILE "
                            "(usage: nbragg -mat auto.mat -hkl Fs.hkl ...)")


# the flags that give structure factors from a file, and the _State field of each
SF_SOURCE_FLAGS = (("-hkl", "hklfile"), ("-mtz", "mtzfile"), ("-sf_cif", "sf_ciffile"), ("-model", "modelfile"))


def _sf_sources(st):
    """[(flag, file)] of the structure-factor files given."""
    return [(flag, getattr(st, attr)) for flag, attr in SF_SOURCE_FLAGS if getattr(st, attr) is not None]


def _validate_sf_sources(st, warn):
    """One structure-factor file at most; -column and -sf_dmin only where they act."""
    given = _sf_sources(st)
    if len(given) > 1:
        both = " and ".join(f"{flag} {name}" for flag, name in given)
        raise ArgumentError(f"{both}: give structure factors from one file only "
                            f"(one of {', '.join(f for f, _ in SF_SOURCE_FLAGS)})")
    flag = given[0][0] if given else None
    if st.sf_dmin is not None and not st.sf_dmin > 0:
        raise ArgumentError(f"-sf_dmin: value {st.sf_dmin:g} must be a positive resolution in Angstrom")
    if flag == "-model" and st.sf_dmin is None:
        raise ArgumentError(f"-model {st.modelfile}: needs -sf_dmin A, the resolution to which structure factors "
                            "are computed from the model (e.g. -sf_dmin 2)")
    if st.sf_column is not None and flag not in ("-mtz", "-sf_cif"):
        warn(f"-column {st.sf_column} has no effect without -mtz or -sf_cif")
    if st.sf_dmin is not None and flag not in ("-mtz", "-sf_cif", "-model"):
        warn(f"-sf_dmin {st.sf_dmin:g} has no effect without -mtz, -sf_cif or -model"
             + (" (an HKL file has no unit cell)" if flag == "-hkl" else ""))


def _read_sf_file(st, warn, cwd):
    """The structure-factor file's reflections (an HKLData), or None."""
    from .errors import InputFileError
    from .io.hkl import read_hkl
    given = _sf_sources(st)
    if not given:
        return None
    flag, name = given[0]
    path = _path(name, cwd)
    if flag == "-hkl":
        return read_hkl(path, warn=warn)
    from .io import reflections
    try:
        if flag == "-mtz":
            return reflections.read_mtz(path, column=st.sf_column, dmin=st.sf_dmin, warn=warn)
        if flag == "-sf_cif":
            return reflections.read_mmcif_reflections(path, column=st.sf_column, dmin=st.sf_dmin, warn=warn)
        return reflections.structure_factors_from_model(path, st.sf_dmin, warn=warn)
    except InputFileError as exc:
        raise InputFileError(f"{flag}: {exc}") from None
    except ParameterError as exc:
        raise ArgumentError(f"{flag}: {exc}") from None


def _check_sf_cell(data, crystal_cell, flag, warn):
    """Warn when the file's cell is not the simulated crystal's: the indices would then
    belong to another lattice."""
    cell = getattr(data, "cell", None)
    if cell is None or crystal_cell is None:
        return
    lengths_off = any(abs(x - y) > 0.01 * y for x, y in zip(cell[:3], crystal_cell[:3]))
    angles_off = any(abs(x - y) > 1.0 for x, y in zip(cell[3:], crystal_cell[3:]))
    if lengths_off or angles_off:
        fmt = " ".join(f"{x:.5g}" for x in cell)
        warn(f"{flag}: the file's unit cell ({fmt}) differs from the simulated crystal's "
             f"({' '.join(f'{x:.5g}' for x in crystal_cell)}); its reflections are used by index as they are")


def _crystal_size(st, warn, notes, cwd):
    """The crystal's vectors, its number of cells (from -N or the sample size), the spot
    metric's fudge, and the automatic interpolation choice (made on the -N flags, before
    the sample size changes N, as in nanoBragg.c)."""
    Na_flag, Nb_flag, Nc_flag = st.Na, st.Nb, st.Nc
    interp_auto = st.interpolate > 1
    interpolate_choice = None if interp_auto else bool(st.interpolate)
    crystal_kw = _crystal_vectors(st, warn, notes, cwd)
    lengths = crystal_kw.pop("_lengths_m")
    metric_scale = crystal_kw.pop("_shape_metric_scale")
    fudge = st.fudge * metric_scale if st.shape in ("gauss", "tophat") else st.fudge
    Na, Nb, Nc = st.Na, st.Nb, st.Nc
    if st.sample[0] > 0:
        Na = math.ceil(st.sample[0] / lengths[0])
    if st.sample[1] > 0:
        Nb = math.ceil(st.sample[1] / lengths[1])
    if st.sample[2] > 0:
        Nc = math.ceil(st.sample[2] / lengths[2])
    if interp_auto and (Na, Nb, Nc) != (Na_flag, Nb_flag, Nc_flag):
        interpolate_choice = Na_flag <= 2 or Nb_flag <= 2 or Nc_flag <= 2
    Na, Nb, Nc = (max(float(n), 1.0) for n in (Na, Nb, Nc))
    return crystal_kw, Na, Nb, Nc, fudge, interpolate_choice


def _resolve_roi(st, fpixels, spixels):
    """-roi limits inside the detector; negative limits are unset (nanoBragg.c)."""
    if st.roi is not None:
        given = " ".join(str(x) for x in st.roi)
        # nanoBragg.c: a negative limit is unset -- a negative min is the first pixel, a
        # negative max the far edge of the detector
        xmin, xmax, ymin, ymax = st.roi
        xmin, ymin = max(xmin, 0), max(ymin, 0)
        if st.exptfile is not None:          # the limits apply to each panel of the list's
            fpixels = spixels = 2 ** 31 - 1
        xmax = fpixels if xmax < 0 else xmax
        ymax = spixels if ymax < 0 else ymax
        st.roi = [xmin, xmax, ymin, ymax]
        if xmin > xmax or ymin > ymax:
            raise ArgumentError(f"-roi {given}: min is larger than max")
        if xmin > fpixels - 1 or ymin > spixels - 1:
            raise ArgumentError(
                f"-roi {given}: outside the {fpixels}x{spixels} detector "
                f"(pixel indices run from 0 to {fpixels - 1} and {spixels - 1})")


def _convention_warnings(st, args, warn):
    """Flags that the detector convention makes have no effect (nanoBragg.c's rules)."""
    conv = st.convention
    if conv in ("xds", "dials") and (not math.isnan(st.Xbeam) or not math.isnan(st.Ybeam)):
        if any(a in ("-Xbeam", "-Ybeam") for a in args):
            warn(f"-Xbeam/-Ybeam do not move the detector under the {conv.upper()} convention "
                 "(sample pivot); they only go into the SMV header, as in nanoBragg.c")
    if conv != "custom" and any(a == "-pivot" for a in args):
        warn(f"-pivot has no effect under the {conv.upper()} convention, which fixes the pivot (as in nanoBragg.c)")
    if "twotheta_axis" in st.custom_vectors and abs(np.linalg.norm(st.custom_vectors["twotheta_axis"]) - 1.0) > 1e-12:
        warn("-twotheta_axis is not a unit vector; nanoBragg.c uses it as given (the detector is scaled)")


def _last_value(args, flag):
    """The value given after the last exact ``flag`` (or None)."""
    at = [i for i, a in enumerate(args[:-1]) if a == flag]
    return args[at[-1] + 1] if at else None


def _unit_warnings(st, args, warn):
    """Values that nanoBragg.c takes silently but that are almost always a slip."""
    if _last_value(args, "-energy") is not None:
        ev = HC_EV_ANGSTROM / (st.lambda0 * 1e10)
        if ev < 100.0:
            warn(f"-energy {ev:g} is in eV: a wavelength of {st.lambda0 * 1e10:g} A; for keV give "
                 f"-energy {ev * 1000:g}")
    v = _last_value(args, "-mosaic")
    if v is not None and st.mosaic_spread < 0.0:
        warn(f"-mosaic {v}: a negative spread means unset in nanoBragg.c, so the crystal has no mosaicity")
    v = _last_value(args, "-phisteps")
    if v is not None and st.phisteps == 0 and st.osc > 0.0:
        warn(f"-phisteps {v} with -osc {st.osc * RTD:g}: nanoBragg.c takes 1 phi step, so the image is a still "
             f"at -phi {st.phi0 * RTD:g} and the oscillation is not sampled")


def _detector_record(st, fpixels, spixels, mask_img):
    """The Detector record (mm, degrees, microns) of the parsed SI values."""
    conv = st.convention
    mask = None if mask_img is None else (mask_img.data != 0).astype(np.uint8)
    return Detector(
        convention=conv,
        pivot=st.pivot if conv == "custom" else None,
        fpixels=fpixels, spixels=spixels, pixel_size=st.pixel * 1000.0,
        detsize_f=None if st.detsize_f == st.pixel * fpixels else st.detsize_f * 1000.0,
        detsize_s=None if st.detsize_s == st.pixel * spixels else st.detsize_s * 1000.0,
        distance=st.distance * 1000.0,
        close_distance=None if math.isnan(st.close_distance) else st.close_distance * 1000.0,
        beam_x=None if math.isnan(st.Xbeam) else st.Xbeam * 1000.0,
        beam_y=None if math.isnan(st.Ybeam) else st.Ybeam * 1000.0,
        xclose=None if math.isnan(st.Xclose) else st.Xclose * 1000.0,
        yclose=None if math.isnan(st.Yclose) else st.Yclose * 1000.0,
        orgx=None if math.isnan(st.ORGX) else st.ORGX,
        orgy=None if math.isnan(st.ORGY) else st.ORGY,
        rotx=st.rot[0] * RTD, roty=st.rot[1] * RTD, rotz=st.rot[2] * RTD,
        twotheta=st.twotheta * RTD,
        curved=st.curved, point_pixel=st.point_pixel,
        thickness=st.detector_thick * 1e6,
        thicksteps=None if st.detector_thicksteps <= 0 else st.detector_thicksteps,
        absorption_depth=None if st.detector_mu < 0 else (math.inf if st.detector_mu == 0 else 1e6 / st.detector_mu),
        roi=None if st.roi is None else tuple(st.roi),
        mask=mask,
        **{k: v for k, v in st.custom_vectors.items()},
    )


def _beam_record(st, sources, spectrum=None):
    """The Beam record (A, photons/m^2, mrad, percent) of the parsed SI values."""
    return Beam(
        wavelength=st.lambda0 * 1e10, fluence=st.fluence, polarization=st.polarization,
        nopolar=st.nopolar,
        hdiv_range=None if st.hdivrange < 0 else st.hdivrange * 1000.0,
        hdiv_step=None if st.hdivstep < 0 else st.hdivstep * 1000.0,
        hdiv_steps=None if st.hdivsteps <= 0 else st.hdivsteps,
        vdiv_range=None if st.vdivrange < 0 else st.vdivrange * 1000.0,
        vdiv_step=None if st.vdivstep < 0 else st.vdivstep * 1000.0,
        vdiv_steps=None if st.vdivsteps <= 0 else st.vdivsteps,
        round_div=st.round_div,
        dispersion=st.dispersion * 100.0,
        disp_steps=None if st.dispsteps <= 0 else st.dispsteps,
        sources=sources, spectrum=spectrum, source_weights=st.source_weights,
    )


def _crystal_record(st, crystal_kw, Na, Nb, Nc, fudge):
    """The Crystal record (degrees) of the parsed SI values."""
    return Crystal(
        Na=Na, Nb=Nb, Nc=Nc, shape=st.shape, fudge=fudge,
        mosaic_spread=None if st.mosaic_spread < 0 else st.mosaic_spread * RTD,
        mosaic_domains=None if st.mosaic_domains <= 0 else st.mosaic_domains,
        mosaic_seed=-st.mosaic_seed,
        phi0=st.phi0 * RTD,
        osc=None if st.osc < 0 else st.osc * RTD,
        phistep=None if st.phistep < 0 else st.phistep * RTD,
        phisteps=None if st.phisteps < 0 else st.phisteps,
        **crystal_kw,
    )


def _sampling_record(st):
    """The Sampling record (A, microns) of the parsed SI values."""
    return Sampling(
        oversample=None if st.oversample <= 0 else st.oversample,
        oversample_omega=st.os_omega, oversample_polar=st.os_polar, oversample_thick=st.os_thick,
        dmin=st.dmin * 1e10, water=st.water * 1e6,
    )


_FIELD_FLAGS = {
    "Detector.fpixels": "-detpixels", "Detector.spixels": "-detpixels", "Detector.pixel_size": "-pixel",
    "Detector.distance": "-distance", "Detector.close_distance": "-close_distance", "Detector.roi": "-roi",
    "Beam.wavelength": "-lambda", "Beam.fluence": "-fluence", "Crystal.cell": "-cell",
    "Crystal.fudge": "-fudge", "Crystal.misset": "-misset",
    "Detector.thickness": "-detector_thick", "Detector.absorption_depth": "-detector_abs",
    "Sampling.dmin": "-dmin", "Beam.spectrum": "-spectrum",
    **{f"Detector.{v}": f"-{v}" for v in ("fdet_vector", "sdet_vector", "odet_vector", "beam_vector",
                                          "polar_vector", "spindle_axis", "twotheta_axis")},
}


def _flagify(msg):
    for field_name, flag in _FIELD_FLAGS.items():
        if msg.startswith(field_name):
            return f"{flag} ({field_name})" + msg[len(field_name):]
    return msg


def _c_real_vectors(recip, lengths, V_c, misset):
    """nanoBragg.c's real-space vectors (rows, metres) from reciprocal rows (1/A).

    Same operations in the same order as the C (misset rotation of the reciprocal
    vectors, cross products, rescaling, conversion to metres), so that quantities the C
    derives from them -- such as N from -xtalsize, a ceil() of a ratio -- agree even on
    knife edges.  ``lengths`` (A) and ``V_c`` are given for -cell, None for -mat.
    """
    a_s, b_s, c_s = (rotate_xyz(v, *misset) if any(misset) else np.array(v, dtype=float) for v in recip)
    crosses = [cross(b_s, c_s), cross(c_s, a_s), cross(a_s, b_s)]
    if lengths is not None:
        V_cell = V_c
        vecs = []
        for d, L in zip(crosses, lengths):
            mag = math.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            vecs.append(V_cell * ((L / V_cell) / mag * d))
    else:
        V_cell = 1.0 / dot(a_s, crosses[0])
        vecs = [V_cell * d for d in crosses]
    return np.array([1e-10 * v for v in vecs])


def _crystal_vectors(st, warn, notes, cwd):
    """Cell, misset and base orientation as nanoBragg.c derives them.

    The C builds real-space vectors from ``-cell`` (through its reciprocal cell, whose
    c*_z is right only for orthogonal cells, so a triclinic cell's angles come out slightly
    different from the ones given) or ``-mat``; nbragg stores
    the cell those vectors actually have plus the rotation that carries nbragg's
    standard frame onto them, so the Experiment describes the same crystal.
    """
    cell = list(st.cell)
    recip = None
    lengths = None
    V_c = None
    if st.user_cell:
        if cell[0] <= 0:
            raise ArgumentError("-cell: the cell edge a must be a positive number")
        for j in (1, 2):
            if cell[j] <= 0.0:
                cell[j] = cell[0]
        for j in (3, 4, 5):
            if cell[j] <= 0.0:
                cell[j] = math.pi / 2
        al, be, ga = cell[3:]
        if not (al + be + ga < 2 * math.pi and al < be + ga and be < al + ga and ga < al + be):
            raise ArgumentError(f"-cell: angles {' '.join(f'{x * RTD:g}' for x in cell[3:])} make no unit cell")
        cell_deg = tuple(cell[:3]) + tuple(x * RTD for x in cell[3:])
        recip = _reciprocal_standard(cell_deg, c_star_z_exact=False)
        lengths = cell[:3]
        s_ = (al + be + ga) / 2
        V_c = 2.0 * cell[0] * cell[1] * cell[2] * math.sqrt(
            abs(math.sin(s_) * math.sin(s_ - al) * math.sin(s_ - be) * math.sin(s_ - ga)))
    if st.matfile is not None:
        from .io.mat import read_mat
        m = read_mat(_path(st.matfile, cwd))
        notes.append(f"reading {st.matfile}")
        scale = 1e-10 / st.lambda0
        recip = np.array([m[:, 0] * scale, m[:, 1] * scale, m[:, 2] * scale])
        if lengths is not None:
            warn("-cell and -mat both given: nanoBragg.c keeps the -mat directions with the -cell lengths")
        else:
            V_star = dot(recip[0], cross(recip[1], recip[2]))
            if not np.isfinite(V_star) or V_star == 0.0:
                raise ArgumentError(f"-mat {st.matfile}: the reciprocal vectors are coplanar")
            V_c = 1.0 / V_star
    if recip is None or not np.all(np.isfinite(recip)):
        raise ArgumentError("no usable unit cell: give -cell a b c alpha beta gamma or -mat FILE")
    # random misset: drawn from the misset seed, then applied as three angles
    misset_rad = (0.0, 0.0, 0.0)
    if st.misset[0] == -1:
        gen = NRGenerator()
        idum = gen.seed_cell(st.misset_seed)
        umat = mosaic_rotation_umat(90.0, idum, gen, single_precision=True)[0]
        misset_rad = umat2misset(umat)
        notes.append("random orientation misset angles: %f %f %f deg" % tuple(x * RTD for x in misset_rad))
    elif st.misset[0] > 0:
        misset_rad = tuple(st.misset[1:])
    real = _c_real_vectors(recip, lengths, V_c, (0.0, 0.0, 0.0)) * 1e10
    if not np.all(np.isfinite(real)) or dot(real[0], cross(real[1], real[2])) <= 0:
        raise ArgumentError("-mat: the A matrix is left-handed or degenerate")
    rotated = _c_real_vectors(recip, lengths, V_c, misset_rad)
    cell_out = cell_from_vectors(real)
    B_std = cell_vectors(cell_out)
    U0 = real.T @ np.linalg.inv(B_std.T)
    lengths_m = np.array([math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]) for v in rotated])
    # nanoBragg.c derives the reciprocal vectors used by the Gaussian and top-hat spot
    # shapes with its own cell volume V_c, not the volume of the vectors it built; that
    # scales the spot-shape metric by (V/V_c)^2, which is the same as scaling -fudge.
    V = dot(real[0], cross(real[1], real[2]))
    metric_scale = (V / V_c) ** 2
    return {"cell": cell_out, "misset": tuple(x * RTD for x in misset_rad), "orientation": U0,
            "_lengths_m": lengths_m, "_shape_metric_scale": metric_scale}


def _structure(st, out, warn, cwd, interpolate_choice, crystal_cell=None):
    from .io.hkl import read_fdump
    grid = None
    origin = (0, 0, 0)
    count = 0
    data = _read_sf_file(st, warn, cwd)
    if data is not None:
        _check_sf_cell(data, crystal_cell, _sf_sources(st)[0][0], warn)
        grid, origin = data.to_grid(st.default_F if st.default_F != 0.0 else 0.0)
        count = len(data)
        if out.dumpfile is not None:
            from .io.hkl import write_fdump
            from .io.atomic import check_output_path
            check_output_path(out.dumpfile, "-dump")
            write_fdump(out.dumpfile, grid, origin)
    elif out.dumpfile is not None:
        grid, origin = read_fdump(out.dumpfile)
        count = grid.size
    if grid is None:
        if st.interpolate == 1:
            warn("-interpolate has no effect without -hkl (or -mtz, -sf_cif, -model) structure factors")
        return Structure(default_F=st.default_F, interpolate=interpolate_choice)
    return Structure(Fhkl=grid, hkl_origin=origin, hkl_count=count, default_F=st.default_F,
                     interpolate=interpolate_choice)
