"""DIALS experiment lists (``.expt`` JSON): read them as Experiments, write Experiments
as them.

Reading (:func:`read_experiments`) maps each experiment's models onto nbragg's records,
in the file's laboratory frame (lengths in mm, angles in degrees):

* beam -> ``Detector.beam_vector`` (the incident direction, minus the file's
  sample-to-source ``direction``), ``Beam.wavelength``, the Kahn factor
  ``2 polarization_fraction - 1`` with ``Detector.polar_vector`` the electric vector
  (normal x beam); ``divergence`` (degrees, full angle) -> ``Beam.hdiv_range`` and
  ``vdiv_range`` with nanoBragg's default steps.  ``flux`` and ``transmission`` are
  kept in the file but not simulated (the file gives no beam size: set
  ``Beam.fluence``).  Polychromatic (time-of-flight) beams and probes other than
  X-rays are refused.
* detector -> ``Detector.panels`` in the laboratory frame, composed through the
  ``hierarchy`` (each node's origin and axes are in its parent's frame: origin O +
  P o, axes P f and P s with P = [F S F x S] the parent's axes), and
  ``Detector.groups`` for the hierarchy's groups.  Sensor thickness and mu (overridden
  by a parallax strategy's ``t0`` and ``mu``) give the absorption; ``trusted_range``,
  ``gain`` and the ``mask`` rectangles are kept on the panels.
* crystal -> ``Crystal.cell`` and ``Crystal.orientation`` from ``real_space_a/b/c``
  (rotated by the goniometer's setting and fixed rotations, S F a, so that nbragg's
  rotation about S e reproduces DIALS's S R(e, phi) F U B); ``A_at_scan_points`` at
  the simulated image when present; a Sauter (2014) mosaic model's
  ``ML_half_mosaicity_deg`` -> ``Crystal.mosaic_spread`` and ``ML_domain_size_ang`` ->
  Na, Nb, Nc (the domain size over each cell edge).
* goniometer and scan -> ``Detector.spindle_axis`` (S e), ``Crystal.phi0`` (the start
  of the simulated image) and ``Crystal.osc`` (its width).

Each Experiment keeps its file (``Experiment.provenance``): :func:`write_experiments`
writes back the file's own models, changing only the fields whose nbragg values
changed (a refined panel or group geometry, cell, orientation, wavelength...), so that
what nbragg does not model -- imagesets, profiles, scaling models, scan-varying
models, identifiers -- passes through untouched.  Experiments built otherwise are
written as new models.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import numpy as np

from ..errors import InputFileError, ParameterError

# pixel-to-millimetre strategies whose geometry nbragg can simulate
_STRATEGIES = ("SimplePxMmStrategy", "ParallaxCorrectedPxMmStrategy")
_KINDS = ("beam", "detector", "goniometer", "scan", "crystal")


@dataclasses.dataclass(frozen=True, eq=False)
class DialsSource:
    """Where an Experiment came from: an experiment list's document (read only), the
    experiment's index in it, the image simulated, and the records as read (to find
    what changed when writing back)."""

    path: str
    doc: dict
    index: int
    image: object
    has_crystal: bool = True
    setting: tuple = (np.eye(3), np.eye(3))    # the goniometer's (F, S) used when reading
    as_read: object = None


# ----------------------------------------------------------------------------- helpers

def _where(path, i=None, what=None):
    out = f"experiment list {os.fspath(path)!r}"
    if i is not None:
        out += f", experiment {i}"
    if what:
        out += f", {what}"
    return out


def _vec(d, key, where, default=None):
    if key not in d or d[key] is None:
        if default is not None:
            return np.array(default, dtype=float)
        raise InputFileError(f"{where}: field {key!r} is missing")
    try:
        v = np.array(d[key], dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise InputFileError(f"{where}: field {key!r} = {d[key]!r} is not a 3-vector") from None
    if not np.all(np.isfinite(v)):
        raise InputFileError(f"{where}: field {key!r} = {d[key]!r} is not finite")
    return v


def _unit(v, where, key):
    n = math.sqrt(float(v @ v))
    if n == 0.0:
        raise InputFileError(f"{where}: field {key!r} is the zero vector")
    return v / n


def _number(d, key, where, default=None):
    v = d.get(key, default)
    if v is None:
        raise InputFileError(f"{where}: field {key!r} is missing")
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise InputFileError(f"{where}: field {key!r} = {d.get(key)!r} is not a number") from None
    if not math.isfinite(v):
        raise InputFileError(f"{where}: field {key!r} = {d.get(key)!r} is not finite")
    return v


def _matrix(d, key, where, default=None):
    if key not in d or d[key] is None:
        if default is None:
            raise InputFileError(f"{where}: field {key!r} is missing")
        return np.array(default, dtype=float)
    try:
        m = np.array(d[key], dtype=float).reshape(3, 3)
    except (TypeError, ValueError):
        raise InputFileError(f"{where}: field {key!r} is not 9 numbers (a row-major 3x3 matrix)") from None
    return m


def _rotation(axis, deg):
    """The right-handed rotation by ``deg`` degrees about ``axis`` (any length)."""
    from ..models.geometry import axis_rotation_matrix
    a = np.asarray(axis, dtype=float)
    return axis_rotation_matrix(a / math.sqrt(float(a @ a)), math.radians(deg))


def _load(path):
    from ._text import read_bytes
    raw = read_bytes(os.fspath(path), "experiment list")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"experiment list {os.fspath(path)!r} is not text (UTF-8 JSON)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"experiment list {os.fspath(path)!r} line {e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict) or doc.get("__id__") != "ExperimentList":
        got = doc.get("__id__") if isinstance(doc, dict) else type(doc).__name__
        raise InputFileError(f"experiment list {os.fspath(path)!r}: __id__ is {got!r}, expected 'ExperimentList'")
    if not isinstance(doc.get("experiment"), list) or not doc["experiment"]:
        raise InputFileError(f"experiment list {os.fspath(path)!r} holds no experiments")
    for kind in _KINDS + ("imageset", "profile", "scaling_model"):
        if doc.get(kind) is not None and not isinstance(doc[kind], list):
            raise InputFileError(f"experiment list {os.fspath(path)!r}: {kind!r} is not a list of models")
    return doc


def _model(doc, e, kind, path, i):
    """The experiment's model dict of ``kind`` (and its index), or (None, None)."""
    ref = e.get(kind)
    if ref is None:
        return None, None
    if isinstance(ref, str) or isinstance(ref, bool) or not isinstance(ref, int):
        raise InputFileError(f"{_where(path, i)}: {kind} is given as {ref!r}; nbragg reads models held in the "
                             f"file (an index into its {kind!r} list)")
    models = doc.get(kind) or []
    if not 0 <= ref < len(models):
        raise InputFileError(f"{_where(path, i)}: {kind} {ref} does not exist (the file has {len(models)})")
    return models[ref], ref


