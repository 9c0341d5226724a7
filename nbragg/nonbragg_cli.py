"""``nbragg-nonbragg``: nonBragg.c's command line (nanoBragg suite, James Holton and Ken Frankel).

Simulates the diffuse scattering of an amorphous sample (water, air, ice...) described by
a table of its structure factor F against sin(theta)/lambda, and writes the files
nonBragg.c writes: the float image, the SMV integer image, the PGM picture and the
Poisson noise image.  The physics is nbragg's amorphous-background term
(:class:`nbragg.Material`); this module reads nonBragg's flags, settles its geometry (beam
along +x, its own default beam centre, pivots and unnormalised two-theta axis) and
converts the image to files exactly as the C does.

Flags are matched as the C matches them (a substring test, with a few exact-length
ones), but a flag the C would ignore gets a warning and a missing or malformed value is
an error naming the flag.  Departures from the C, each documented in the README: the
table reader's (see :mod:`nbragg.io.stol`: comment lines skipped, rows sorted, duplicate
abscissae refused), the noise seed (1 unless ``-seed`` is given; the C takes the clock),
``-nopgm`` honoured (the C writes the PGM anyway), negative pixels written as 0 in the
PGM (the C's cast is undefined), the PGM holding only its pixels (the C appends as many
bytes of uninitialised memory) and the printed mean taken over the rendered pixels (the
C divides by an uninitialised counter).  ``-img`` (the inverse mode, which extracts F
from an image) and ``-Fmap`` are refused; ``-printout`` is ignored with a warning.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArgumentError, InputFileError, console_main, console_streams, help_or_version
from .io.stol import BUILTIN, builtin_path
from .nbargs import c_atof, c_atoi
from .noisify_cli import _c_int, _integer, _number
from .units import DEFAULT_FLUENCE, HC_EV_ANGSTROM, RTD

USAGE = """\
usage: nbragg-nonbragg -stol FILE [flags]     (nonBragg.c's flags; the same files are written)

table       -stol FILE (sin(theta)/lambda in 1/A, F)   -4stol FILE (4 stol, F)   -Q FILE (4 pi stol, F)
            (FILE may be a table shipped with nbragg, by name: water, ice, nanoice, air, helium)
sample      -thickness mm   -samplesize mm   -width mm -height mm   -density g/cm^3   -MW g/mol
            -molecules n
beam        -lambda A | -energy eV   -fluence ph/m^2 | -flux ph/s -exposure s -beamsize mm
            -polar k -nopolar   -dispersion % -dispsteps n   -divergence mrad -divsteps n
            -hdivrange -vdivrange mrad  -hdivstep -vdivstep mrad  -hdivsteps -vdivsteps n
            -round_div -square_div   -sourcefile FILE   -source_distance mm
detector    -distance mm | -close_distance mm   -pixel mm   -detpixels n (-detpixels_x/_y)
            -detsize mm (-detsize_x/_y)   -Xbeam -Ybeam mm | -Xclose -Yclose mm | -ORGX -ORGY px
            -pivot beam|sample   -fdet_vector -sdet_vector -beam_vector -polar_vector x y z
            -detector_rotx -detector_roty -detector_rotz -twotheta deg   -twotheta_axis x y z
            -curved_det   -point_pixel   -oversample n   -roi xmin xmax ymin ymax
header      -phi deg -osc deg -phistep deg -phisteps n
output      -floatfile F -intfile F -noisefile F -pgmfile F   -nonoise -nopgm   -scale s
            -pgmscale s   -adc offset   -seed n
            -h / --help (this text)   --version

Example: nbragg-nonbragg -stol water.stol -distance 250 -density 1 -thickness 1 -detpixels 512
"""

DEFAULT_SEED = 1     # the C seeds from the clock; a fixed, printed seed keeps runs repeatable

_NAN = math.nan


@dataclass
class Settings:
    """nonBragg.c's variables after its argument loop, with its defaults (SI units,
    radians), plus the flags' raw values where the API takes them in user units."""

    stolfile: str | None = None
    stol_flag: str = "-stol"
    units: str = "stol"
    sample_x: float = 1e-4
    sample_y: float = 1e-4
    sample_z: float = 1e-4
    density: float = 1.0                 # g/cm^3 as typed (the C holds it times 1e6)
    molecules: float = 0.0
    molecular_weight: float = 18.0
    Xbeam: float = _NAN
    Ybeam: float = _NAN
    Xclose: float = _NAN
    Yclose: float = _NAN
    ORGX: float = _NAN
    ORGY: float = _NAN
    pivot: str = "beam"
    fdet: tuple = (0.0, 0.0, 1.0)
    sdet: tuple = (0.0, -1.0, 0.0)
    beam: tuple = (1.0, 0.0, 0.0)
    polar: tuple = (0.0, 0.0, 1.0)
    twotheta_axis: tuple = (0.0, 1.0, 0.0)
    distance: float = 100.0e-3
    close_distance: float = _NAN
    source_distance_mm: float = 10000.0
    twotheta_deg: float = 0.0
    rot_deg: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    detsize_x: float = 102.4e-3
    detsize_y: float = 102.4e-3
    fpixels: int = 0
    spixels: int = 0
    pixel: float = 0.1e-3
    curved: bool = False
    point_pixel: bool = False
    polarization: float = 0.0
    nopolar: bool = False
    oversample: int = -1
    roi: list = field(default_factory=lambda: [-1, -1, -1, -1])
    wavelength: float = 1.0              # Angstrom (lambda0 * 1e10)
    fluence: float = DEFAULT_FLUENCE
    flux: float = 0.0
    exposure: float = 1.0
    beamsize: float = 1e-4
    dispersion: float = 0.0              # percent, as typed
    dispsteps: int = -1
    hdivrange: float | None = None       # mrad, as typed (None: the C's unset -1)
    vdivrange: float | None = None
    hdivstep: float | None = None
    vdivstep: float | None = None
    hdivsteps: int = -1
    vdivsteps: int = -1
    round_div: bool = True
    adc: float = 40.0
    phi0: float = 0.0
    osc: float = -1.0
    phistep: float = -1.0
    phisteps: int = -1
    sourcefile: str | None = None
    floatfile: str = "floatimage.bin"
    intfile: str = "intimage.img"
    pgmfile: str = "image.pgm"
    noisefile: str = "noiseimage.img"
    calculate_noise: bool = True
    write_pgm: bool = True
    intfile_scale: float = 0.0
    pgm_scale: float = 0.0
    seed: int = -DEFAULT_SEED
    seed_given: bool = False


