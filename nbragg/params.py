"""Named model parameters: a registry of how to read each one and how to set it.

The kernels see arrays (detector vectors, source directions and wavelengths, crystal
orientations, N, the structure-factor grid...).  A named parameter theta (a cell
edge, a missetting angle, the distance...) is a field of the Experiment; it moves some
of those arrays.  The tangent du/dtheta of every kernel input u comes from the set-up
code itself (``engine.resolve`` and ``engine.kernel_inputs``), run once with the field
stepped by i*h (the complex step: u(theta + i h) = u + i h du/dtheta + O(h^2), exact to
rounding for h this small).  This module knows no geometry.  The gradient of a loss is
then sum_u dL/du . du/dtheta (dL/du from the adjoint kernel), and the Jacobian columns
come from the tangent kernel fed with du/dtheta.

Parameters, in the units of the Experiment fields:

========================  ================================================================
cell_a cell_b cell_c      unit-cell edges (Angstrom)
cell_alpha/beta/gamma     unit-cell angles (degrees)
misset_x misset_y misset_z  missetting rotations about x, y, z (degrees; for ``-mat``
                          experiments an extra rotation, starting at 0)
Na Nb Nc                  unit cells along a, b, c
Ncells                    one number of unit cells along a, b and c together (setting it
                          sets all three; its value is their geometric mean)
wavelength                Angstrom (every source wavelength scales with it)
fluence                   photons/m^2
distance                  mm: the ``-distance`` or, when the experiment gives one,
                          the ``-close_distance``
beam_x beam_y             mm: ``-Xbeam``/``-Ybeam`` (MOSFLM, DENZO, ADXV, CUSTOM); for
                          the sample-pivot conventions XDS and DIALS, the near point
                          ((ORGX - 0.5) * pixel, (ORGY - 0.5) * pixel)
detector_rotx/y/z twotheta  degrees
mosaic_spread             degrees (the domains' rotation axes stay fixed by the seed;
                          their angles scale with the spread)
phi0 osc                  degrees (phi step = osc / phisteps unless a phi step was given)
polar                     Kahn polarization factor
water                     microns of water
background_scale_<i>      the scale of background material i (Experiment.background[i])
background_thickness_<i>  its thickness along the beam (mm)
psf_fwhm gain             the detector response (Experiment.response): PSF FWHM (microns),
response_scale adc        gain (ADU/photon), scale, ADC offset (ADU); derivatives of the
                          expected signal (``detected=True`` in gradient and jacobian)
panel_shift_x[i] (y, z)   mm: a shift of panel i of Detector.panels (its index, or its
                          name when unique) along the laboratory x (y, z)
panel_rot_x[i] (y, z)     degrees: its rotation about its own fast (slow, normal) axis
                          through its origin
group_shift_x[g] ...      the same for the group g of Detector.groups: its name when
group_rot_z[g]            unique, or its path ("root", "root/0", "root/0/3": child
                          indices from the top); the group moves as one rigid body
spectrum_shift            Angstrom added to every source wavelength (Beam.spectrum_shift)
spectrum_scale            stretch of the wavelengths about their weighted mean
eta_a eta_b eta_c         anisotropic mosaicity: the domains' rms rotation about the
                          crystal's a, b and c axes (degrees; Crystal.mosaic_eta)
N_ab N_ac N_bc            the off-diagonal terms of a gauss_domain crystal's size matrix
                          (unit cells)
B_iso                     an overall B factor (Angstrom^2; Structure.B_iso)
U_11 U_22 U_33            anisotropic displacements (Angstrom^2, CIF's U_ij;
U_12 U_13 U_23            Structure.U_aniso)
Fhkl                      the structure-factor grid (an array of its shape)
spectrum_weights          the weights of Beam.spectrum's channels (an array; they are
                          normalised, so the gradient is orthogonal to them)
========================  ================================================================

Where nanoBragg is not smooth -- the nearest-index rounding of the F lookup, the -dmin
cut, the top-hat spot edge, the clamp N >= 1, the automatic oversampling and
interpolation choices -- the derivative is that of the smooth piece.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np

from .errors import ParameterError
from .kernels.scene import FIELDS, flatten
from .models.crystal import resolve_phi
from .models.detector import beam_parameters_mm
from .units import RTD, deg2rad

# name -> (record, field, index in a tuple field or None)
_FIELDS = {
    "cell_a": ("crystal", "cell", 0), "cell_b": ("crystal", "cell", 1), "cell_c": ("crystal", "cell", 2),
    "cell_alpha": ("crystal", "cell", 3), "cell_beta": ("crystal", "cell", 4),
    "cell_gamma": ("crystal", "cell", 5),
    "misset_x": ("crystal", "misset", 0), "misset_y": ("crystal", "misset", 1),
    "misset_z": ("crystal", "misset", 2),
    "Na": ("crystal", "Na", None), "Nb": ("crystal", "Nb", None), "Nc": ("crystal", "Nc", None),
    "Ncells": ("crystal", None, None),           # Na = Nb = Nc: _target
    "wavelength": ("beam", "wavelength", None), "fluence": ("beam", "fluence", None),
    "distance": ("detector", None, None),        # distance or close_distance: _target
    "beam_x": ("detector", None, None), "beam_y": ("detector", None, None),
    "detector_rotx": ("detector", "rotx", None), "detector_roty": ("detector", "roty", None),
    "detector_rotz": ("detector", "rotz", None), "twotheta": ("detector", "twotheta", None),
    "mosaic_spread": ("crystal", "mosaic_spread", None), "phi0": ("crystal", "phi0", None),
    "osc": ("crystal", "osc", None), "polar": ("beam", "polarization", None),
    "water": ("sampling", "water", None),
}
SCALAR_PARAMS = tuple(_FIELDS)       # nanoBragg's model; then nbragg's own terms', the response's...
# the parameters of nbragg's own model terms (spectra, anisotropic mosaicity): every
# experiment has nanoBragg's parameters, these are for the experiments that use the terms
TERM_PARAMS = ("spectrum_shift", "spectrum_scale", "eta_a", "eta_b", "eta_c", "N_ab", "N_ac", "N_bc", "B_iso",
               "U_11", "U_22", "U_33", "U_12", "U_13", "U_23")
_FIELDS.update({
    "spectrum_shift": ("beam", "spectrum_shift", None), "spectrum_scale": ("beam", "spectrum_scale", None),
    "eta_a": ("crystal", "mosaic_eta", 0), "eta_b": ("crystal", "mosaic_eta", 1),
    "eta_c": ("crystal", "mosaic_eta", 2),
    "N_ab": ("crystal", "N_ab", None), "N_ac": ("crystal", "N_ac", None), "N_bc": ("crystal", "N_bc", None),
    "B_iso": ("structure", "B_iso", None),
    **{f"U_{ij}": ("structure", "U_aniso", j) for j, ij in enumerate(("11", "22", "33", "12", "13", "23"))},
})
# tuple fields that may be None (read as zeros; setting one of their parameters sets them)
_OPTIONAL_TUPLES = {"mosaic_eta": 3, "U_aniso": 6}
# the detector response's parameters (name -> Response field): they act after the kernel
RESPONSE_PARAMS = {"psf_fwhm": "psf_fwhm", "gain": "gain", "response_scale": "scale", "adc": "adc"}
_FIELDS.update({n: ("response", f, None) for n, f in RESPONSE_PARAMS.items()})
ARRAY_PARAMS = ("Fhkl", "spectrum_weights")
ALL_PARAMS = SCALAR_PARAMS + TERM_PARAMS + ARRAY_PARAMS
# one parameter per background material i: name_<i> -> the Material field
INDEXED_PARAMS = {"background_scale": "scale", "background_thickness": "thickness"}
_INDEXED = re.compile(r"^(%s)_(\d+)$" % "|".join(INDEXED_PARAMS))


# the geometry of Detector.panels and Detector.groups: panel_shift_x[3], group_rot_z[Q1]
_GEOMETRY = re.compile(r"^(panel|group)_(shift|rot)_([xyz])\[([^\]]+)\]$")
GEOMETRY_PARAMS = tuple(f"{k}_{m}_{a}[...]" for k in ("panel", "group") for m in ("shift", "rot") for a in "xyz")


def geometry(name):
    """(kind, field, axis index, key) of a panel or group geometry parameter, else None:
    ``panel_rot_z[3]`` -> ("panel", "rotation", 2, "3")."""
    m = _GEOMETRY.match(name)
    if not m:
        return None
    return m.group(1), "shift" if m.group(2) == "shift" else "rotation", "xyz".index(m.group(3)), m.group(4)


def _find_panel(exp, name, key):
    """Index of the panel ``key`` names: an index, or a panel's unique name."""
    panels = exp.detector.panels
    if panels is None:
        raise ParameterError(f"parameter {name!r}: the detector has no Detector.panels")
    if key.isdigit() and int(key) < len(panels):
        return int(key)
    hits = [i for i, p in enumerate(panels) if p.name == key]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ParameterError(f"parameter {name!r}: {len(hits)} panels are named {key!r}; use the index")
    raise ParameterError(f"parameter {name!r}: no panel {key!r} (an index below {len(panels)} or a panel name)")