# ----------------------------------------------------------------------------- reading

def _beam(d, where):
    from ..experiment import Beam
    kind = d.get("__id__")
    if kind == "polychromatic" or "wavelength_range" in d:
        raise InputFileError(f"{where}: the beam is polychromatic (time of flight, wavelengths "
                             f"{d.get('wavelength_range')}); nbragg simulates monochromatic beams")
    if kind not in (None, "monochromatic"):
        raise InputFileError(f"{where}: beam __id__ {kind!r} is not known (monochromatic beams only)")
    probe = d.get("probe", "x-ray")
    if probe != "x-ray":
        raise InputFileError(f"{where}: the beam's probe is {probe!r}; nbragg simulates X-ray scattering")
    direction = _unit(_vec(d, "direction", where), where, "direction")
    wavelength = _number(d, "wavelength", where)
    if not wavelength > 0:
        raise InputFileError(f"{where}: wavelength {wavelength!r} must be positive")
    normal = _unit(_vec(d, "polarization_normal", where, default=(0.0, 1.0, 0.0)), where, "polarization_normal")
    fraction = _number(d, "polarization_fraction", where, default=0.999)
    if not 0.0 <= fraction <= 1.0:
        raise InputFileError(f"{where}: polarization_fraction {fraction!r} is not between 0 and 1")
    incident = -direction
    electric = np.cross(normal, incident)
    if np.linalg.norm(electric) < 1e-9:
        raise InputFileError(f"{where}: polarization_normal {normal.tolist()} lies along the beam")
    electric /= np.linalg.norm(electric)
    divergence = _number(d, "divergence", where, default=0.0)
    kw = {}
    if divergence > 0.0:
        mrad = math.radians(divergence) * 1000.0
        kw = dict(hdiv_range=mrad, vdiv_range=mrad)
    return Beam(wavelength=wavelength, polarization=2.0 * fraction - 1.0, **kw), incident, electric