# --------------------------------------------------------------------------- flags

class _Values:
    """The values after flag ``argv[i]``: read strictly (errors naming the flag) for a
    flag's own values, as C's atof/atoi for a word the C only reads as a side effect."""

    def __init__(self, argv, i, flag, strict):
        self.argv, self.i, self.flag, self.strict = argv, i, flag, strict

    def raw(self, j):
        return self.argv[self.i + 1 + j]

    def f(self, j):
        return _number(self.flag, self.raw(j)) if self.strict else c_atof(self.raw(j))

    def i_(self, j):
        text = self.raw(j)
        return _c_int(_integer(self.flag, text) if self.strict else c_atoi(text))

    def vec(self):
        v = tuple(self.f(j) for j in range(3))
        if self.strict and not any(v):
            raise ArgumentError(f"{self.flag}: the zero vector {' '.join(self.raw(j) for j in range(3))} has no "
                                "direction")
        return v


def _setf(attr, div=None, pivot=None):
    def act(st, v):
        x = v.f(0)
        setattr(st, attr, x / div if div is not None else x)
        if pivot:
            st.pivot = pivot
    return act


def _seti(attr):
    def act(st, v):
        setattr(st, attr, v.i_(0))
    return act


def _setraw(attr, extra=None):
    def act(st, v):
        setattr(st, attr, v.raw(0))
        if extra:
            extra(st)
    return act


def _flag(attr, value=True):
    def act(st, v):
        setattr(st, attr, value)
    return act


def _vector(attr):
    def act(st, v):
        setattr(st, attr, v.vec())
    return act


def _sample_all(st, v):
    x = v.f(0) / 1000
    st.sample_x = st.sample_y = st.sample_z = x


def _pivot(st, v):
    text = v.raw(0)
    if v.strict and "sample" not in text and "beam" not in text:
        raise ArgumentError(f"{v.flag}: value {text!r} is neither 'beam' nor 'sample'")
    if "sample" in text:
        st.pivot = "sample"
    if "beam" in text:
        st.pivot = "beam"


def _twotheta(st, v):
    st.twotheta_deg = v.f(0)
    st.pivot = "sample"


def _rot(k):
    def act(st, v):
        st.rot_deg[k] = v.f(0)
    return act


def _detsize(st, v):
    st.detsize_x = st.detsize_y = v.f(0) / 1000.0


def _detpixels(which):
    def act(st, v):
        n = v.i_(0)
        if v.strict and n <= 0:
            raise ArgumentError(f"{v.flag}: {n} pixels; the detector needs at least one")
        if "f" in which:
            st.fpixels = n
        if "s" in which:
            st.spixels = n
    return act


def _polar(st, v):
    st.polarization = v.f(0)
    st.nopolar = False


def _roi(st, v):
    st.roi = [v.i_(j) for j in range(4)]


def _wavelength(st, v):
    st.wavelength = v.f(0)


def _energy(st, v):
    e = v.f(0)
    if v.strict and not e > 0:
        raise ArgumentError(f"{v.flag}: value {v.raw(0)!r}: the photon energy must be positive")
    st.wavelength = HC_EV_ANGSTROM / e if e != 0 else math.inf


def _divergence(st, v):
    st.hdivrange = st.vdivrange = v.f(0)


def _divsteps(st, v):
    st.hdivsteps = st.vdivsteps = v.i_(0)


def _table(units):
    def act(st, v):
        st.stolfile = v.raw(0)
        st.units = units
        st.stol_flag = v.flag
    return act


def _seed(st, v):
    st.seed = -v.i_(0)
    st.seed_given = True


def _noisefile(st, v):
    st.noisefile = v.raw(0)
    st.calculate_noise = True


def _check_only(st, v):
    v.f(0)


def _nothing(st, v):
    pass


def _refuse(why):
    def act(st, v):
        raise ArgumentError(f"{v.flag}: {why}")
    return act


_INVERSE = ("-img, nonBragg.c's inverse mode (F(stol) extracted from an image), is not supported by "
            "nbragg-nonbragg")


@dataclass
class _Rule:
    names: tuple          # the spellings the flag is meant for
    test: object          # the C's test of the word
    need: int             # how many words the C requires after it ("argc > i + need")
    action: object
    takes: int = None     # how many of them are values (default: need)
    note: str = None      # a warning when given: no effect, or not supported

    def __post_init__(self):
        if self.takes is None:
            self.takes = self.need


def _ss(*pats):
    return lambda a: any(p in a for p in pats)


def _sslen(pat, n):
    return lambda a: pat in a and len(a) == n


_NO_EFFECT = "has no effect: nonBragg.c reads it and uses it nowhere"

