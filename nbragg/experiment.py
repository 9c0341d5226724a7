"""The immutable description of a simulation, in user units.

An :class:`Experiment` is four plain records -- :class:`Beam`, :class:`Detector`,
:class:`Crystal`, :class:`Sampling` -- plus :class:`Structure` for the structure
factors.  Units are the ones crystallographers type: Angstrom, mm, degrees, microns,
mrad, percent, photons/m^2.  Fields left at ``None`` take nanoBragg.c's default, which
may depend on other fields (for example the beam centre on the convention); the
resolved values are reported by :func:`nbragg.simulate` in ``Result.settings``.

Build one directly::

    exp = nbragg.Experiment(
        crystal=nbragg.Crystal(cell=(100, 100, 100, 90, 90, 90), Na=5, Nb=5, Nc=5),
        structure=nbragg.Structure(default_F=100),
        beam=nbragg.Beam(wavelength=6.2),
        detector=nbragg.Detector(fpixels=128, spixels=128, pixel_size=0.1, distance=100),
    )

or from a nanoBragg command line with :meth:`Experiment.from_nanobragg_args`.
Change fields with ``exp.replace(crystal=exp.crystal.replace(Na=6))``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .errors import ParameterError
from .units import DEFAULT_FLUENCE, HC_EV_ANGSTROM

CONVENTIONS = ("mosflm", "denzo", "adxv", "xds", "dials", "custom")
SHAPES = ("square", "round", "gauss", "tophat", "gauss_domain")
PHYSICS = ("nanobragg", "physical")


def _finite(obj, name, value, positive=False, nonneg=False, allow_none=False):
    if value is None:
        if allow_none:
            return
        raise ParameterError(f"{obj}.{name} must be given")
    if isinstance(value, (str, bytes)):
        raise ParameterError(f"{obj}.{name} = {value!r} is text; give a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{obj}.{name} = {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ParameterError(f"{obj}.{name} = {value!r} is not finite")
    if positive and not v > 0:
        raise ParameterError(f"{obj}.{name} = {value!r} must be positive")
    if nonneg and v < 0:
        raise ParameterError(f"{obj}.{name} = {value!r} must not be negative")


def _vector(obj, name, value):
    if value is None:
        return None
    try:
        v = np.array(value, dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise ParameterError(f"{obj}.{name} = {value!r} is not a 3-vector") from None
    if not np.all(np.isfinite(v)):
        raise ParameterError(f"{obj}.{name} = {value!r} is not finite")
    if not np.any(v != 0):
        raise ParameterError(f"{obj}.{name} = {value!r} is the zero vector")
    v.setflags(write=False)
    return v


def _int(obj, name, value, minimum=None, allow_none=True):
    if value is None:
        if allow_none:
            return None
        raise ParameterError(f"{obj}.{name} must be given")
    try:
        whole = not isinstance(value, (bool, np.bool_, str, bytes)) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise ParameterError(f"{obj}.{name} = {value!r} is not an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ParameterError(f"{obj}.{name} = {value!r} must be at least {minimum}")
    return value


class _Record:
    """Immutable record helpers."""

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def _set(self, name, value):
        object.__setattr__(self, name, value)


@dataclass(frozen=True, eq=False)
class Beam(_Record):
    """Incident beam.

    wavelength : Angstrom (``-lambda``; ``-energy`` in eV is converted by the parser)
    fluence : photons/m^2 (``-fluence``, or flux*exposure/beamsize^2)
    polarization : Kahn polarization factor (``-polar``); ``nopolar`` switches the
        polarization correction off.
    hdiv_range, vdiv_range, hdiv_step, vdiv_step : mrad; hdiv_steps, vdiv_steps : counts.
        Unset values follow nanoBragg's rules (range and steps give step = range/(steps-1)).
    round_div : cut the divergence grid to an ellipse (``-round_div``, the default).
    dispersion, disp_step : percent (delta lambda / lambda); disp_steps : count.
    sources : optional (n, 5) array ``X Y Z weight lambda_m`` from a source file; NaN
        entries take the defaults (direction of the beam, weight 1, ``wavelength``).
        Weights are ignored, as in nanoBragg.c, unless ``source_weights``: then each
        source's terms are multiplied by its weight (as nonBragg.c does; the image is
        still divided by the number of sources, and sources of a divergence grid weigh 1).
    spectrum : optional ``(wavelengths_A, weights)``, two 1-D arrays of equal length: an
        incident spectrum of channels in Angstrom with relative weights (any units; they are
        normalised to sum to 1, so ``fluence`` stays the total).  It replaces the dispersion
        list (each divergence direction takes every channel), and ``wavelength`` is then its
        weighted mean.  A spectrum is not combined with ``sources`` or a dispersion.  See
        :func:`nbragg.sase_spectrum` for an XFEL-like one.
    spectrum_shift : Angstrom added to every source wavelength; spectrum_scale : stretch of
        the wavelengths about their weighted mean (lambda -> mean + scale (lambda - mean)).
        Both apply to any list of sources (default 0 and 1: no change) and are refinable
        (``spectrum_shift``, ``spectrum_scale``).
    """

    wavelength: float = 1.0
    fluence: float = DEFAULT_FLUENCE
    polarization: float = 0.0
    nopolar: bool = False
    hdiv_range: Optional[float] = None
    hdiv_step: Optional[float] = None
    hdiv_steps: Optional[int] = None
    vdiv_range: Optional[float] = None
    vdiv_step: Optional[float] = None
    vdiv_steps: Optional[int] = None
    round_div: bool = True
    dispersion: Optional[float] = None
    disp_step: Optional[float] = None
    disp_steps: Optional[int] = None
    sources: Optional[np.ndarray] = None
    source_distance: float = 10000.0
    source_weights: bool = False
    spectrum: Optional[tuple] = None
    spectrum_shift: float = 0.0
    spectrum_scale: float = 1.0

    @classmethod
    def from_energy(cls, energy_ev, **kw):
        """A beam given its photon energy in eV (as ``-energy``)."""
        _finite("Beam", "energy", energy_ev, positive=True)
        return cls(wavelength=HC_EV_ANGSTROM / float(energy_ev), **kw)

    @property
    def energy(self):
        """Photon energy in eV."""
        return HC_EV_ANGSTROM / self.wavelength

    def __post_init__(self):
        n = "Beam"
        _finite(n, "wavelength", self.wavelength, positive=True)
        _finite(n, "fluence", self.fluence, nonneg=True)
        _finite(n, "polarization", self.polarization)
        _finite(n, "source_distance", self.source_distance, positive=True)
        for name in ("hdiv_range", "hdiv_step", "vdiv_range", "vdiv_step", "dispersion", "disp_step"):
            _finite(n, name, getattr(self, name), allow_none=True)
        for name in ("hdiv_steps", "vdiv_steps", "disp_steps"):
            self._set(name, _int(n, name, getattr(self, name)))
        self._set("wavelength", float(self.wavelength))
        self._set("fluence", float(self.fluence))
        self._set("source_weights", bool(self.source_weights))
        if self.sources is not None:
            s = np.array(self.sources, dtype=float)
            if s.ndim != 2 or s.shape[1] != 5 or len(s) == 0:
                raise ParameterError(f"Beam.sources must be an (n, 5) array X Y Z weight lambda_m, got shape {s.shape}")
            if np.any(np.isinf(s)):
                raise ParameterError("Beam.sources holds infinite values")
            s.setflags(write=False)
            self._set("sources", s)
        _finite(n, "spectrum_shift", self.spectrum_shift)
        _finite(n, "spectrum_scale", self.spectrum_scale, positive=True)
        self._set("spectrum_shift", float(self.spectrum_shift))
        self._set("spectrum_scale", float(self.spectrum_scale))
        if self.spectrum is not None:
            lam, w = _spectrum(self.spectrum)
            if self.sources is not None:
                raise ParameterError("Beam.spectrum and Beam.sources are both given: give the wavelengths in "
                                     "one of them")
            given = [f for f, none in (("dispersion", 0.0), ("disp_step", 0.0), ("disp_steps", 1))
                     if getattr(self, f) is not None and getattr(self, f) > none]
            if given:
                raise ParameterError(f"Beam.spectrum and Beam.{given[0]} are both given: a spectrum replaces the "
                                     f"dispersion")
            self._set("spectrum", (lam, w))
            self._set("wavelength", float(np.sum(lam * w) / np.sum(w)))


def _spectrum(value):
    """A spectrum's (wavelengths_A, weights), checked and frozen."""
    try:
        lam, w = value
        lam = np.array(lam, dtype=float)
        w = np.array(w, dtype=float)
    except (TypeError, ValueError):
        raise ParameterError(f"Beam.spectrum = {value!r} is not a pair (wavelengths_A, weights)") from None
    if lam.ndim != 1 or lam.shape != w.shape or lam.size == 0:
        raise ParameterError(f"Beam.spectrum: wavelengths (shape {lam.shape}) and weights (shape {w.shape}) must "
                             f"be two 1-D arrays of the same length")
    bad = np.flatnonzero(~(np.isfinite(lam) & (lam > 0)))
    if bad.size:
        raise ParameterError(f"Beam.spectrum: channel {bad[0]} has wavelength {lam[bad[0]]!r} A, not a positive "
                             f"number")
    bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
    if bad.size:
        raise ParameterError(f"Beam.spectrum: channel {bad[0]} has weight {w[bad[0]]!r}, not a number >= 0")
    if not np.sum(w) > 0:
        raise ParameterError("Beam.spectrum: every weight is 0")
    lam.setflags(write=False)
    w.setflags(write=False)
    return lam, w