def _node_frame(node, parent, where):
    """A hierarchy node's laboratory frame (origin mm, fast, slow) from its local one."""
    O, F, S = parent
    N = np.cross(F, S)
    if all(k in node for k in ("origin", "fast_axis", "slow_axis")):
        o = _vec(node, "origin", where)
        f = _unit(_vec(node, "fast_axis", where), where, "fast_axis")
        s = _unit(_vec(node, "slow_axis", where), where, "slow_axis")
    else:      # dxtbx's default local frame
        o, f, s = np.zeros(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    P = np.column_stack([F, S, N])
    fl, sl = P @ f, P @ s
    return O + P @ o, fl / np.linalg.norm(fl), sl / np.linalg.norm(sl)


_LAB = (np.zeros(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))


def _panel(d, frame, where):
    from ..experiment import Panel
    size = d.get("image_size")
    px = d.get("pixel_size")
    try:
        if any(int(v) != v for v in size[:2]):
            raise ValueError
        size = (int(size[0]), int(size[1]))
        px = (float(px[0]), float(px[1]))
    except (TypeError, ValueError, IndexError):
        raise InputFileError(f"{where}: image_size {size!r} / pixel_size {px!r} are not pairs of whole numbers "
                             f"and numbers") from None
    if px[0] != px[1]:
        raise InputFileError(f"{where}: pixel_size {list(px)} is not square; nbragg's pixels are square")
    strategy = d.get("px_mm_strategy") or {"type": "SimplePxMmStrategy"}
    if not isinstance(strategy, dict):
        raise InputFileError(f"{where}: px_mm_strategy {strategy!r} is not an object with a 'type'")
    kind = strategy.get("type")
    if kind not in _STRATEGIES:
        raise InputFileError(f"{where}: px_mm_strategy {kind!r} is not supported (only {', '.join(_STRATEGIES)}: "
                             f"offset maps need the imageset's dx/dy files)")
    thickness = _number(d, "thickness", where, default=0.0)
    mu = _number(d, "mu", where, default=0.0)
    if kind == "ParallaxCorrectedPxMmStrategy" and "mu" in strategy and "t0" in strategy:
        mu, thickness = _number(strategy, "mu", where), _number(strategy, "t0", where)
    for name, v in (("thickness", thickness), ("mu", mu)):
        if v < 0:
            raise InputFileError(f"{where}: {name} {v!r} is negative")
    trusted = d.get("trusted_range")
    try:
        mask = tuple(tuple(int(v) for v in r) for r in (d.get("mask") or ()))
    except (TypeError, ValueError):
        raise InputFileError(f"{where}: mask {d.get('mask')!r} is not a list of [f0, s0, f1, s1] rectangles") from None
    origin, fast, slow = frame
    try:
        return Panel(origin=tuple(origin), fast_axis=tuple(fast), slow_axis=tuple(slow), image_size=size,
                     pixel_size=px, name=str(d.get("name", "")), thickness=thickness, mu=mu,
                     trusted_range=None if trusted is None else tuple(trusted),
                     gain=_number(d, "gain", where, default=1.0), mask=mask)
    except ParameterError as e:
        raise InputFileError(f"{where}: {e}") from None


def _detector(d, where):
    """(panels, groups) of a detector dict, in the laboratory frame."""
    from ..experiment import PanelGroup
    panels = d.get("panels")
    if not isinstance(panels, list) or not panels:
        raise InputFileError(f"{where}: the detector has no panels")
    hierarchy = d.get("hierarchy")
    frames = [None] * len(panels)

    def visit(node, parent, path):
        here = f"{where}, hierarchy node {path}"
        if not isinstance(node, dict) or not isinstance(node.get("children", []), list):
            raise InputFileError(f"{here} is not a node (an object with a 'panel' or a list of 'children')")
        if "panel" in node:
            k = node["panel"]
            if not isinstance(k, int) or not 0 <= k < len(panels):
                raise InputFileError(f"{here}: panel {k!r} is not an index below {len(panels)}")
            if frames[k] is not None:
                raise InputFileError(f"{here}: panel {k} appears twice in the hierarchy")
            frames[k] = _node_frame(panels[k], parent, f"{where}, panel {k}")
            return k
        frame = _node_frame(node, parent, here)
        kids = [visit(c, frame, f"{path}/{j}") for j, c in enumerate(node.get("children") or [])]
        return PanelGroup(children=tuple(kids), name=str(node.get("name", "")), origin=tuple(frame[0]),
                          fast_axis=tuple(frame[1]), slow_axis=tuple(frame[2]))

    groups = None
    if hierarchy:
        if "panel" in hierarchy:
            raise InputFileError(f"{where}: the hierarchy's root is a panel; it must be a group")
        groups = visit(hierarchy, _LAB, "root")
        missing = [k for k, f in enumerate(frames) if f is None]
        if missing:
            raise InputFileError(f"{where}: panel {missing[0]} is not in the hierarchy")
    else:
        frames = [_node_frame(p, _LAB, f"{where}, panel {k}") for k, p in enumerate(panels)]
    out = [_panel(p, frames[k], f"{where}, panel {k} ({p.get('name', '')!r})") for k, p in enumerate(panels)]
    sizes = {(p.image_size, p.pixel_size) for p in out}
    if len(sizes) > 1:
        raise InputFileError(f"{where}: the panels differ in size ({', '.join(str(s[0]) for s in sizes)}); "
                             f"nbragg simulates panels of one size")
    return tuple(out), groups


def _goniometer(d, where):
    """(F, S, e): the fixed and setting rotations and the datum rotation axis."""
    if d is None:
        return np.eye(3), np.eye(3), None
    if all(k in d for k in ("axes", "angles", "scan_axis")):
        try:
            axes = [np.array(a, dtype=float).reshape(3) for a in d["axes"]]
            angles = [float(a) for a in d["angles"]]
            k = d["scan_axis"]
            if not isinstance(k, int):
                raise ValueError
        except (TypeError, ValueError):
            raise InputFileError(f"{where}: axes, angles or scan_axis are not 3-vectors, numbers and an "
                                 f"index") from None
        if len(axes) != len(angles) or not 0 <= k < len(axes):
            raise InputFileError(f"{where}: axes, angles and scan_axis {k} do not match")
        for j, a in enumerate(axes):
            _unit(a, where, f"axes[{j}]")
        F = np.eye(3)
        for a, t in zip(axes[:k], angles[:k]):
            F = _rotation(a, t) @ F
        S = np.eye(3)
        for a, t in zip(axes[k + 1:], angles[k + 1:]):
            S = _rotation(a, t) @ S
        return F, S, _unit(axes[k], where, "axes")
    e = _unit(_vec(d, "rotation_axis", where), where, "rotation_axis")
    return _matrix(d, "fixed_rotation", where, np.eye(3)), _matrix(d, "setting_rotation", where, np.eye(3)), e


def _scan(d, image, where):
    """(phi0, width) in degrees at the start of ``image`` (None: the first), and the
    scan-point index of that image."""
    if d is None:
        if image not in (None, 1):
            raise InputFileError(f"{where}: image {image} asked for, but the experiment has no scan")
        return 0.0, 0.0, 0
    try:
        first, last = (int(v) for v in d["image_range"])
    except (KeyError, TypeError, ValueError):
        raise InputFileError(f"{where}: the scan's image_range is missing or not two integers") from None
    if "properties" in d:
        props = d["properties"]
        starts = props.get("oscillation") if isinstance(props, dict) else None
        if not starts:
            raise InputFileError(f"{where}: the scan has no oscillation (a time-of-flight scan?)")
        try:
            width = (float(props["oscillation_width"][0]) if len(starts) < 2
                     else float(starts[1]) - float(starts[0]))
            phi_first = float(starts[0])
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputFileError(f"{where}: the scan's oscillation {starts!r} gives no start and width "
                                 f"(one image needs oscillation_width)") from None
    else:
        try:
            phi_first, width = (float(v) for v in d["oscillation"])
        except (KeyError, TypeError, ValueError):
            raise InputFileError(f"{where}: the scan's oscillation is missing or not [start, width]") from None
    if image is not None and (isinstance(image, bool) or not isinstance(image, (int, np.integer))):
        raise InputFileError(f"{where}: image {image!r} is not an image number")
    image = first if image is None else int(image)
    if not first <= image <= last:
        raise InputFileError(f"{where}: image {image} is outside the scan's image_range [{first}, {last}]")
    return phi_first + (image - first) * width, width, image - first


def _crystal(d, F, S, point, where="", warn=None):
    from ..experiment import Crystal
    from ..models.crystal import cell_from_vectors, cell_vectors
    if "A_at_scan_points" in d and d["A_at_scan_points"]:
        pts = d["A_at_scan_points"]
        if point >= len(pts):
            raise InputFileError(f"{where}: A_at_scan_points has {len(pts)} entries; scan point {point} needed")
        real = np.linalg.inv(_matrix({"A": pts[point]}, "A", f"{where}, A_at_scan_points[{point}]"))
    else:
        real = np.array([_vec(d, f"real_space_{x}", where) for x in "abc"])
    if not abs(np.linalg.det(real)) > 0:
        raise InputFileError(f"{where}: the cell vectors are coplanar")
    lab = (S @ F @ real.T).T          # rows a, b, c as nbragg's phi = 0 sees them
    cell = cell_from_vectors(lab)
    B = cell_vectors(cell)
    U = lab.T @ np.linalg.inv(B.T)
    kw = {}
    half = d.get("ML_half_mosaicity_deg")
    size = d.get("ML_domain_size_ang")
    if half is not None and size is not None:
        half = _number(d, "ML_half_mosaicity_deg", where)
        size = _number(d, "ML_domain_size_ang", where)
        if half < 0 or not size > 0:
            raise InputFileError(f"{where}: ML_half_mosaicity_deg {half!r} / ML_domain_size_ang {size!r} must be "
                                 f"at least 0 / positive")
        if half > 0:
            kw["mosaic_spread"] = half
        lengths = np.linalg.norm(lab, axis=1)
        kw.update(Na=size / lengths[0], Nb=size / lengths[1], Nc=size / lengths[2])
    elif warn is not None and d.get("mosaicity"):
        warn(f"{where}: the Kabsch mosaicity {d['mosaicity']!r} degrees is not simulated (give Crystal.mosaic_spread)")
    try:
        return Crystal(cell=cell, orientation=U, **kw)
    except ParameterError as e:
        raise InputFileError(f"{where}: {e}") from None


_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError,
              np.linalg.LinAlgError)