def _find_group(exp, name, key):
    """Path ("root/1/0") of the group ``key`` names: its path or its unique name."""
    groups = exp.detector.groups
    if groups is None:
        raise ParameterError(f"parameter {name!r}: the detector has no hierarchy (Detector.groups)")
    listed = groups.groups()
    paths = [p for p, _ in listed]
    if key in paths:
        return key
    hits = [p for p, g in listed if g.name == key]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ParameterError(f"parameter {name!r}: {len(hits)} groups are named {key!r}; use the path "
                             f"({', '.join(hits[:3])})")
    named = [g.name for _, g in listed if g.name][:8]
    raise ParameterError(f"parameter {name!r}: no group {key!r} (a path such as {paths[min(1, len(paths) - 1)]!r}"
                         + (f" or a name such as {', '.join(map(repr, named))}" if named else "") + ")")


def _geometry_node(exp, name):
    """(kind, panel index or group path, field, axis) of a geometry parameter."""
    kind, fld, axis, key = geometry(name)
    where = _find_panel(exp, name, key) if kind == "panel" else _find_group(exp, name, key)
    return kind, where, fld, axis


def _group_at(root, path):
    node = root
    for part in path.split("/")[1:]:
        node = node.children[int(part)]
    return node


def _with_node_value(detector, kind, where, fld, axis, value, validate=True):
    """A Detector with one component of a panel's or group's shift/rotation replaced;
    ``validate=False`` copies the records without their checks (a complex step)."""
    def changed(node):
        t = list(getattr(node, fld))
        t[axis] = value
        if validate:
            return node.replace(**{fld: tuple(t)})
        out = copy.copy(node)
        out._set(fld, tuple(t))
        return out

    def rebuilt(node, parts, fn):
        if not parts:
            return fn(node)
        i = int(parts[0])
        kids = list(node.children)
        kids[i] = rebuilt(kids[i], parts[1:], fn)
        if validate:
            return node.replace(children=tuple(kids))
        out = copy.copy(node)
        out._set("children", tuple(kids))
        return out

    if validate:
        if kind == "panel":
            panels = list(detector.panels)
            panels[where] = changed(panels[where])
            return detector.replace(panels=tuple(panels))
        return detector.replace(groups=rebuilt(detector.groups, where.split("/")[1:], changed))
    out = copy.copy(detector)
    if kind == "panel":
        panels = list(detector.panels)
        panels[where] = changed(panels[where])
        out._set("panels", tuple(panels))
    else:
        out._set("groups", rebuilt(detector.groups, where.split("/")[1:], changed))
    return out