def _pair(obj, name, value, cast=float):
    try:
        v = tuple(cast(x) for x in (value if np.ndim(value) else (value, value)))
    except (TypeError, ValueError):
        raise ParameterError(f"{obj}.{name} = {value!r} is not a pair of numbers") from None
    if len(v) != 2:
        raise ParameterError(f"{obj}.{name} = {value!r} is not a pair (fast, slow)")
    return v


def _triple(obj, name, value):
    try:
        v = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise ParameterError(f"{obj}.{name} = {value!r} is not three numbers") from None
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        raise ParameterError(f"{obj}.{name} = {value!r} is not three finite numbers")
    return v


def _frame(obj, node):
    """Check and store a panel's or group's frame (origin, fast and slow axes) and its
    refinable shift and rotation."""
    node._set("name", str(node.name))
    node._set("origin", _triple(obj, "origin", node.origin))
    for name in ("fast_axis", "slow_axis"):     # stored as unit vectors, as dxtbx gives them
        v = _vector(obj, name, getattr(node, name))
        node._set(name, tuple(float(x) for x in v / np.linalg.norm(v)))
    f, s = np.array(node.fast_axis), np.array(node.slow_axis)
    if np.linalg.norm(np.cross(f, s)) < 1e-9 * np.linalg.norm(f) * np.linalg.norm(s):
        raise ParameterError(f"{obj}.fast_axis {node.fast_axis} and slow_axis {node.slow_axis} are parallel")
    node._set("shift", _triple(obj, "shift", node.shift))
    node._set("rotation", _triple(obj, "rotation", node.rotation))