# nonBragg.c's tests, in its order; the C tries every one on every word starting with '-'
RULES = [
    _Rule(("-samplesize", "-sample_size"), _ss("-samplesize", "-sample_size"), 1, _sample_all),
    _Rule(("-sample_thick", "-sample_thickness", "-sample_x", "-thick", "-thickness"),
          _ss("-sample_thick", "-sample_x", "-thick"), 1, _setf("sample_x", div=1000)),
    _Rule(("-sample_width", "-sample_y", "-width"), _ss("-sample_width", "-sample_y", "-width"), 1,
          _setf("sample_y", div=1000)),
    _Rule(("-sample_height", "-sample_heigh", "-sample_z", "-height", "-heigh"),
          _ss("-sample_heigh", "-sample_z", "-heigh"), 1, _setf("sample_z", div=1000)),
    _Rule(("-density", "-sample_density", "-sample_den"), _ss("-density", "-sample_den"), 1, _setf("density")),
    _Rule(("-molecules", "-sample_molecules"), _ss("-molecules", "-sample_molecules"), 1, _setf("molecules")),
    _Rule(("-MW", "-molecular", "-molecular_weight"), lambda a: a == "-MW" or "-molecular" in a, 1,
          _setf("molecular_weight")),
    _Rule(("-Xbeam",), _ss("-Xbeam"), 1, _setf("Xbeam", div=1000.0, pivot="beam")),
    _Rule(("-Ybeam",), _ss("-Ybeam"), 1, _setf("Ybeam", div=1000.0, pivot="beam")),
    _Rule(("-Xclose",), _ss("-Xclose"), 1, _setf("Xclose", div=1000.0, pivot="sample")),
    _Rule(("-Yclose",), _ss("-Yclose"), 1, _setf("Yclose", div=1000.0, pivot="sample")),
    _Rule(("-ORGX",), _ss("-ORGX"), 1, _setf("ORGX", pivot="sample")),
    _Rule(("-ORGY",), _ss("-ORGY"), 1, _setf("ORGY", pivot="sample")),
    _Rule(("-pivot",), _ss("-pivot"), 1, _pivot),
    _Rule(("-fdet_vector",), _ss("-fdet_vector"), 3, _vector("fdet")),
    _Rule(("-sdet_vector",), _ss("-sdet_vector"), 3, _vector("sdet")),
    _Rule(("-odet_vector",), _ss("-odet_vector"), 3, lambda st, v: v.vec(),
          note="has no effect: nonBragg.c replaces the detector normal by fdet x sdet"),
    _Rule(("-beam_vector",), _ss("-beam_vector"), 3, _vector("beam")),
    _Rule(("-polar_vector",), _ss("-polar_vector"), 3, _vector("polar")),
    _Rule(("-spindle_axis",), _ss("-spindle_axis"), 3, lambda st, v: v.vec(), note=_NO_EFFECT),
    _Rule(("-twotheta_axis",), _ss("-twotheta_axis"), 3, _vector("twotheta_axis")),
    _Rule(("-pix0_vector",), _ss("-pix0_vector"), 3, lambda st, v: v.vec(),
          note="has no effect: nonBragg.c overwrites the detector origin with the one it derives"),
    _Rule(("-distance",), _ss("-distance"), 1, _setf("distance", div=1000.0, pivot="beam")),
    _Rule(("-close_distance",), _ss("-close_distance"), 1, _setf("close_distance", div=1000.0, pivot="sample")),
    _Rule(("-source_distance",), _ss("-source_distance"), 1, _setf("source_distance_mm")),
    _Rule(("-twotheta",), _ss("-twotheta"), 1, _twotheta),
    _Rule(("-detector_rotx",), _ss("-detector_rotx"), 1, _rot(0)),
    _Rule(("-detector_roty",), _ss("-detector_roty"), 1, _rot(1)),
    _Rule(("-detector_rotz",), _ss("-detector_rotz"), 1, _rot(2)),
    _Rule(("-detsize",), _sslen("-detsize", 8), 1, _detsize),
    _Rule(("-detsize_x",), _ss("-detsize_x"), 1, _setf("detsize_x", div=1000.0)),
    _Rule(("-detsize_y",), _ss("-detsize_y"), 1, _setf("detsize_y", div=1000.0)),
    _Rule(("-detpixels",), _sslen("-detpixels", 10), 1, _detpixels("fs")),
    _Rule(("-detpixels_f", "-detpixels_x"), _ss("-detpixels_f", "-detpixels_x"), 1, _detpixels("f")),
    _Rule(("-detpixels_s", "-detpixels_y"), _ss("-detpixels_s", "-detpixels_y"), 1, _detpixels("s")),
    _Rule(("-curved_det",), _ss("-curved_det"), 1, _flag("curved"), takes=0),
    _Rule(("-pixel",), _ss("-pixel"), 1, _setf("pixel", div=1000.0)),
    _Rule(("-point_pixel",), _ss("-point_pixel"), 0, _flag("point_pixel")),
    _Rule(("-Fmap",), _ss("-Fmap"), 0, _refuse("the F map mode (each pixel replaced by its last F) is not "
                                               "supported by nbragg-nonbragg")),
    _Rule(("-polar",), _sslen("-polar", 6), 1, _polar),
    _Rule(("-nopolar",), _ss("-nopolar"), 0, _flag("nopolar")),
    _Rule(("-oversample",), _ss("-oversample"), 1, _seti("oversample")),
    _Rule(("-roi",), _ss("-roi"), 4, _roi),
    _Rule(("-lambda", "-wave", "-wavelength"), _ss("-lambda", "-wave"), 1, _wavelength),
    _Rule(("-energy",), _ss("-energy"), 1, _energy),
    _Rule(("-fluence",), _ss("-fluence"), 1, _setf("fluence")),
    _Rule(("-flux",), _ss("-flux"), 1, _setf("flux")),
    _Rule(("-exposure",), _ss("-exposure"), 1, _setf("exposure")),
    _Rule(("-beamsize",), _ss("-beamsize"), 1, _setf("beamsize", div=1000)),
    _Rule(("-dispersion",), _ss("-dispersion"), 1, _setf("dispersion")),
    _Rule(("-dispsteps",), _ss("-dispsteps"), 1, _seti("dispsteps")),
    _Rule(("-divergence",), _ss("-divergence"), 1, _divergence),
    _Rule(("-hdivrange",), _ss("-hdivrange"), 1, _setf("hdivrange")),
    _Rule(("-vdivrange",), _ss("-vdivrange"), 1, _setf("vdivrange")),
    _Rule(("-hdivstep",), _sslen("-hdivstep", 9), 1, _setf("hdivstep")),
    _Rule(("-hdivsteps",), _ss("-hdivsteps"), 1, _seti("hdivsteps")),
    _Rule(("-vdivstep",), _sslen("-vdivstep", 9), 1, _setf("vdivstep")),
    _Rule(("-vdivsteps",), _ss("-vdivsteps"), 1, _seti("vdivsteps")),
    _Rule(("-divsteps",), _ss("-divsteps"), 1, _divsteps),
    _Rule(("-round_div",), _ss("-round_div"), 0, _flag("round_div", True)),
    _Rule(("-square_div",), _ss("-square_div"), 0, _flag("round_div", False)),
    _Rule(("-adc",), _ss("-adc"), 1, _setf("adc")),
    _Rule(("-gain",), _ss("-gain"), 1, _check_only,
          note="has no effect: nonBragg.c uses the gain only in its -img mode, which is not supported"),
    _Rule(("-phi",), _sslen("-phi", 4), 1, _setf("phi0", div=RTD)),
    _Rule(("-osc",), _ss("-osc"), 1, _setf("osc", div=RTD)),
    _Rule(("-phistep",), _sslen("-phistep", 8), 1, _setf("phistep", div=RTD)),
    _Rule(("-phisteps",), _ss("-phisteps"), 1, _seti("phisteps")),
    _Rule(("-img",), _ss("-img"), 1, _refuse(_INVERSE)),
    _Rule(("-ignore",), _ss("-ignore"), 1, _check_only,
          note="has no effect: it belongs to the -img mode, which is not supported"),
    _Rule(("-stolout",), lambda a: "-stolout" in a and len(a) > 7, 1, _nothing,
          note="has no effect: it belongs to the -img mode, which is not supported"),
    _Rule(("-stol",), _sslen("-stol", 5), 1, _table("stol")),
    _Rule(("-4stol",), _sslen("-4stol", 6), 1, _table("4stol")),
    _Rule(("-Q",), _sslen("-Q", 2), 1, _table("Q")),
    _Rule(("-sourcefile",), _ss("-sourcefile"), 1, _setraw("sourcefile")),
    _Rule(("-floatfile", "-floatimage"), _ss("-floatfile", "-floatimage"), 1, _setraw("floatfile")),
    _Rule(("-intfile", "-intimage"), _ss("-intfile", "-intimage"), 1, _setraw("intfile")),
    _Rule(("-pgmfile", "-pgmimage"), _ss("-pgmfile", "-pgmimage"), 1, _setraw("pgmfile")),
    _Rule(("-noisefile", "-noiseimage"), _ss("-noisefile", "-noiseimage"), 1, _noisefile),
    _Rule(("-nonoise",), _ss("-nonoise"), 0, _flag("calculate_noise", False)),
    _Rule(("-nopgm",), _ss("-nopgm"), 0, _flag("write_pgm", False)),
    _Rule(("-noreject",), _ss("-noreject"), 0, _nothing, note=_NO_EFFECT),
    _Rule(("-scale",), _ss("-scale"), 1, _setf("intfile_scale")),
    _Rule(("-pgmscale",), _ss("-pgmscale"), 1, _setf("pgm_scale")),
    _Rule(("-coherent",), _ss("-coherent"), 0, _nothing, note="has no effect: nonBragg.c parses it and uses it "
                                                              "nowhere (the image is the same without it)"),
    _Rule(("-printout",), _ss("-printout"), 0, _nothing,
          note="is not supported by nbragg-nonbragg (nonBragg.c prints uninitialised values there); ignored"),
    _Rule(("-noprogress",), _ss("-noprogress"), 0, _nothing),
    _Rule(("-progress",), _ss("-progress"), 0, _nothing),
    _Rule(("-printout_pixel",), _ss("-printout_pixel"), 2, lambda st, v: (v.i_(0), v.i_(1)),
          note="is not supported by nbragg-nonbragg (nonBragg.c prints uninitialised values there); ignored"),
    _Rule(("-seed",), _ss("-seed"), 1, _seed),
]
KNOWN = sorted({n for r in RULES for n in r.names})
# a word matching a rule it is not named by is a C quirk worth a warning, except these
_INTENDED = {("-printout_pixel", "-printout")}
# nanoBragg's flags that nonBragg.c does not have (it ignores them, silently)
_NANOBRAGG_ONLY = {"-dispstep", "-detector_thick", "-detector_thicksteps", "-detector_abs", "-mosflm", "-xds",
                   "-adxv", "-denzo", "-dials", "-dmin", "-mat", "-hkl", "-cell", "-N", "-Na", "-Nb", "-Nc",
                   "-default_F", "-water", "-mask", "-misset", "-mosaic", "-mosaic_dom", "-xtalsize",
                   "-interpolate", "-nointerpolate", "-fudge", "-dump", "-detsize_f", "-detsize_s",
                   "-oversample_omega", "-oversample_polar", "-oversample_thick"}