def _read_one(doc, path, i, image, warn):
    """Experiment ``i`` of a loaded document."""
    from ..experiment import Crystal, Detector, Experiment
    e = doc["experiment"][i]
    if not isinstance(e, dict):
        raise InputFileError(f"{_where(path, i)} is not a JSON object")
    models = {}
    for kind in _KINDS:
        d, _ = _model(doc, e, kind, path, i)
        if d is not None and not isinstance(d, dict):
            raise InputFileError(f"{_where(path, i, kind)} is not a JSON object")
        models[kind] = d
    bd, dd, gd, sd, cd = (models[k] for k in ("beam", "detector", "goniometer", "scan", "crystal"))
    if bd is None or dd is None:
        raise InputFileError(f"{_where(path, i)} has no {'beam' if bd is None else 'detector'}")
    beam, incident, electric = _beam(bd, _where(path, i, "beam"))
    if warn is not None and bd.get("sigma_divergence"):
        warn(f"{_where(path, i, 'beam')}: sigma_divergence {bd['sigma_divergence']!r} degrees is not simulated "
             f"(the divergence is)")
    F, S, axis = _goniometer(gd, _where(path, i, "goniometer"))
    phi0, width, point = _scan(sd, image, _where(path, i, "scan"))
    points = bd.get("s0_at_scan_points")
    if sd is not None and points:       # a scan-varying beam, at the simulated image
        s0 = _vec({"s0": points[min(point, len(points) - 1)]}, "s0", _where(path, i, "beam, s0_at_scan_points"))
        incident = _unit(s0, _where(path, i, "beam"), "s0_at_scan_points")
        beam = beam.replace(wavelength=1.0 / float(np.linalg.norm(s0)))
    settings = (gd or {}).get("setting_rotation_at_scan_points")
    if sd is not None and settings:
        S = _matrix({"S": settings[min(point, len(settings) - 1)]}, "S",
                    _where(path, i, "goniometer, setting_rotation_at_scan_points"))
    panels, groups = _detector(dd, _where(path, i, "detector"))
    spindle = S @ axis if axis is not None else np.array([1.0, 0.0, 0.0])
    try:
        detector = Detector(convention="custom", beam_vector=incident, polar_vector=electric,
                            spindle_axis=spindle, panels=panels, groups=groups)
    except ParameterError as err:
        raise InputFileError(f"{_where(path, i, 'detector')}: {err}") from None
    if cd is not None:
        crystal = _crystal(cd, F, S, point, where=_where(path, i, "crystal"), warn=warn)
    else:
        crystal = Crystal()
        if warn is not None:
            warn(f"{_where(path, i)} has no crystal: nbragg's default cell (100 A cubic) stands in; "
                 f"give one (Crystal.cell, -cell or -mat)")
    if width != 0.0 or phi0 != 0.0:
        crystal = crystal.replace(phi0=phi0, osc=width if width != 0.0 else None)
    exp = Experiment(beam=beam, detector=detector, crystal=crystal)
    src = DialsSource(path=os.fspath(path), doc=doc, index=i, image=image, has_crystal=cd is not None,
                      setting=(F, S))
    exp = exp.replace(provenance=src)
    object.__setattr__(src, "as_read", exp)
    return exp