def indexed(name):
    """(base name, index) of a per-material parameter name, else None."""
    m = _INDEXED.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def base_name(name):
    """``background_scale`` for ``background_scale_2``; other names unchanged."""
    i = indexed(name)
    return i[0] if i else name

# the imaginary step of the set-up's complex pass (user units).  The first-order term is
# exact; the next odd one (h^3) is not merely negligible but underflows to 0, so that a
# parameter at a value where the inputs do not move (water 0, whose term goes as w^3)
# gets a tangent of exactly 0, and no tangent is small enough to underflow itself
_STEP = 1e-150


def check_names(names, allow_arrays=True):
    names = [names] if isinstance(names, str) else list(names)
    allowed = ALL_PARAMS if allow_arrays else SCALAR_PARAMS + TERM_PARAMS
    for n in names:
        if n not in allowed and indexed(n) is None and n not in RESPONSE_PARAMS and geometry(n) is None:
            listing = ", ".join(allowed + tuple(RESPONSE_PARAMS) + tuple(f"{b}_<i>" for b in INDEXED_PARAMS)
                                + GEOMETRY_PARAMS)
            if n in ARRAY_PARAMS:
                raise ParameterError(f"parameter {n!r} is an array; this function takes scalar parameters "
                                     f"({', '.join(SCALAR_PARAMS)})")
            raise ParameterError(f"unknown parameter {n!r}; choose from {listing}")
    if len(set(names)) != len(names):
        raise ParameterError(f"parameter names repeat: {names}")
    return names