def parse(argv, warn):
    """nonBragg.c's argument loop -> :class:`Settings` (errors name the flag)."""
    st = Settings()
    values = set()          # positions read as some flag's own values
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            continue
        matched = [r for r in RULES if r.test(a)]
        if not matched:
            if i not in values:
                if a in _NANOBRAGG_ONLY:
                    warn(f"{a} is a nanoBragg flag that nonBragg does not have; ignored (as nonBragg.c ignores it)")
                else:
                    close = difflib.get_close_matches(a, KNOWN, n=1, cutoff=0.75)
                    warn(f"unknown flag {a} ignored" + (f"; did you mean {close[0]}?" if close else ""))
            continue
        for r in matched:
            own = a in r.names
            if not own and i not in values and (a, r.names[0]) not in _INTENDED:
                others = [m for m in matched if a in m.names]
                if a in _NANOBRAGG_ONLY:
                    warn(f"{a} is a nanoBragg flag that nonBragg does not have; nonBragg.c reads it as "
                         f"{r.names[0]}, and so does nbragg-nonbragg")
                elif others:
                    warn(f"{a} also acts as {r.names[0]}, as nonBragg.c reads it")
                else:
                    warn(f"{a} is not a nonBragg flag; nonBragg.c reads it as {r.names[0]}, and so does "
                         "nbragg-nonbragg")
            if i + r.need >= len(argv):
                # the C skips a flag without enough words after it
                if own and r.takes:
                    raise ArgumentError(f"{a}: missing value" + ("s" if r.takes > 1 else "")
                                        + (f" (expects {r.takes})" if r.takes > 1 else ""))
                if own:
                    warn(f"{a} ignored: nonBragg.c reads it only when another word follows it")
                continue
            if own and r.note and i not in values:
                warn(f"{a} {r.note}")
            r.action(st, _Values(argv, i, a, strict=own and i not in values))
            if own:
                values.update(range(i + 1, i + 1 + r.takes))
    return st


# --------------------------------------------------------------------------- set-up

def _mm(x):
    """A length in mm that the models turn (dividing by 1000) into exactly ``x`` metres,
    so that the geometry starts from the C's own doubles."""
    v = x * 1000.0
    if v / 1000.0 == x or not math.isfinite(v):
        return v
    for k in range(1, 4):
        for d in (math.inf, -math.inf):
            w = v
            for _ in range(k):
                w = math.nextafter(w, d)
            if w / 1000.0 == x:
                return w
    return v