def _guarded(doc, path, i, image, warn):
    try:
        return _read_one(doc, path, i, image, warn)
    except _MALFORMED as exc:     # content of the wrong kind somewhere in the models
        raise InputFileError(f"{_where(path, i)}: malformed content ({type(exc).__name__}: {exc})") from None


def read_experiments(path, image=None, warn=None):
    """The experiments of a DIALS experiment list, as nbragg Experiments (a list in the
    file's order).  For experiments with a scan, ``image`` (the file's 1-based image
    number; default the scan's first) is the one simulated.  The structure factors and
    the sampling are nbragg's defaults: set them on the result.  ``warn(message)``
    receives what is read but not simulated (and an experiment without a crystal)."""
    doc = _load(path)
    return [_guarded(doc, path, i, image, warn) for i in range(len(doc["experiment"]))]


def read_experiment(path, index=0, image=None, warn=None):
    """One experiment of a DIALS experiment list (see :func:`read_experiments`); the
    others are not read, so they may hold what nbragg does not simulate."""
    doc = _load(path)
    n = len(doc["experiment"])
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise InputFileError(f"{_where(path)}: experiment {index!r} does not exist (it holds {n}: 0 to {n - 1})")
    return _guarded(doc, path, int(index), image, warn)


# ----------------------------------------------------------------------------- writing

def _same(a, b):
    """Two records (or values) equal field by field, arrays by value."""
    if a is b:
        return True
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
                   if f.name != "provenance")
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(a, b)
    return a == b


def _local(lab, parent):
    """A frame (origin, fast, slow) in its parent's frame (the inverse of _node_frame)."""
    O, F, S = parent
    P = np.column_stack([F, S, np.cross(F, S)])
    inv = np.linalg.inv(P)
    return inv @ (lab[0] - O), inv @ lab[1], inv @ lab[2]