@dataclass(frozen=True, eq=False)
class Panel(_Record):
    """One flat module of pixels, in the laboratory frame, with dxtbx's names and units.

    origin : mm, the outer corner of pixel (0, 0); fast_axis, slow_axis : directions
        (stored as unit vectors; the normal is fast x slow, turned to face away from the
        sample).
    image_size : (fast, slow) pixels; pixel_size : mm, (fast, slow) or one number (the
        model's pixels are square: the two must be equal).
    thickness : sensor thickness (mm); mu : its linear attenuation coefficient (1/mm).
        With both above 0 a pixel records the fraction 1 - exp(-mu t / cos) of the photons
        reaching it, in ``thicksteps`` equal layers (default 1); mu = 0 means no sensor
        model (every photon counts), whatever the thickness.
    trusted_range : (min, max) of valid pixel values (refinement against pixel values,
        with a detector response, leaves observed pixels outside it out); gain : ADU per
        photon (kept for experiment lists).
    mask : rectangles (f0, s0, f1, s1) of pixels left out, as dxtbx writes them: half
        open, f0 <= fast < f1 and s0 <= slow < s1; roi : (xmin, xmax, ymin, ymax),
        inclusive, as Detector.roi.
    shift : mm, (x, y, z) in the laboratory frame; rotation : degrees, about the panel's
        own fast, slow and normal axes through its origin, in that order.  Both start at
        0 and move the panel rigidly: they are its refinable geometry (``panel_shift_x[i]``
        ... ``panel_rot_z[i]``).
    """

    origin: Tuple[float, float, float] = (0.0, 0.0, -100.0)
    fast_axis: Tuple[float, float, float] = (1.0, 0.0, 0.0)
    slow_axis: Tuple[float, float, float] = (0.0, -1.0, 0.0)
    image_size: Tuple[int, int] = (1024, 1024)
    pixel_size: object = 0.1
    name: str = ""
    thickness: float = 0.0
    mu: float = 0.0
    thicksteps: Optional[int] = None
    trusted_range: Optional[Tuple[float, float]] = None
    gain: float = 1.0
    mask: Tuple[Tuple[int, int, int, int], ...] = ()
    roi: Optional[Tuple[int, int, int, int]] = None
    shift: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: Tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        n = f"Panel {self.name!r}" if self.name else "Panel"
        _frame(n, self)
        size = _pair(n, "image_size", self.image_size, cast=lambda x: _int(n, "image_size", x, minimum=1,
                                                                              allow_none=False))
        self._set("image_size", size)
        px = _pair(n, "pixel_size", self.pixel_size)
        for v in px:
            _finite(n, "pixel_size", v, positive=True)
        if px[0] != px[1]:
            raise ParameterError(f"{n}.pixel_size = {px}: pixels must be square (fast and slow sizes equal)")
        self._set("pixel_size", px)
        _finite(n, "thickness", self.thickness, nonneg=True)
        _finite(n, "mu", self.mu, nonneg=True)
        self._set("thicksteps", _int(n, "thicksteps", self.thicksteps, minimum=1))
        _finite(n, "gain", self.gain, positive=True)
        if self.trusted_range is not None:
            lo, hi = _pair(n, "trusted_range", self.trusted_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ParameterError(f"{n}.trusted_range = {self.trusted_range!r}: expected finite (min, max), "
                                     f"min <= max")
            self._set("trusted_range", (lo, hi))
        rects = []
        for r in self.mask:
            try:
                r = tuple(int(v) for v in r)
            except (TypeError, ValueError):
                raise ParameterError(f"{n}.mask rectangle {r!r} is not four integers") from None
            if len(r) != 4 or r[0] > r[2] or r[1] > r[3]:
                raise ParameterError(f"{n}.mask rectangle {r!r} is not (f0, s0, f1, s1) with f0 <= f1 and "
                                     f"s0 <= s1")
            rects.append(r)
        self._set("mask", tuple(rects))
        if self.roi is not None:
            self._set("roi", _check_roi(n, self.roi, *size))

    def pixel_mask(self):
        """(slow, fast) uint8 array, 0 where a mask rectangle covers the pixel; None
        without rectangles."""
        if not self.mask:
            return None
        f, s = self.image_size
        m = np.ones((s, f), dtype=np.uint8)
        for f0, s0, f1, s1 in self.mask:
            m[max(s0, 0):max(s1, 0), max(f0, 0):max(f1, 0)] = 0
        return m


@dataclass(frozen=True, eq=False)
class PanelGroup(_Record):
    """A rigid group of panels and groups -- a quadrant, a module, a whole detector.

    children : panel indices (into ``Detector.panels``) and groups.
    origin, fast_axis, slow_axis : the group's own frame, in the laboratory frame (mm):
        the point and axes its rotation turns about.
    shift, rotation : as for :class:`Panel`, moving every panel under the group
        (``group_shift_x[name]`` ... ``group_rot_z[name]``).  A panel moves by its own
        motion, then by its group's, then by that group's parent's, up to the top.
    """

    children: Tuple[object, ...] = ()
    name: str = ""
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    fast_axis: Tuple[float, float, float] = (1.0, 0.0, 0.0)
    slow_axis: Tuple[float, float, float] = (0.0, 1.0, 0.0)
    shift: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: Tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        n = f"PanelGroup {self.name!r}" if self.name else "PanelGroup"
        _frame(n, self)
        kids = self.children
        if isinstance(kids, PanelGroup):
            kids = (kids,)
        kids = tuple(kids)
        out = []
        for i, c in enumerate(kids):
            if not isinstance(c, PanelGroup):
                c = _int(n, f"children[{i}]", c, minimum=0, allow_none=False)
            out.append(c)
        self._set("children", tuple(out))

    def panel_indices(self):
        """Indices of the panels under this group, depth first."""
        out = []
        for c in self.children:
            out.extend(c.panel_indices() if isinstance(c, PanelGroup) else [c])
        return out

    def groups(self, path="root"):
        """[(path, group)] for this group and every group below it, depth first; a path is
        "root", then "root/2" for its third child, and so on."""
        out = [(path, self)]
        for i, c in enumerate(self.children):
            if isinstance(c, PanelGroup):
                out.extend(c.groups(f"{path}/{i}"))
        return out


def _check_roi(n, roi, fpixels, spixels):
    try:
        roi = tuple(int(v) for v in roi)
    except (TypeError, ValueError):
        raise ParameterError(f"{n}.roi = {roi!r} is not four integers") from None
    if len(roi) != 4:
        raise ParameterError(f"{n}.roi = {roi!r} is not four integers (xmin xmax ymin ymax)")
    xmin, xmax, ymin, ymax = roi
    if xmin > xmax or ymin > ymax:
        raise ParameterError(f"{n}.roi = {roi}: min is larger than max")
    if xmax < 0 or ymax < 0 or xmin > fpixels - 1 or ymin > spixels - 1:
        raise ParameterError(f"{n}.roi = {roi} lies outside the {fpixels}x{spixels} detector")
    return roi


@dataclass(frozen=True, eq=False)
class Detector(_Record):
    """Pixel detector and its placement.

    convention : one of mosflm (default), denzo, adxv, xds, dials, custom.  It fixes the
        detector, beam, polarization and spindle vectors and the pivot (custom keeps
        ``pivot``, default beam).
    fpixels, spixels : pixels along the fast and slow axes; pixel_size : mm.
    detsize_f, detsize_s : mm, only where they differ from pixels * pixel_size
        (they set the default beam centre, as in nanoBragg.c).
    distance : mm from the sample to the beam spot (beam pivot);
        close_distance : mm to the nearest point of the detector plane (sample pivot).
    beam_x, beam_y : mm, ``-Xbeam``/``-Ybeam`` in the convention's own frame.
    xclose, yclose : mm; orgx, orgy : pixels (XDS ORGX/ORGY) -- the near point.
    rotx, roty, rotz, twotheta : degrees.
    *_vector, spindle_axis, twotheta_axis : for the custom convention.
    curved : pixels on a sphere of radius ``distance``; point_pixel : omega = 1/R^2.
    thickness : sensor thickness in microns, thicksteps layers (or thickstep microns);
        absorption_depth : microns (``-detector_abs``; None = the thickness; 0 or inf =
        no absorption).
    roi : (xmin, xmax, ymin, ymax) pixel limits, inclusive; mask : (spixels, fpixels)
        array, zero pixels are skipped.
    panels : a detector of flat panels (a list of :class:`Panel`, in the laboratory
        frame), all of the same image size.  It replaces the one panel that the
        convention, distance, beam centre, rotations, pixel counts and sensor fields
        place; the convention still gives the beam, polarization and spindle vectors
        (with the custom convention: beam_vector, polar_vector, spindle_axis).
        ``Result.image`` is then (panels, slow, fast) for more than one panel.
    groups : optional hierarchy of the panels (a :class:`PanelGroup` whose children are
        panel indices and groups): rigid groups whose shifts and rotations refine.
    """

    convention: str = "mosflm"
    pivot: Optional[str] = None
    fpixels: Optional[int] = None      # both None: 1024 x 1024; give both or neither
    spixels: Optional[int] = None
    pixel_size: float = 0.1
    detsize_f: Optional[float] = None
    detsize_s: Optional[float] = None
    distance: float = 100.0
    close_distance: Optional[float] = None
    beam_x: Optional[float] = None
    beam_y: Optional[float] = None
    xclose: Optional[float] = None
    yclose: Optional[float] = None
    orgx: Optional[float] = None
    orgy: Optional[float] = None
    rotx: float = 0.0
    roty: float = 0.0
    rotz: float = 0.0
    twotheta: float = 0.0
    fdet_vector: Optional[np.ndarray] = None
    sdet_vector: Optional[np.ndarray] = None
    odet_vector: Optional[np.ndarray] = None
    beam_vector: Optional[np.ndarray] = None
    polar_vector: Optional[np.ndarray] = None
    spindle_axis: Optional[np.ndarray] = None
    twotheta_axis: Optional[np.ndarray] = None
    curved: bool = False
    point_pixel: bool = False
    thickness: float = 0.0
    thicksteps: Optional[int] = None
    thickstep: Optional[float] = None
    absorption_depth: Optional[float] = None
    roi: Optional[Tuple[int, int, int, int]] = None
    mask: Optional[np.ndarray] = None
    panels: Optional[Tuple[Panel, ...]] = None
    groups: Optional[PanelGroup] = None

    def __post_init__(self):
        n = "Detector"
        if self.panels is not None:
            panels = (self.panels,) if isinstance(self.panels, Panel) else self.panels
            try:
                panels = tuple(panels)
            except TypeError:
                raise ParameterError(f"Detector.panels must be a list of Panel, got {type(self.panels).__name__}") from None
            if not panels:
                raise ParameterError("Detector.panels is empty")
            for i, p in enumerate(panels):
                if not isinstance(p, Panel):
                    raise ParameterError(f"Detector.panels[{i}] must be a Panel, got {type(p).__name__}")
            self._set("panels", panels)
            for name in ("roi", "mask"):
                if getattr(self, name) is not None:
                    raise ParameterError(f"Detector.{name} is given with Detector.panels: give each Panel its "
                                         f"own {name}")
            if self.curved:
                raise ParameterError("Detector.curved cannot be combined with Detector.panels (flat panels)")
            shapes = {(p.image_size, p.pixel_size) for p in panels}
            if len(shapes) > 1:
                raise ParameterError("Detector.panels differ in image size or pixel size: "
                                     + ", ".join(f"{p.image_size[0]}x{p.image_size[1]} of {p.pixel_size[0]:g} mm"
                                                 for p in panels[:4]) + (" ..." if len(panels) > 4 else "")
                                     + "; the image holds panels of one size")
            # the panels set the pixel count and size that the rest of the model reads
            self._set("fpixels", panels[0].image_size[0])
            self._set("spixels", panels[0].image_size[1])
            self._set("pixel_size", panels[0].pixel_size[0])
        if self.groups is not None:
            if self.panels is None:
                raise ParameterError("Detector.groups is given without Detector.panels")
            if not isinstance(self.groups, PanelGroup):
                raise ParameterError(f"Detector.groups must be a PanelGroup, got {type(self.groups).__name__}")
            seen = self.groups.panel_indices()
            bad = [i for i in seen if i >= len(self.panels)]
            if bad:
                raise ParameterError(f"Detector.groups names panel {bad[0]}; the detector has {len(self.panels)}")
            twice = sorted({i for i in seen if seen.count(i) > 1})
            if twice:
                raise ParameterError(f"Detector.groups holds panel {twice[0]} more than once")
            left = sorted(set(range(len(self.panels))) - set(seen))
            if left:
                raise ParameterError(f"Detector.groups leaves panel {left[0]} out: every panel belongs to the "
                                     f"hierarchy (add it to the top group)")
        if (self.fpixels is None) != (self.spixels is None):
            given, other = ("fpixels", "spixels") if self.spixels is None else ("spixels", "fpixels")
            raise ParameterError(f"Detector.{given} = {getattr(self, given)!r} without Detector.{other}: give both "
                                 f"(with neither, the detector is nanoBragg's 1024 x 1024)")
        if self.fpixels is None:
            self._set("fpixels", 1024)
            self._set("spixels", 1024)
        self._set("fpixels", _int(n, "fpixels", self.fpixels, minimum=1, allow_none=False))
        self._set("spixels", _int(n, "spixels", self.spixels, minimum=1, allow_none=False))
        _finite(n, "pixel_size", self.pixel_size, positive=True)
        _finite(n, "distance", self.distance)
        for name in ("detsize_f", "detsize_s", "close_distance"):
            _finite(n, name, getattr(self, name), positive=True, allow_none=True)
        for name in ("beam_x", "beam_y", "xclose", "yclose", "orgx", "orgy", "thickstep"):
            _finite(n, name, getattr(self, name), allow_none=True)
        if self.absorption_depth is not None and self.absorption_depth != math.inf:
            # an infinite depth is allowed: it means no absorption, like 0 (nanoBragg's "inf")
            _finite(n, "absorption_depth", self.absorption_depth)
        for name in ("rotx", "roty", "rotz", "twotheta"):
            _finite(n, name, getattr(self, name))
        _finite(n, "thickness", self.thickness, nonneg=True)
        self._set("thicksteps", _int(n, "thicksteps", self.thicksteps))
        if not self.distance > 0 and self.close_distance is None:
            raise ParameterError(f"Detector.distance = {self.distance!r} must be positive")
        for name in ("fdet_vector", "sdet_vector", "odet_vector", "beam_vector", "polar_vector",
                     "spindle_axis", "twotheta_axis"):
            self._set(name, _vector(n, name, getattr(self, name)))
        if self.roi is not None:
            self._set("roi", _check_roi(n, self.roi, self.fpixels, self.spixels))
        if self.mask is not None:
            m = np.array(self.mask)
            if m.shape != (self.spixels, self.fpixels):
                raise ParameterError(
                    f"Detector.mask has shape {m.shape}; the detector is (spixels, fpixels) = {(self.spixels, self.fpixels)}")
            m = (m != 0).astype(np.uint8)
            m.setflags(write=False)
            self._set("mask", m)


@dataclass(frozen=True, eq=False)
class Crystal(_Record):
    """The nanocrystal.

    cell : (a, b, c, alpha, beta, gamma) in Angstrom and degrees.
    misset : rotations about x, then y, then z, degrees (``-misset``).
    orientation : optional 3x3 rotation applied before the misset (set from ``-mat``).
    Na, Nb, Nc : unit cells along a, b, c (floats; values below 1 count as 1).
    shape : square (parallelepiped, default), round, gauss or tophat (nanoBragg's), or
        gauss_domain: a Gaussian domain of the symmetric size matrix N (cells; Na Nb Nc on
        its diagonal, N_ab N_ac N_bc off it), F_latt = det(N) exp(-fudge |N dhkl|^2 / 0.63)
        on the fractional offset dhkl from the nearest node; fudge : shape factor.
    N_ab, N_ac, N_bc : the gauss_domain size matrix's off-diagonal terms (cells; 0 unless
        the shape is gauss_domain; N must be positive definite).
    mosaic_spread : degrees; mosaic_domains : count; mosaic_seed : as ``-mosaic_seed``.
    mosaic_eta : optional (eta_a, eta_b, eta_c), degrees: anisotropic mosaicity instead of
        nanoBragg's isotropic spread.  Each domain is rotated by the rotation vector
        eta_a z_a a^ + eta_b z_b b^ + eta_c z_c c^ (a^, b^, c^ the crystal's unit axes before
        the spindle rotation; z drawn N(0, 1) from ``mosaic_seed`` and whitened, so that
        over the domains each component has rms 1 and no correlation; the second half of
        the domains are the mirror images of the first).  So eta_i is the rms component of
        the rotation vector along axis i (for an orthogonal cell, the rms rotation about
        it), and the image is smooth in each (refinable as eta_a, eta_b, eta_c; it is even
        in each, so a refinement must start from a value above 0).  Domains follow the
        crystal through the spindle rotation; ``mosaic_domains`` defaults to 10 (at least
        6).
    phi0, osc, phistep : degrees; phisteps : count (spindle rotation).
    """

    cell: Tuple[float, float, float, float, float, float] = (100.0, 100.0, 100.0, 90.0, 90.0, 90.0)
    misset: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    orientation: Optional[np.ndarray] = None
    Na: float = 1.0
    Nb: float = 1.0
    Nc: float = 1.0
    N_ab: float = 0.0
    N_ac: float = 0.0
    N_bc: float = 0.0
    shape: str = "square"
    fudge: float = 1.0
    mosaic_spread: Optional[float] = None
    mosaic_domains: Optional[int] = None
    mosaic_seed: int = 12345678
    mosaic_eta: Optional[Tuple[float, float, float]] = None
    phi0: float = 0.0
    osc: Optional[float] = None
    phistep: Optional[float] = None
    phisteps: Optional[int] = None

    def __post_init__(self):
        n = "Crystal"
        try:
            cell = tuple(float(v) for v in self.cell)
        except (TypeError, ValueError):
            raise ParameterError(f"Crystal.cell = {self.cell!r} is not six numbers") from None
        if len(cell) != 6:
            raise ParameterError(f"Crystal.cell = {self.cell!r} is not six numbers (a b c alpha beta gamma)")
        for name, v in zip(("a", "b", "c", "alpha", "beta", "gamma"), cell):
            _finite(n, f"cell {name}", v, positive=True)
        al, be, ga = (math.radians(x) for x in cell[3:])
        if not (al + be + ga < 2 * math.pi and al < be + ga and be < al + ga and ga < al + be) or max(cell[3:]) >= 180:
            raise ParameterError(f"Crystal.cell angles {cell[3:]} make no cell (each must be less than the sum of the others, the sum less than 360)")
        self._set("cell", cell)
        try:
            mis = tuple(float(v) for v in self.misset)
        except (TypeError, ValueError):
            raise ParameterError(f"Crystal.misset = {self.misset!r} is not three angles") from None
        if len(mis) != 3 or not all(math.isfinite(v) for v in mis):
            raise ParameterError(f"Crystal.misset = {self.misset!r} is not three finite angles")
        self._set("misset", mis)
        if self.orientation is not None:
            u = np.array(self.orientation, dtype=float)
            if u.shape != (3, 3) or not np.all(np.isfinite(u)):
                raise ParameterError(f"Crystal.orientation must be a finite 3x3 matrix, got shape {u.shape}")
            if not np.allclose(u @ u.T, np.eye(3), atol=1e-9):
                raise ParameterError("Crystal.orientation is not an orthogonal (rotation) matrix")
            u.setflags(write=False)
            self._set("orientation", u)
        for name in ("Na", "Nb", "Nc"):
            _finite(n, name, getattr(self, name), nonneg=True)
            self._set(name, float(getattr(self, name)))
        shape = str(self.shape).lower()
        if shape not in SHAPES:
            raise ParameterError(f"Crystal.shape = {self.shape!r}; expected one of {', '.join(SHAPES)}")
        self._set("shape", shape)
        for name in ("N_ab", "N_ac", "N_bc"):
            _finite(n, name, getattr(self, name))
            self._set(name, float(getattr(self, name)))
            if getattr(self, name) != 0.0 and shape != "gauss_domain":
                raise ParameterError(f"Crystal.{name} = {getattr(self, name)!r}: off-diagonal domain sizes belong "
                                     f"to shape 'gauss_domain' (Crystal.shape = {shape!r})")
        if shape == "gauss_domain":
            N = np.array([[self.Na, self.N_ab, self.N_ac], [self.N_ab, self.Nb, self.N_bc],
                          [self.N_ac, self.N_bc, self.Nc]])
            if not np.all(np.linalg.eigvalsh(N) > 0):
                raise ParameterError(f"Crystal domain size matrix [[Na N_ab N_ac] [N_ab Nb N_bc] [N_ac N_bc Nc]] = "
                                     f"{N.tolist()} is not positive definite")
        _finite(n, "fudge", self.fudge)
        _finite(n, "mosaic_spread", self.mosaic_spread, allow_none=True)
        self._set("mosaic_domains", _int(n, "mosaic_domains", self.mosaic_domains))
        self._set("mosaic_seed", _int(n, "mosaic_seed", self.mosaic_seed, allow_none=False))
        if self.mosaic_eta is not None:
            eta = _triple(n, "mosaic_eta", self.mosaic_eta)
            if min(eta) < 0:
                raise ParameterError(f"Crystal.mosaic_eta = {eta}: the angles must not be negative")
            if self.mosaic_spread is not None and self.mosaic_spread != 0:
                raise ParameterError(f"Crystal.mosaic_eta = {eta} and Crystal.mosaic_spread = "
                                     f"{self.mosaic_spread!r} are both given: choose anisotropic or isotropic "
                                     f"mosaicity")
            if self.mosaic_domains is not None and self.mosaic_domains < 6:
                raise ParameterError(f"Crystal.mosaic_domains = {self.mosaic_domains} with Crystal.mosaic_eta: "
                                     f"anisotropic mosaicity needs at least 6 domains (3 mirror pairs)")
            self._set("mosaic_eta", eta)
        _finite(n, "phi0", self.phi0)
        _finite(n, "osc", self.osc, allow_none=True)
        _finite(n, "phistep", self.phistep, allow_none=True)
        self._set("phisteps", _int(n, "phisteps", self.phisteps))


@dataclass(frozen=True, eq=False)
class Structure(_Record):
    """Structure factors.

    Fhkl : optional dense grid of amplitudes indexed ``[h - h_min, k - k_min, l - l_min]``;
        hkl_origin : (h_min, k_min, l_min); hkl_count : how many reflections were listed
        (nanoBragg's "initialized hkls"; defaults to the grid size).
    default_F : amplitude for every hkl outside the grid (and, from an HKL file, for
        grid points the file did not list).
    interpolate : tricubic interpolation between grid points; None = automatic
        (on when any of Na, Nb, Nc is at most 2, as in nanoBragg.c).
    B_iso : an overall isotropic B factor (Angstrom^2): every Bragg term's F^2 is
        multiplied by exp(-2 B_iso (sin(theta)/lambda)^2), taken at the sample's scattering
        vector (0: none, nanoBragg's model).  Refinable as ``B_iso``.
    U_aniso : optional overall anisotropic displacements (U11, U22, U33, U12, U13, U23),
        Angstrom^2, in CIF's convention: F is multiplied by
        exp(-2 pi^2 sum_ij U_ij h_i h_j a*_i a*_j) at the fractional (h, k, l) of each
        sample.  The matrix must be positive semi-definite.  Refinable as ``U_11 ... U_23``.
    """

    Fhkl: Optional[np.ndarray] = None
    hkl_origin: Tuple[int, int, int] = (0, 0, 0)
    hkl_count: Optional[int] = None
    default_F: float = 0.0
    interpolate: Optional[bool] = None
    B_iso: float = 0.0
    U_aniso: Optional[tuple] = None

    def __post_init__(self):
        _finite("Structure", "default_F", self.default_F)
        _finite("Structure", "B_iso", self.B_iso)
        self._set("B_iso", float(self.B_iso))
        if self.U_aniso is not None:
            try:
                U = tuple(float(v) for v in self.U_aniso)
            except (TypeError, ValueError):
                raise ParameterError(f"Structure.U_aniso = {self.U_aniso!r} is not six numbers") from None
            if len(U) != 6 or not all(math.isfinite(v) for v in U):
                raise ParameterError(f"Structure.U_aniso = {self.U_aniso!r} is not six finite numbers "
                                     f"(U11 U22 U33 U12 U13 U23)")
            M = np.array([[U[0], U[3], U[4]], [U[3], U[1], U[5]], [U[4], U[5], U[2]]])
            if np.linalg.eigvalsh(M).min() < -1e-12 * max(np.abs(M).max(), 1e-300):
                raise ParameterError(f"Structure.U_aniso = {U}: the matrix [[U11 U12 U13] [U12 U22 U23] "
                                     f"[U13 U23 U33]] is not positive semi-definite")
            self._set("U_aniso", U)
        if self.Fhkl is not None:
            g = np.array(self.Fhkl, dtype=float)
            if g.ndim != 3 or g.size == 0:
                raise ParameterError(f"Structure.Fhkl must be a non-empty 3-D grid, got shape {g.shape}")
            if not np.all(np.isfinite(g)):
                raise ParameterError("Structure.Fhkl holds non-finite values")
            g.setflags(write=False)
            self._set("Fhkl", g)
            try:
                origin = tuple(int(v) for v in self.hkl_origin)
            except (TypeError, ValueError):
                raise ParameterError(f"Structure.hkl_origin = {self.hkl_origin!r} is not three integers") from None
            if len(origin) != 3:
                raise ParameterError(f"Structure.hkl_origin = {self.hkl_origin!r} is not three integers")
            self._set("hkl_origin", origin)
            if self.hkl_count is None:
                self._set("hkl_count", int(g.size))
        else:
            self._set("hkl_count", 0)


@dataclass(frozen=True, eq=False)
class Sampling(_Record):
    """How finely the pixel is sampled and a few model switches.

    oversample : sub-pixels per pixel edge (None, 0 or negative = nanoBragg's automatic
        choice).
    oversample_omega, oversample_polar, oversample_thick : recompute solid angle,
        polarization, absorption for every sub-pixel (nanoBragg semantics: they
        multiply the running sum; see the README).
    dmin : Angstrom; scattering beyond this resolution is skipped (0 = off).
    water : microns of water in the beam (background).
    """

    oversample: Optional[int] = None
    oversample_omega: bool = False
    oversample_polar: bool = False
    oversample_thick: bool = False
    dmin: float = 0.0
    water: float = 0.0

    def __post_init__(self):
        self._set("oversample", _int("Sampling", "oversample", self.oversample))
        _finite("Sampling", "dmin", self.dmin, nonneg=True)
        _finite("Sampling", "water", self.water)


@dataclass(frozen=True, eq=False)
class Material(_Record):
    """An amorphous scatterer in the beam -- water, air, ice, a solvent -- described by a
    table of its structure factor F against sin(theta)/lambda (nonBragg.c's model).

    Every sample of a pixel adds amount sign(F) F^2 times its solid angle, polarization,
    sensor capture fraction and source weight, all taken per sample; the amount is the
    number of molecules in the illuminated volume, times ``scale``.

    table : the name of a shipped table ("water", "ice", "nanoice", "air", "helium": see
        ``nbragg/data/README.md``), a file in nonBragg's format (see
        :mod:`nbragg.io.stol`), or an (n, 2) array of (abscissa, F).
    units : what the first column holds: "stol" (sin(theta)/lambda, 1/A), "4stol"
        (4 sin(theta)/lambda) or "Q" (4 pi sin(theta)/lambda, 1/A).
    thickness : mm along the beam; width, height : mm across it.  The volume is their
        product: give the illuminated part (nonBragg's command clips width and height to
        the beam size; here that is the caller's choice).
    density : g/cm^3 and molecular_weight : g/mol (None: the shipped table's values,
        1 and 18 for a file or an array); molecules : a count that replaces the density.
    scale : a factor on this material's term.
    """

    table: object = "water"
    units: str = "stol"
    thickness: float = 0.1
    width: float = 0.1
    height: float = 0.1
    density: Optional[float] = None
    molecular_weight: Optional[float] = None
    molecules: Optional[float] = None
    scale: float = 1.0

    def __post_init__(self):
        from .io.stol import BUILTIN, UNITS, builtin_path, read_stol_cached as read_stol, table_from_rows
        n = "Material"
        if self.units not in UNITS:
            raise ParameterError(f"Material.units = {self.units!r}; expected one of {', '.join(UNITS)}")
        for name in ("thickness", "width", "height"):
            # 0 is allowed (no material; a refinement may reach its bound), but a count of
            # molecules needs a volume to spread over
            _finite(n, name, getattr(self, name), nonneg=True, positive=self.molecules is not None)
        _finite(n, "density", self.density, positive=True, allow_none=True)
        _finite(n, "molecular_weight", self.molecular_weight, positive=True, allow_none=True)
        _finite(n, "molecules", self.molecules, positive=True, allow_none=True)
        _finite(n, "scale", self.scale, nonneg=True)
        notes = []
        density, mw = 1.0, 18.0
        table = self.table
        import os
        if isinstance(table, str) and table in BUILTIN:      # a shipped table's name (a path: Path(...))
            if self.units != "stol":
                raise ParameterError(f"Material.units = {self.units!r}: the shipped table {table!r} holds "
                                     f"sin(theta)/lambda; leave units at 'stol'")
            _, density, mw = BUILTIN[table]
            parsed = read_stol(builtin_path(table), self.units, warn=notes.append)
        elif isinstance(table, (str, bytes)) or hasattr(table, "__fspath__"):
            if isinstance(table, str) and "/" not in table and "." not in table and not os.path.exists(table):
                raise ParameterError(f"Material.table = {table!r} is neither a shipped table "
                                     f"({', '.join(BUILTIN)}) nor a file name")
            parsed = read_stol(table, self.units, warn=notes.append)
        else:
            try:
                arr = np.array(table, dtype=float)
            except (TypeError, ValueError):
                raise ParameterError("Material.table must be a table name, a file or an (n, 2) array "
                                     f"of (abscissa, F), got {type(table).__name__}") from None
            if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
                raise ParameterError(f"Material.table: expected an (n, 2) array of (abscissa, F), got shape {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ParameterError("Material.table holds values that are not finite")
            parsed = table_from_rows([(i + 1, x, F) for i, (x, F) in enumerate(arr)], "Material.table", self.units,
                                     warn=notes.append)
        self._set("parsed", parsed)
        self._set("notes", tuple(notes))
        self._set("density_g_cm3", float(self.density) if self.density is not None else density)
        self._set("mw_g_mol", float(self.molecular_weight) if self.molecular_weight is not None else mw)

    @property
    def name(self):
        """The table's name or file (for reports)."""
        return self.table if isinstance(self.table, str) else self.parsed.source


@dataclass(frozen=True, eq=False)
class Response(_Record):
    """The detector's response, applied to the expected photons after the simulation
    (see :mod:`nbragg.response` for the order and the model).

    scale : photons per simulated photon; flicker : fractional rms of one beam-intensity
        factor per image; calibration : fractional rms of a fixed per-pixel gain pattern,
        drawn from calibration_seed alone (the same pattern for every image).
    noise : Poisson counting (False: the expected photons go on unchanged).
    psf : None, "gauss" or "fiber"; psf_fwhm : microns; psf_radius : pixels (0: 3 FWHM
        for the Gaussian, the whole detector for the fiber).
    gain : ADU per photon; adc : ADU offset; readout : ADU rms of Gaussian read-out noise.
    bits : 16 or 32, the integer range (values clip at 0 and 2**bits - 1).
    seed : the random stream for flicker, counts and read-out noise.
    """

    scale: float = 1.0
    flicker: float = 0.0
    calibration: float = 0.0
    calibration_seed: int = 123456789
    noise: bool = True
    psf: Optional[str] = None
    psf_fwhm: float = 0.0
    psf_radius: int = 0
    gain: float = 1.0
    adc: float = 40.0
    readout: float = 0.0
    bits: int = 16
    seed: int = 1

    def __post_init__(self):
        n = "Response"
        _finite(n, "scale", self.scale, nonneg=True)
        for name in ("flicker", "calibration", "psf_fwhm", "readout"):
            _finite(n, name, getattr(self, name), nonneg=True)
        _finite(n, "gain", self.gain, positive=True)
        _finite(n, "adc", self.adc)
        if self.psf is not None and self.psf not in ("gauss", "fiber"):
            raise ParameterError(f"Response.psf = {self.psf!r}; expected None, 'gauss' or 'fiber'")
        if self.psf is not None and not self.psf_fwhm > 0:
            raise ParameterError(f"Response.psf = {self.psf!r} needs psf_fwhm (microns) above 0")
        self._set("psf_radius", _int(n, "psf_radius", self.psf_radius, minimum=0, allow_none=False))
        bits = _int(n, "bits", self.bits, allow_none=False)
        if bits not in (16, 32):
            raise ParameterError(f"Response.bits = {self.bits!r}; expected 16 or 32")
        self._set("bits", bits)
        self._set("seed", _int(n, "seed", self.seed, minimum=0, allow_none=False))
        self._set("calibration_seed", _int(n, "calibration_seed", self.calibration_seed, minimum=0, allow_none=False))
        self._set("noise", bool(self.noise))


@dataclass(frozen=True, eq=False)
class Experiment(_Record):
    """A complete simulation: beam, detector, crystal, structure factors, sampling, the
    amorphous background (a list of :class:`Material`), and optionally the detector's
    response (``Result.detected`` then holds pixel values).  ``provenance`` records a
    file the experiment was read from (:func:`nbragg.io.dials.read_experiments`), so
    that writing it back keeps what nbragg does not model; the simulation ignores it.

    ``physics`` is ``"nanobragg"`` (nanoBragg.c's numbers, the default) or ``"physical"``:
    the solid angle, polarization and sensor absorption of every sub-pixel and source
    multiply that sample's terms (nanoBragg takes them once per pixel, or with
    ``-oversample_*`` multiplies the running sum by them after every term), sensor layers
    are thickness / layers apart (nanoBragg: thickness / (layers - 1)), the water
    background is an amorphous term with these factors, scaled by r_e^2 fluence once
    (nanoBragg: twice), and a source file's weights count."""

    beam: Beam = field(default_factory=Beam)
    detector: Detector = field(default_factory=Detector)
    crystal: Crystal = field(default_factory=Crystal)
    structure: Structure = field(default_factory=Structure)
    sampling: Sampling = field(default_factory=Sampling)
    response: Optional[Response] = None
    background: Tuple[Material, ...] = ()
    provenance: Optional[object] = None
    physics: str = "nanobragg"

    def __post_init__(self):
        if self.physics not in PHYSICS:
            raise ParameterError(f"Experiment.physics = {self.physics!r}; expected one of {', '.join(PHYSICS)}")
        bg = self.background
        if isinstance(bg, Material):
            bg = (bg,)
        try:
            bg = tuple(bg)
        except TypeError:
            raise ParameterError(f"Experiment.background must be a list of Material, got {type(bg).__name__}") from None
        for i, m in enumerate(bg):
            if not isinstance(m, Material):
                raise ParameterError(f"Experiment.background[{i}] must be a Material, got {type(m).__name__}")
        self._set("background", bg)
        for name, cls in (("beam", Beam), ("detector", Detector), ("crystal", Crystal),
                          ("structure", Structure), ("sampling", Sampling)):
            if not isinstance(getattr(self, name), cls):
                raise ParameterError(f"Experiment.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.response is not None and not isinstance(self.response, Response):
            raise ParameterError(f"Experiment.response must be a Response or None, got {type(self.response).__name__}")

    @classmethod
    def from_nanobragg_args(cls, args, warn=None, cwd=None):
        """Build an Experiment from a nanoBragg.c argument list (``sys.argv[1:]`` style).

        ``warn(message)`` receives warnings (unknown flags, flags without effect);
        by default they go to the ``nbragg`` logger.  File names are relative to ``cwd``.
        """
        from .nbargs import parse_nanobragg_args
        return parse_nanobragg_args(args, warn=warn, cwd=cwd).experiment