def _osc_range(st):
    """The oscillation range (radians) nonBragg.c writes in the header, after its rules
    for unset phi steps."""
    osc, phistep, phisteps = st.osc, st.phistep, st.phisteps
    if phisteps < 0:
        if osc < 0.0:
            osc = 0.0 if phistep <= 0.0 else phistep
    else:
        if osc < 0.0:
            osc = 1.0 / RTD if phistep <= 0.0 else phistep
    return osc


@dataclass
class Plan:
    """Everything a run needs, settled from the flags before anything is computed."""

    st: Settings
    experiment: object
    model: object
    fpixels: int
    spixels: int
    roi: tuple                    # the C's (xmin, xmax, ymin, ymax), inclusive
    lines: list                   # the set-up report
    header: bytes                 # the SMV header (int and noise files)


def settle(st):
    """The geometry, sample and beam as nonBragg.c settles them -> (Experiment, the C's
    warning lines printed first, the settled values the report needs)."""
    from .experiment import Beam, Detector, Experiment, Material, Sampling, Structure

    early = []
    if st.stolfile is None:
        raise ArgumentError("no structure-factor table: give -stol FILE (sin(theta)/lambda in 1/A and F), "
                            "-4stol FILE or -Q FILE; -h lists the flags")
    if not st.pixel > 0 or not math.isfinite(st.pixel):
        raise ArgumentError(f"-pixel: pixel size {st.pixel * 1000:g} mm must be positive")
    pixel = st.pixel
    detsize_x, detsize_y = st.detsize_x, st.detsize_y
    if st.fpixels:
        detsize_x = pixel * st.fpixels
    if st.spixels:
        detsize_y = pixel * st.spixels
    for name, size in (("-detsize_x", detsize_x), ("-detsize_y", detsize_y)):
        if not size > 0 or not math.isfinite(size):
            raise ArgumentError(f"{name} (-detsize): detector size {size * 1000:g} mm must be positive")
    fpixels = math.ceil(detsize_x / pixel)
    spixels = math.ceil(detsize_y / pixel)
    if fpixels * spixels > 2 ** 31 - 1:
        raise ArgumentError(f"-detpixels: {fpixels}x{spixels} pixels is more than nonBragg handles")

    Xclose, Yclose = st.Xclose, st.Yclose
    if not math.isnan(st.ORGX):
        Xclose = st.ORGX * pixel
    if not math.isnan(st.ORGY):
        Yclose = st.ORGY * pixel
    if math.isnan(Xclose):
        Xclose = (detsize_x - pixel) / 2.0
    if math.isnan(Yclose):
        Yclose = (detsize_y + pixel) / 2.0
    Xbeam = Xclose if math.isnan(st.Xbeam) else st.Xbeam
    Ybeam = Yclose if math.isnan(st.Ybeam) else st.Ybeam
    roi = list(st.roi)
    for k, default in enumerate((0, fpixels, 0, spixels)):
        if roi[k] < 0:
            roi[k] = default
    xmin, xmax, ymin, ymax = roi
    if xmin > min(xmax, fpixels - 1) or ymin > min(ymax, spixels - 1):
        raise ArgumentError(f"-roi: {xmin} {xmax} {ymin} {ymax} holds no pixel of the {fpixels}x{spixels} "
                            "detector (limits are inclusive: xmin xmax ymin ymax)")

    # the sample and the fluence
    fluence = st.fluence
    if st.flux != 0.0 and st.exposure > 0.0 and st.beamsize >= 0:
        if st.beamsize == 0:
            raise ArgumentError("-beamsize: a beam of size 0 makes -flux an infinite fluence")
        fluence = st.flux * st.exposure / st.beamsize / st.beamsize
    if not fluence >= 0 or not math.isfinite(fluence):
        raise ArgumentError(f"-fluence (or -flux/-exposure/-beamsize): fluence {fluence:g} photons/m^2 must be a "
                            "finite number, not negative")
    sample_y, sample_z = st.sample_y, st.sample_z
    if st.beamsize >= 0:
        if st.beamsize < sample_y:
            early.append("WARNING: clipping sample (%s m high) with beam (%s m)" % (_g(sample_y), _g(st.beamsize)))
            sample_y = st.beamsize
        if st.beamsize < sample_z:
            early.append("WARNING: clipping sample (%s m wide) with beam (%s m)" % (_g(sample_z), _g(st.beamsize)))
            sample_z = st.beamsize
    for name, size, given in (("-thickness (-sample_x)", st.sample_x, st.sample_x),
                              ("-width (-sample_y)", sample_y, st.sample_y),
                              ("-height (-sample_z)", sample_z, st.sample_z)):
        if not size > 0 or not math.isfinite(size):
            clipped = " (clipped to -beamsize)" if size != given else ""
            raise ArgumentError(f"{name}: sample size {size * 1000:g} mm{clipped} must be positive")
    if not st.molecular_weight > 0 or not math.isfinite(st.molecular_weight):
        raise ArgumentError(f"-MW: molecular weight {st.molecular_weight:g} g/mol must be positive")
    molecules = None
    if st.molecules != 0:
        if not st.molecules > 0 or not math.isfinite(st.molecules):
            raise ArgumentError(f"-molecules: {st.molecules:g} molecules; give a positive count")
        molecules = st.molecules
    elif not st.density > 0 or not math.isfinite(st.density):
        raise ArgumentError(f"-density: density {st.density:g} g/cm^3 must be positive")
    if not st.wavelength > 0 or not math.isfinite(st.wavelength):
        raise ArgumentError(f"-lambda (-energy): wavelength {st.wavelength:g} A must be positive")
    if not st.source_distance_mm > 0:
        raise ArgumentError(f"-source_distance: {st.source_distance_mm:g} mm must be positive")

    # the detector: nonBragg's near point and beam centre, handed over as the custom
    # convention's; the normal is fdet x sdet whatever -odet_vector says
    from .models.geometry import cross, dot, rotate_xyz, unitize
    fdet, _ = unitize(np.array(st.fdet, dtype=float))
    sdet, _ = unitize(np.array(st.sdet, dtype=float))
    odet, omag = unitize(cross(fdet, sdet))
    if omag == 0.0:
        raise ArgumentError(f"-fdet_vector {_vec(st.fdet)} and -sdet_vector {_vec(st.sdet)} are parallel: "
                            "they span no detector plane")
    beam_v, _ = unitize(np.array(st.beam, dtype=float))
    rot = [x / RTD for x in st.rot_deg]
    ratio = dot(beam_v, rotate_xyz(odet, *rot))
    close_given = not math.isnan(st.close_distance)
    if not close_given and not st.distance > 0:
        raise ArgumentError(f"-distance: {st.distance * 1000:g} mm must be positive")
    if close_given and not st.close_distance > 0:
        raise ArgumentError(f"-close_distance: {st.close_distance * 1000:g} mm must be positive")
    if not ratio > 0:
        raise ArgumentError(
            f"the detector does not face the beam (beam . detector normal = {ratio:g} after -detector_rotx/y/z; "
            "check -beam_vector, -fdet_vector, -sdet_vector and the rotations)")
    use_close = (Xclose, Yclose) if st.pivot == "sample" else (Xbeam, Ybeam)
    det = Detector(
        convention="custom", pivot=st.pivot, fpixels=fpixels, spixels=spixels, pixel_size=_mm(pixel),
        distance=_mm(st.distance) if st.distance > 0 else 1.0,
        close_distance=_mm(st.close_distance) if close_given else None,
        beam_x=_mm(use_close[0]), beam_y=_mm(use_close[1]), xclose=_mm(Xclose), yclose=_mm(Yclose),
        rotx=st.rot_deg[0], roty=st.rot_deg[1], rotz=st.rot_deg[2], twotheta=st.twotheta_deg,
        fdet_vector=st.fdet, sdet_vector=st.sdet, odet_vector=odet, beam_vector=st.beam,
        polar_vector=st.polar, twotheta_axis=st.twotheta_axis, curved=st.curved, point_pixel=st.point_pixel,
        roi=(xmin, xmax, ymin, ymax))
    sources = None
    if st.sourcefile is not None:
        from .io.sourcefile import read_sourcefile
        try:
            sources = read_sourcefile(st.sourcefile)
        except InputFileError as exc:
            raise InputFileError(f"-sourcefile: {exc}") from None
    beam = Beam(wavelength=st.wavelength, fluence=fluence, polarization=st.polarization, nopolar=st.nopolar,
                hdiv_range=st.hdivrange, hdiv_step=st.hdivstep, hdiv_steps=st.hdivsteps,
                vdiv_range=st.vdivrange, vdiv_step=st.vdivstep, vdiv_steps=st.vdivsteps,
                round_div=st.round_div, dispersion=st.dispersion, disp_steps=st.dispsteps,
                sources=sources, source_distance=st.source_distance_mm, source_weights=True)
    table = _FilePath(st.stolfile)
    if not os.path.exists(st.stolfile) and st.stolfile in BUILTIN:
        table = builtin_path(st.stolfile)       # a shipped table, by name (density and MW stay the flags')
        _, rho, mw = BUILTIN[st.stolfile]
        if (rho, mw) != (1.0, 18.0) and (st.density, st.molecular_weight) == (1.0, 18.0):
            early.append(f"WARNING: {st.stol_flag} {st.stolfile}: nbragg's shipped table, with nonBragg's default "
                         f"density 1 g/cm^3 and molecular weight 18 g/mol; {st.stolfile} is about {rho:g} g/cm^3 "
                         f"and {mw:g} g/mol (give -density and -MW)")
    try:
        material = Material(table=table, units=st.units, thickness=_mm(st.sample_x),
                            width=_mm(sample_y), height=_mm(sample_z),
                            density=st.density if st.density > 0 else None,
                            molecular_weight=st.molecular_weight, molecules=molecules)
    except InputFileError as exc:
        raise InputFileError(f"{st.stol_flag}: {exc}") from None
    # oversample_omega: the solid angle taken at every sub-pixel, so that the reported sum
    # is nonBragg's (the amorphous term takes it there anyway; there is no Bragg term)
    exp = Experiment(beam=beam, detector=det, structure=Structure(default_F=0.0),
                     sampling=Sampling(oversample=max(st.oversample, 1), oversample_omega=True),
                     background=[material])
    extra = dict(detsize_x=detsize_x, detsize_y=detsize_y, fluence=fluence, sample_y=sample_y, sample_z=sample_z,
                 roi=(xmin, xmax, ymin, ymax), fpixels=fpixels, spixels=spixels)
    return exp, early, extra