def _detector_frames(detector):
    """Laboratory frames after every motion: (panel frames, {group path: frame})."""
    from ..models.detector import group_lab_frame, lab_frame
    panels = [tuple(np.real(v) for v in lab_frame(detector, i)) for i in range(len(detector.panels))]
    groups = {}
    if detector.groups is not None:
        for path, _ in detector.groups.groups():
            groups[path] = tuple(np.real(v) for v in group_lab_frame(detector, path))
    return panels, groups


def _set_frame(d, frame):
    o, f, s = frame
    d["origin"] = [float(x) for x in o]
    d["fast_axis"] = [float(x) for x in f]
    d["slow_axis"] = [float(x) for x in s]


def _write_detector(dd, detector):
    """Fold the detector's panels (after their motions) into the dict ``dd``'s local
    frames, node by node through its hierarchy (whose shape is the detector's)."""
    panels, groups = _detector_frames(detector)
    hierarchy = dd.get("hierarchy")
    if not hierarchy:
        for k, frame in enumerate(panels):
            _set_frame(dd["panels"][k], frame)
        return

    def visit(node, parent, path):
        if "panel" in node:
            _set_frame(dd["panels"][node["panel"]], _local(panels[node["panel"]], parent))
            return
        frame = groups[path]
        _set_frame(node, _local(frame, parent))
        for j, c in enumerate(node.get("children") or []):
            visit(c, frame, f"{path}/{j}")
    visit(hierarchy, _LAB, "root")


def _shape(detector):
    """The hierarchy's shape: panel count and the nesting of groups and panel indices."""
    def tree(g):
        return tuple(c if isinstance(c, int) else tree(c) for c in g.children)
    if detector.panels is None:
        return None
    return len(detector.panels), None if detector.groups is None else tree(detector.groups)


# panel fields written as they are (frames are written through the hierarchy)
_PANEL_FIELDS = ("name", "image_size", "pixel_size", "thickness", "mu", "trusted_range", "gain", "mask")


def _panel_fields(d, p):
    d["name"] = p.name
    d["image_size"] = list(p.image_size)
    d["pixel_size"] = list(p.pixel_size)
    d["thickness"], d["mu"], d["gain"] = p.thickness, p.mu, p.gain
    strategy = d.get("px_mm_strategy")
    if isinstance(strategy, dict) and "mu" in strategy and "t0" in strategy:
        strategy["mu"], strategy["t0"] = p.mu, p.thickness
    d["trusted_range"] = list(p.trusted_range) if p.trusted_range is not None else [-1.0, 1e9]
    d["mask"] = [list(r) for r in p.mask]


def _root_frame(hierarchy):
    return _node_frame(hierarchy, _LAB, "hierarchy")


def _panel_dict(p, frame):
    o, f, s = frame
    return {"name": p.name, "type": "SENSOR_PAD", "fast_axis": [float(x) for x in f],
            "slow_axis": [float(x) for x in s], "origin": [float(x) for x in o], "raw_image_offset": [0, 0],
            "image_size": list(p.image_size), "pixel_size": list(p.pixel_size),
            "trusted_range": list(p.trusted_range) if p.trusted_range is not None else [-1.0, 1e9],
            "thickness": p.thickness, "material": "Si" if p.thickness > 0 else "", "mu": p.mu, "identifier": "",
            "mask": [list(r) for r in p.mask], "gain": p.gain, "pedestal": 0.0,
            "px_mm_strategy": {"type": "ParallaxCorrectedPxMmStrategy" if p.thickness > 0 and p.mu > 0
                               else "SimplePxMmStrategy"}}


def _new_detector(exp, model):
    """A detector dict for an Experiment not read from a file: its panels in the
    laboratory frame under a trivial hierarchy."""
    from ..experiment import Panel
    if exp.detector.panels is not None:
        panels, _ = _detector_frames(exp.detector)
        users = exp.detector.panels
    else:
        panels, users = [], []
        for k, p in enumerate(model.panels):
            frame = (np.real(p.pix0) * 1000.0, np.real(p.fdet), np.real(p.sdet))
            panels.append(frame)
            thickness = p.thick * 1000.0 if p.mu > 0 else 0.0
            users.append(Panel(origin=tuple(frame[0]), fast_axis=tuple(frame[1]), slow_axis=tuple(frame[2]),
                               image_size=(p.fpixels, p.spixels), pixel_size=p.pixel * 1000.0, name=f"panel{k}",
                               thickness=thickness, mu=p.mu / 1000.0 if thickness > 0 else 0.0))
    d = {"panels": [_panel_dict(p, f) for p, f in zip(users, panels)]}
    groups = exp.detector.groups if exp.detector.panels is not None else None
    if groups is None:
        d["hierarchy"] = {"name": "", "type": "", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, 1.0, 0.0],
                          "origin": [0.0, 0.0, 0.0], "children": [{"panel": k} for k in range(len(panels))]}
        return d
    _, frames = _detector_frames(exp.detector)

    def node(group, path, parent):
        out = {"name": group.name, "type": ""}
        _set_frame(out, _local(frames[path], parent))
        out["children"] = [{"panel": c} if isinstance(c, int) else node(c, f"{path}/{j}", frames[path])
                           for j, c in enumerate(group.children)]
        return out
    d["hierarchy"] = node(groups, "root", _LAB)
    # a panel's own frame is written relative to the group holding it
    from ..models.detector import panel_chains
    for k, chain in enumerate(panel_chains(exp.detector)):
        if chain:
            path = next(p for p, g in groups.groups() if g is chain[0])
            _set_frame(d["panels"][k], _local(panels[k], frames[path]))
    return d