# the parameters that move nanoBragg's one panel, which Detector.panels replaces
_ONE_PANEL = ("distance", "beam_x", "beam_y", "detector_rotx", "detector_roty", "detector_rotz", "twotheta")


def _check_one_panel(exp, name):
    if name in _ONE_PANEL and exp.detector.panels is not None:
        raise ParameterError(f"parameter {name!r} places nanoBragg's one panel; this detector is given as "
                             f"Detector.panels: refine group_shift_z[root], group_rot_x[root] ... or "
                             f"panel_shift_x[i] ... instead")


def _check_response(exp, name):
    if name in RESPONSE_PARAMS and exp.response is None:
        raise ParameterError(f"parameter {name!r} belongs to the detector response, and the experiment has none "
                             f"(Experiment.response is None)")


def _material(exp, name):
    """(index, Material field) of a per-material parameter, checked against the experiment."""
    base, i = indexed(name)
    if i >= len(exp.background):
        raise ParameterError(f"parameter {name!r}: the experiment has {len(exp.background)} background "
                             f"material(s) (Experiment.background)")
    if base == "background_thickness" and exp.background[i].molecules is not None:
        raise ParameterError(f"parameter {name!r}: material {i} is given as a count of molecules "
                             f"(Material.molecules), which the thickness does not change")
    return i, INDEXED_PARAMS[base]


def _target(exp, name, value, pending=None):
    """(record, field, field value) that give parameter ``name`` the value ``value``;
    ``pending`` holds changes already made to tuple fields ({record: {field: value}})."""
    if indexed(name):
        i, fld = _material(exp, name)
        mats = list((pending or {}).get("background", exp.background))
        mats[i] = mats[i].replace(**{fld: value})
        return "background", None, tuple(mats)
    rec, fld, idx = _FIELDS[name]
    d = exp.detector
    if name == "Ncells":
        return rec, ("Na", "Nb", "Nc"), value
    if name == "distance":
        return rec, "close_distance" if d.close_distance is not None else "distance", value
    if name in ("beam_x", "beam_y"):
        if d.convention in ("xds", "dials"):   # the near point, through ORGX / ORGY
            return rec, "orgx" if name == "beam_x" else "orgy", value / d.pixel_size + 0.5
        return rec, name, value
    if idx is not None:
        t = list((pending or {}).get(rec, {}).get(fld, getattr(getattr(exp, rec), fld))
                 or (0.0,) * _OPTIONAL_TUPLES[fld])
        t[idx] = value
        value = tuple(t)
    return rec, fld, value