class _FilePath(type(Path())):
    """A path that a Material reads as a file (never as the name of a shipped table) and
    that messages show as the name typed."""

    def __repr__(self):
        return repr(str(self))


def _g(x):
    return "%g" % x


def _vec(v):
    return " ".join(_g(x) for x in v)


def smv_header(fpixels, spixels, pixel, distance, wavelength_m, beam_x, beam_y, orgx, orgy, close_distance,
               phi_deg, osc_deg, twotheta_deg):
    """The 512-byte header nonBragg.c writes on its integer and noise images, in the C's
    formats: pixel, distances and wavelength in metres as the C holds them, the beam
    centre already in mm and ORGX/ORGY in pixels."""
    text = ("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
            + "SIZE1=%d;\nSIZE2=%d;\nPIXEL_SIZE=%g;\nDISTANCE=%g;\n" % (fpixels, spixels, pixel * 1000.0,
                                                                       distance * 1000.0)
            + "WAVELENGTH=%g;\n" % (wavelength_m * 1e10)
            + "BEAM_CENTER_X=%g;\nBEAM_CENTER_Y=%g;\n" % (beam_x, beam_y)
            + "ORGX=%g;\nORGY=%g;\n" % (orgx, orgy)
            + "CLOSE_DISTANCE=%g;\n" % (close_distance * 1000.0)
            + "PHI=%g;\nOSC_START=%g;\nOSC_RANGE=%g;\n" % (phi_deg, phi_deg, osc_deg)
            + "TWOTHETA=%g;\n" % twotheta_deg
            + "DETECTOR_SN=000;\nBEAMLINE=fake;\n}\f")
    raw = text.encode("latin-1")
    return raw + b" " * max(0, 512 - len(raw))