def _beam_dict(exp, model, base=None):
    d = dict(base or {"divergence": 0.0, "sigma_divergence": 0.0, "flux": 0.0, "transmission": 1.0})
    incident = np.real(model.detector.beam)
    electric = np.real(model.detector.polar)
    normal = np.cross(incident, electric)
    d["direction"] = [float(-x) for x in incident]
    d["wavelength"] = float(exp.beam.wavelength)
    d["polarization_normal"] = [float(x) for x in normal / np.linalg.norm(normal)]
    d["polarization_fraction"] = float((exp.beam.polarization + 1.0) / 2.0)
    d["divergence"] = math.degrees((exp.beam.hdiv_range or 0.0) / 1000.0)
    return d


def _real_space(exp, model, F=np.eye(3), S=np.eye(3)):
    """Rows a, b, c (Angstrom) in DIALS's datum frame: (S F)^-1 applied to nbragg's."""
    real = np.real(model.crystal.real0) * 1e10
    return (np.linalg.inv(S @ F) @ real.T).T


def _mosaic_fields(d, exp, real):
    """A Sauter (2014) mosaic model from nbragg's N and mosaic spread: the domain size is
    the mean of Na |a|, Nb |b|, Nc |c| (DIALS holds one size)."""
    c = exp.crystal
    lengths = np.linalg.norm(real, axis=1)
    d["ML_half_mosaicity_deg"] = float(c.mosaic_spread or 0.0)
    d["ML_domain_size_ang"] = float(np.mean([c.Na * lengths[0], c.Nb * lengths[1], c.Nc * lengths[2]]))


def _crystal_dict(exp, model, F=np.eye(3), S=np.eye(3), base=None):
    d = dict(base or {"__id__": "crystal", "space_group_hall_symbol": " P 1"})
    for x, v in zip("abc", _real_space(exp, model, F, S)):
        d[f"real_space_{x}"] = v.tolist()
    for key in ("A_at_scan_points", "B_covariance", "B_covariance_at_scan_points"):
        d.pop(key, None)           # they describe the crystal as it was
    return d


def _orientation_changed(a, b):
    return not (_same(a.cell, b.cell) and _same(a.misset, b.misset) and _same(a.orientation, b.orientation))


def _size_changed(a, b):
    return (a.Na, a.Nb, a.Nc, a.mosaic_spread) != (b.Na, b.Nb, b.Nc, b.mosaic_spread)


def _write_scan(sd, exp, src, where):
    """Put a changed phi0 / oscillation into the scan dict."""
    c = exp.crystal
    if sd is None:
        raise ParameterError(f"{where}: Crystal.phi0/osc changed, but the experiment has no scan to hold them")
    first = int(sd["image_range"][0])
    image = first if src.image is None else int(src.image)
    width = float(c.osc or 0.0)
    start = float(c.phi0) - (image - first) * width
    if "properties" in sd:
        n = len(sd["properties"]["oscillation"])
        sd["properties"]["oscillation"] = [start + j * width for j in range(n)]
        if "oscillation_width" in sd["properties"]:
            sd["properties"]["oscillation_width"] = [width] * len(sd["properties"]["oscillation_width"])
    else:
        sd["oscillation"] = [start, width]