def get_params(exp, names):
    """Current values of named parameters (user units); ``Fhkl`` is a copy of the grid."""
    names = check_names(names)
    out = {}
    for n in names:
        if n == "Fhkl":
            if exp.structure.Fhkl is None:
                raise ParameterError("parameter 'Fhkl': the experiment has no structure-factor grid (no -hkl)")
            out[n] = np.array(exp.structure.Fhkl)
            continue
        if n == "spectrum_weights":
            out[n] = np.array(_spectrum_of(exp)[1])
            continue
        if indexed(n):
            i, fld = _material(exp, n)
            out[n] = float(getattr(exp.background[i], fld))
            continue
        if geometry(n):
            kind, where, fld, axis = _geometry_node(exp, n)
            node = exp.detector.panels[where] if kind == "panel" else _group_at(exp.detector.groups, where)
            out[n] = float(getattr(node, fld)[axis])
            continue
        _check_response(exp, n)
        _check_one_panel(exp, n)
        _check_wavelength(exp, n)
        rec, fld, idx = _FIELDS[n]
        if n in ("beam_x", "beam_y"):
            out[n] = float(beam_parameters_mm(exp.detector)[n == "beam_y"])
        elif n == "distance":
            d = exp.detector
            out[n] = float(d.close_distance if d.close_distance is not None else d.distance)
        elif n == "Ncells":
            c = exp.crystal
            out[n] = float((c.Na * c.Nb * c.Nc) ** (1.0 / 3.0))
        elif n == "osc" and exp.crystal.osc is None:   # the oscillation nanoBragg's rules make
            c = exp.crystal
            osc = resolve_phi(deg2rad(c.phi0), -1.0, -1.0 if c.phistep is None else deg2rad(c.phistep),
                              -1 if c.phisteps is None else c.phisteps)[1]
            out[n] = float(osc * RTD)
        elif fld in _OPTIONAL_TUPLES and getattr(getattr(exp, rec), fld) is None:
            if fld == "U_aniso":       # (its derivatives need the term switched on)
                raise ParameterError(f"parameter {n!r}: the structure has no anisotropic displacements "
                                     f"(Structure.U_aniso is None); set them (zeros will do) to refine them")
            out[n] = 0.0
        else:
            v = getattr(getattr(exp, rec), fld)
            out[n] = float((v[idx] if idx is not None else v) or 0.0)
    return out


def _spectrum_of(exp):
    if exp.beam.spectrum is None:
        raise ParameterError("parameter 'spectrum_weights': the beam has no spectrum (Beam.spectrum is None)")
    return exp.beam.spectrum


def _check_wavelength(exp, name):
    if name == "wavelength" and exp.beam.spectrum is not None:
        raise ParameterError("parameter 'wavelength': the beam's wavelengths are those of its spectrum "
                             "(Beam.spectrum); refine spectrum_shift or spectrum_scale instead")