def plan(argv, warn):
    """Parse ``argv`` and settle everything short of computing the image."""
    from . import engine

    st = parse(list(argv), warn)
    exp, early, x = settle(st)

    def model_warn(msg):
        if msg.startswith("odet_vector is not a unit vector"):
            return       # the normal handed over is fdet x sdet already, as nonBragg.c makes it
        warn(msg)
    model = engine.build_model(exp, warn=model_warn)
    d = model.detector
    src = model.sources
    lines = ["nbragg-nonbragg amorphous material diffraction simulator (nonBragg by James Holton and Ken Frankel)"]
    lines += early
    lines.append("pivoting detector around sample" if d.pivot == "sample" else
                 "pivoting detector around direct beam spot")
    lines.append("reading %s" % st.stolfile)
    if not src.from_file:
        for h, v in src.divergence_offsets:
            lines.append("divergence deviation: %g %g" % (h, v))
        for k, lam in enumerate(src.lambdas):
            lines.append("lambda%d = %.15g" % (k, lam))
    lines.append("  created a total of %d sources:" % len(src.listing))
    for (X, Y, Z, w, lam) in src.listing:
        lines.append("%g %g %g   %g %g" % (X, Y, Z, w if src.from_file else 1.0, lam))
    material = exp.background[0]
    dispersion, _, dispsteps = src.disp
    lines.append("  %d initialized F points (will cubic-spline interpolate between them)"
                 % (len(material.parsed.stol_per_m) + 4))
    lines.append("  wave=%g meters +/- %g%% in %d steps" % (model.wavelength, dispersion * 100, dispsteps))
    if st.nopolar:
        lines.append("  polarization effect disabled")
    else:
        lines.append("  Kahn polarization factor: %f" % st.polarization)
    if st.curved:
        lines.append("  curved detector: all pixels same distance from origin")
    if st.point_pixel:
        lines.append("  pixel obliquity effect disabled")
    density, n_molecules = engine.density_and_molecules(material)
    lines.append("  incident fluence: %g photons/m^2" % x["fluence"])
    lines.append("  sample is %g m thick x %g m high x %g m wide, %g g/cm^3 and %g g/mol (%g molecules)"
                 % (st.sample_x, x["sample_y"], x["sample_z"], density / 1e6, material.mw_g_mol, n_molecules))
    lines.append("  distance=%g detsize=%gx%g  pixel=%g meters (%dx%d pixels)"
                 % (d.distance, x["detsize_x"], x["detsize_y"], d.pixel, x["fpixels"], x["spixels"]))
    lines.append("  Xbeam=%g Ybeam=%g" % (d.Fbeam, d.Sbeam))
    lines.append("  detector origin: %s" % _vec(d.pix0))
    lines.append("  DIRECTION_OF_DETECTOR_X-AXIS= %s" % _vec(d.fdet))
    lines.append("  DIRECTION_OF_DETECTOR_Y-AXIS= %s" % _vec(d.sdet))
    lines.append("  INCIDENT_BEAM_DIRECTION= %s" % _vec(d.beam))
    lines.append("  POLARIZATION_PLANE_NORMAL= %s" % _vec(d.polar))
    xmin, xmax, ymin, ymax = x["roi"]
    lines.append("  roi: %d < x < %d && %d < y < %d" % (xmin, xmax, ymin, ymax))
    hr, hs, _ = src.hdiv
    vr, vs, _ = src.vdiv
    lines.append("  hdivrange=%g hdivstep=%g  radians" % (hr, hs))
    lines.append("  vdivrange=%g vdivstep=%g  radians" % (vr, vs))
    lines.append("  %d divergence steps" % src.divsteps)
    lines.append("  %d sources" % len(src.listing))
    lines.append("  %d pixel oversample steps" % model.oversample)
    if st.calculate_noise:
        lines.append("")
        lines.append("  noise image paramters:")
        lines.append("  seed: %d" % st.seed)
    header = smv_header(x["fpixels"], x["spixels"], d.pixel, d.distance, model.wavelength, d.Fbeam * 1000.0,
                        (x["detsize_y"] - d.Sbeam) * 1000, d.Fclose / d.pixel, d.Sclose / d.pixel,
                        d.close_distance, st.phi0 * RTD, _osc_range(st) * RTD,
                        (st.twotheta_deg / RTD) * RTD)
    return Plan(st=st, experiment=exp, model=model, fpixels=x["fpixels"], spixels=x["spixels"], roi=x["roi"],
                lines=lines, header=header)


# --------------------------------------------------------------------------- outputs

@dataclass
class Stats:
    """nonBragg.c's printed statistics of a float image (see :func:`image_stats`)."""

    max_I: float
    max_I_x: float       # sub-pixel position of the maximum (m), as the C reports it
    max_I_y: float
    mean: float
    rms: float
    rmsd: float
    pixels: int