def _experiment_models(exp):
    """({kind: dict or None}, the experiment's own keys, {kind: dict} of the imageset,
    profile and scaling model) for one Experiment."""
    from ..engine import build_model
    model = build_model(exp, warn=lambda m: None)
    src = exp.provenance if isinstance(exp.provenance, DialsSource) else None
    c = exp.crystal
    if src is None:
        models = {"beam": _beam_dict(exp, model), "detector": _new_detector(exp, model)}
        models["crystal"] = _crystal_dict(exp, model)
        if (c.Na, c.Nb, c.Nc) != (1.0, 1.0, 1.0) or c.mosaic_spread:
            _mosaic_fields(models["crystal"], exp, _real_space(exp, model))
        if c.osc or c.phi0:
            models["goniometer"] = {"rotation_axis": [float(x) for x in np.real(model.crystal.spindle)],
                                    "fixed_rotation": np.eye(3).ravel().tolist(),
                                    "setting_rotation": np.eye(3).ravel().tolist()}
            models["scan"] = {"image_range": [1, 1], "oscillation": [float(c.phi0), float(c.osc or 0.0)],
                              "batch_offset": 0, "valid_image_ranges": {}}
        return models, {"__id__": "Experiment", "identifier": ""}, {}
    doc, i = src.doc, src.index
    where = _where(src.path, i)
    e = doc["experiment"][i]
    models = {kind: copy.deepcopy(_model(doc, e, kind, src.path, i)[0]) for kind in _KINDS}
    old = src.as_read
    d, od = exp.detector, old.detector
    if not (_same(exp.beam, old.beam) and _same(d.beam_vector, od.beam_vector)
            and _same(d.polar_vector, od.polar_vector)):
        models["beam"] = _beam_dict(exp, model, models["beam"])
        models["beam"].pop("s0_at_scan_points", None)
    if d.panels is None or _shape(d) != _shape(od):
        models["detector"] = _new_detector(exp, model)      # another detector altogether
    elif not (_same(d.panels, od.panels) and _same(d.groups, od.groups)):
        _write_detector(models["detector"], d)
        for k, (p, q) in enumerate(zip(d.panels, od.panels)):
            if any(not _same(getattr(p, f), getattr(q, f)) for f in _PANEL_FIELDS):
                _panel_fields(models["detector"]["panels"][k], p)
    F, S = src.setting
    oc = old.crystal
    if not src.has_crystal and _same(c, oc):
        models["crystal"] = None              # the stand-in cell was never set
    else:
        if models["crystal"] is None or _orientation_changed(c, oc):
            models["crystal"] = _crystal_dict(exp, model, F, S, models["crystal"])
        if _size_changed(c, oc):
            _mosaic_fields(models["crystal"], exp, _real_space(exp, model, F, S))
    if (c.phi0, c.osc) != (oc.phi0, oc.osc):
        _write_scan(models["scan"], exp, src, where)
    extra = {k: copy.deepcopy(v) for k, v in e.items() if k not in _KINDS + ("imageset", "profile", "scaling_model")}
    shared = {k: copy.deepcopy(doc[k][e[k]]) for k in ("imageset", "profile", "scaling_model")
              if isinstance(e.get(k), int) and e[k] < len(doc.get(k) or [])}
    return models, extra, shared


def write_experiments(path, experiments):
    """Write Experiments as a DIALS experiment list (JSON), atomically.  Models equal in
    content are written once and shared, as DIALS does."""
    from ..experiment import Experiment
    from .atomic import atomic_write
    if isinstance(experiments, Experiment):
        experiments = [experiments]
    try:
        experiments = list(experiments)
    except TypeError:
        raise ParameterError(f"write_experiments: expected Experiments, got {type(experiments).__name__}") from None
    if not experiments:
        raise ParameterError("write_experiments: no experiments to write")
    lists = {k: [] for k in _KINDS + ("imageset", "profile", "scaling_model")}
    keys = {k: {} for k in lists}
    out = []
    for n, exp in enumerate(experiments):
        if not isinstance(exp, Experiment):
            raise ParameterError(f"write_experiments: item {n} is a {type(exp).__name__}, not an Experiment")
        models, entry, shared = _experiment_models(exp)
        entry = dict(entry)
        for kind, d in list(models.items()) + list(shared.items()):
            if d is None:
                entry.pop(kind, None)
                continue
            key = json.dumps(d, sort_keys=True)
            if key not in keys[kind]:
                keys[kind][key] = len(lists[kind])
                lists[kind].append(d)
            entry[kind] = keys[kind][key]
        out.append(entry)
    doc = {"__id__": "ExperimentList", "experiment": out, **lists}
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())


def write_refined(path, experiment):
    """Write the experiment list ``experiment`` was read from with that experiment's
    models replaced by its current ones, every other experiment and model untouched (a
    model it shares with others is added anew rather than changed under them)."""
    from .atomic import atomic_write
    src = experiment.provenance
    if not isinstance(src, DialsSource):
        raise ParameterError("write_refined: the experiment was not read from an experiment list "
                             "(use write_experiments)")
    doc = copy.deepcopy(src.doc)
    e = doc["experiment"][src.index]
    models, _, _ = _experiment_models(experiment)
    for kind, d in models.items():
        j = e.get(kind)
        if d is None:
            continue
        if isinstance(j, int) and doc[kind][j] == d:
            continue
        users = sum(1 for x in doc["experiment"] if isinstance(x, dict) and x.get(kind) == j)
        if isinstance(j, int) and users == 1:
            doc[kind][j] = d
        else:
            doc.setdefault(kind, [])
            doc[kind] = doc[kind] or []
            doc[kind].append(d)
            e[kind] = len(doc[kind]) - 1
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())