def set_params(exp, values):
    """A new Experiment with the named parameters set (user units)."""
    names = check_names(list(values))
    changes = {}
    for n in names:
        v = values[n]
        if n == "Fhkl":
            st = exp.structure
            if st.Fhkl is None:
                raise ParameterError("parameter 'Fhkl': the experiment has no structure-factor grid (no -hkl)")
            grid = np.asarray(v, dtype=float)
            if grid.shape != st.Fhkl.shape:
                raise ParameterError(f"parameter 'Fhkl': shape {grid.shape}, expected {st.Fhkl.shape}")
            changes.setdefault("structure", {})["Fhkl"] = grid
            continue
        if n == "spectrum_weights":
            lam, w = _spectrum_of(exp)
            w = np.asarray(v, dtype=float)
            if w.shape != lam.shape:
                raise ParameterError(f"parameter 'spectrum_weights': shape {w.shape}, expected {lam.shape}")
            changes.setdefault("beam", {})["spectrum"] = (lam, w)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ParameterError(f"parameter {n!r}: value {v!r} is not a number") from None
        _check_response(exp, n)
        _check_one_panel(exp, n)
        _check_wavelength(exp, n)
        if geometry(n):
            det = changes.get("detector_record", exp.detector)
            changes["detector_record"] = _with_node_value(det, *_geometry_node(exp, n), v)
            continue
        rec, fld, v = _target(exp, n, v, changes)
        if rec == "background":
            changes["background"] = v
        else:
            for f in (fld if isinstance(fld, tuple) else (fld,)):
                changes.setdefault(rec, {})[f] = v
    background = changes.pop("background", exp.background)
    if "detector_record" in changes:
        exp = exp.replace(detector=changes.pop("detector_record"))
    return exp.replace(background=background, **{r: getattr(exp, r).replace(**c) for r, c in changes.items()})


def _stepped(exp, name, h):
    """The experiment with parameter ``name`` stepped by i*h, unvalidated (the validators
    take real numbers; this copy only feeds the set-up's complex pass)."""
    value = complex(get_params(exp, [name])[name], h)
    out = copy.copy(exp)
    if geometry(name):
        out._set("detector", _with_node_value(exp.detector, *_geometry_node(exp, name), value, validate=False))
        return out
    if indexed(name):
        i, fld = _material(exp, name)
        material = copy.copy(exp.background[i])
        material._set(fld, value)
        out._set("background", exp.background[:i] + (material,) + exp.background[i + 1:])
        return out
    rec, fld, value = _target(exp, name, value)
    record = copy.copy(getattr(exp, rec))
    for f in (fld if isinstance(fld, tuple) else (fld,)):
        record._set(f, value)
    out._set(rec, record)
    return out


def input_tangent(model, name):
    """du/dtheta for every kernel input u and the named scalar parameter theta: a flat
    vector in ``model.layout`` (see :mod:`nbragg.kernels.scene`), from one complex-step
    pass through the set-up code."""
    from .engine import detector_panels, kernel_inputs, resolve
    check_names([name], allow_arrays=False)
    if name in RESPONSE_PARAMS:
        return np.zeros(model.layout.size)          # it acts after the kernel
    if _FIELDS.get(name, (None, None))[1] == "mosaic_eta" and model.experiment.crystal.mosaic_eta is None:
        # (a step would switch the mosaicity's kind, and the number of domains with it)
        raise ParameterError(f"parameter {name!r}: the crystal's mosaicity is isotropic (Crystal.mosaic_eta is "
                             f"None); to refine the anisotropic spreads, give Crystal.mosaic_eta instead of "
                             f"Crystal.mosaic_spread")
    exp = _stepped(model.experiment, name, _STEP)
    with warnings.catch_warnings():
        # a complex value written into a real array would lose its step silently
        warnings.simplefilter("error", np.exceptions.ComplexWarning)
        reuse = None if model.resolved is None else (model.experiment, model.resolved)
        det, src, cry = resolve(exp, warn=lambda msg: None, reuse=reuse)
        if reuse is not None and det is model.resolved[0]:
            panels = model.panels           # (the panels follow from the detector alone)
        else:
            panels = detector_panels(model.panel_maker, exp, det)
        u = kernel_inputs(exp, det, panels, src, cry, model.oversample, model.steps)
    if cry.orientations.shape != model.crystal.orientations.shape:
        # only an unset field does this (osc without -osc: setting it switches nanoBragg's
        # phi rules to another number of steps); the model does not read it, so nothing moves
        return np.zeros(model.layout.size)
    # (a field the step did not reach is real: its tangent is the zero flatten leaves)
    tangent = {k: np.imag(u[k]) / _STEP for k in FIELDS if np.iscomplexobj(u[k])}
    return flatten(model.layout, tangent)