def image_stats(image, roi, pixel, oversample):
    """max_I, mean, rms and rmsd of a float32 image as nonBragg.c computes them: double
    sums over the ROI's pixels in scan order, the squares for rms taken in single
    precision, and rmsd with the C's off-by-one (each ROI pixel reads the next pixel's
    value, the last one the zero after the image).  The mean divides by the number of
    ROI pixels (the C's counter is uninitialised; it behaves as 0 in the C's builds)."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    spixels, fpixels = img.shape
    xmin, xmax, ymin, ymax = roi
    xs, ys = slice(xmin, min(xmax, fpixels - 1) + 1), slice(ymin, min(ymax, spixels - 1) + 1)
    vals = img[ys, xs]
    n = vals.size
    v64 = vals.astype(np.float64).ravel()
    total = float(np.cumsum(v64)[-1]) if n else 0.0      # cumsum: the C's sequential sum
    sq = (vals * vals).astype(np.float64).ravel()        # float * float in the C
    sumsqr = float(np.cumsum(sq)[-1]) if n else 0.0
    max_I, mx, my = 0.0, 0.0, 0.0
    if n:
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isnan(v64), -np.inf, v64)
        k = int(np.argmax(finite))
        if finite[k] > 0.0:
            max_I = float(v64[k])
            width = vals.shape[1]
            f, s = xmin + k % width, ymin + k // width
            sub = pixel / oversample
            mx = sub * (f * oversample + oversample - 1) + sub / 2.0
            my = sub * (s * oversample + oversample - 1) + sub / 2.0
    nn = n if n > 0 else 1
    avg = total / nn
    nn = n if n > 1 else 2
    rms = math.sqrt(sumsqr / (nn - 1))
    nxt = np.append(img.ravel(), np.float32(0.0))[1:].reshape(img.shape)
    dev = nxt[ys, xs].astype(np.float64).ravel() - avg
    devsum = float(np.cumsum(dev * dev)[-1]) if n else 0.0
    rmsd = math.sqrt(devsum / (nn - 1))
    return Stats(max_I=max_I, max_I_x=mx, max_I_y=my, mean=avg, rms=rms, rmsd=rmsd, pixels=n)


def int_image(image, roi, scale, adc):
    """The SMV intfile's pixels: float * scale + adc, clipped to [0, 65535], then
    floorf(value + 0.5) (nanoBragg's conversion); 0 outside the ROI and where the float
    image is not a number."""
    from .noise import c_int_image
    img = np.asarray(image, dtype=np.float32)
    bad = np.isnan(img)
    out = c_int_image(np.where(bad, np.float32(0.0), img), roi, scale, adc)
    out[bad] = 0
    return out


def pgm_image(image, roi, scale):
    """The PGM's pixels: float * scale truncated and clipped at 255; negative (and
    not-a-number) pixels are 0 here, where the C's cast is undefined."""
    from .noise import c_pgm_image
    img = np.asarray(image, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        img = np.where(img > 0, img, np.float32(0.0))
    return c_pgm_image(img, roi, scale)


def write_outputs(p, image, omega_sum, say, warn):
    """Write the float, SMV, PGM and noise files of float32 ``image`` as nonBragg.c
    does, printing its report; ``omega_sum`` (None: not known) is the solid angle."""
    from .io.atomic import atomic_write
    from .io.pgm import pgm_bytes, write_float
    from .io.smv import write_smv_raw
    from .noise import c_noise_image

    st = p.st
    f32 = np.ascontiguousarray(image, dtype=np.float32)
    xmin, xmax, ymin, ymax = p.roi
    keep = np.zeros(f32.shape, dtype=bool)
    keep[ymin:ymax + 1, xmin:xmax + 1] = True
    f32 = np.where(keep, f32, np.float32(0.0))
    nan = int(np.count_nonzero(np.isnan(f32)))
    if nan:
        warn(f"{nan} pixels are not a number; they are 0 in the integer, PGM and noise images")
    negative = int(np.count_nonzero(f32 < 0))
    if negative and st.write_pgm:
        warn(f"{negative} pixels are negative (negative interpolated F): they are 0 in {st.pgmfile} "
             "(nonBragg.c's cast is undefined there)")
    say("")
    if omega_sum is not None:
        say("solid angle subtended by detector = %g steradian ( %g%% sphere)"
            % (omega_sum, 100 * omega_sum / 4 / math.pi))
    stats = image_stats(f32, p.roi, p.model.detector.pixel, p.model.oversample)
    say("writing %s as %d %d-byte floats" % (st.floatfile, f32.size, 4))
    write_float(st.floatfile, f32)
    say("max_I = %g  at %g %g" % (stats.max_I, stats.max_I_x, stats.max_I_y))
    say("mean= %g rms= %g rmsd= %g" % (stats.mean, stats.rms, stats.rmsd))
    from .noise import intfile_scale
    scale = intfile_scale(st.intfile_scale, stats.max_I)
    say("intfile_scale = %g" % scale)
    say("writing %s as %d-byte integers" % (st.intfile, 2))
    write_smv_raw(st.intfile, p.header, int_image(f32, p.roi, scale, st.adc))
    pgm_scale = st.pgm_scale
    if pgm_scale <= 0.0:
        pgm_scale = scale
        if stats.rmsd > 0.0:
            pgm_scale = 250.0 / (5.0 * stats.rmsd)
    if st.write_pgm:
        say("pgm_scale = %g" % pgm_scale)
        say("writing %s as %d-byte integers" % (st.pgmfile, 1))
        atomic_write(st.pgmfile, pgm_bytes(pgm_image(f32, p.roi, pgm_scale), pgm_scale))
    result = {"stats": stats, "intfile_scale": scale, "pgm_scale": pgm_scale}
    if not st.calculate_noise:
        return result
    noise, total, overloads = c_noise_image(np.where(np.isnan(f32), np.float32(0.0), f32), p.roi, st.seed, st.adc)
    say("%.0f photons on noise image (%d overloads)" % (total, overloads))
    say("writing %s as %d-byte integers" % (st.noisefile, 2))
    write_smv_raw(st.noisefile, p.header, noise)
    result.update(noise_photons=total, noise_overloads=overloads)
    return result


# --------------------------------------------------------------------------- command

def run(argv, stdout=None, stderr=None, float_image=None):
    """Run the command line; returns the exit status.  Raises NbraggError on user errors.

    ``float_image`` (float32, shape (spixels, fpixels)): write the files from this image
    instead of simulating one (the conversions can then be checked against the C's own
    float image, independently of the simulation; the solid angle is not printed).
    """
    from . import engine
    from .io.atomic import check_output_paths

    say, warn = console_streams(stdout, stderr)
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    early = help_or_version("nbragg-nonbragg", USAGE, argv, out)
    if early is not None:
        return early
    p = plan(argv, warn)
    st = p.st
    check_output_paths(st, st.write_pgm, st.calculate_noise)
    for line in p.lines:
        say(line)
    if float_image is not None:
        image = np.asarray(float_image, dtype=np.float32)
        if image.shape != (p.spixels, p.fpixels):
            raise ArgumentError(f"float image of shape {image.shape}; the detector is (spixels, fpixels) = "
                                f"{(p.spixels, p.fpixels)}")
        omega_sum = None
    else:
        import threading
        notice = threading.Timer(3.0, lambda: print(
            "nbragg-nonbragg: compiling the kernels for this machine (first run only; they are cached "
            "afterwards)...", file=err, flush=True))
        notice.start()
        try:
            engine.prepare(p.model)
        finally:
            notice.cancel()
        img, omega = engine.render(p.model)
        image = img.astype(np.float32)
        omega_sum = float(omega)      # the plain sum over sub-pixels, as nonBragg.c prints it
    write_outputs(p, image, omega_sum, say, warn)
    return 0


def main(argv=None):
    """Console entry point."""
    return console_main("nbragg-nonbragg", run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
