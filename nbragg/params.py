"""Named model parameters and the chain rule from kernel inputs to them.

The kernels see arrays (detector vectors, source directions and wavelengths, crystal
orientations, N, the structure-factor grid...).  A named parameter theta (a cell
edge, a missetting angle, the distance...) moves some of those arrays; this module
derives, by hand, the tangent du/dtheta of every kernel input u.  The gradient of a
loss is then sum_u dL/du . du/dtheta (dL/du from the adjoint kernel), and the
Jacobian columns come from the tangent kernel fed with du/dtheta.

Parameters, in the units of the Experiment fields:

========================  ================================================================
cell_a cell_b cell_c      unit-cell edges (Angstrom)
cell_alpha/beta/gamma     unit-cell angles (degrees)
misset_x misset_y misset_z  missetting rotations about x, y, z (degrees; for ``-mat``
                          experiments an extra rotation, starting at 0)
Na Nb Nc                  unit cells along a, b, c
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
Fhkl                      the structure-factor grid (an array of its shape)
========================  ================================================================

Where nanoBragg is not smooth -- the nearest-index rounding of the F lookup, the -dmin
cut, the top-hat spot edge, the clamp N >= 1, the automatic oversampling and
interpolation choices -- the derivative is that of the smooth piece.
"""

from __future__ import annotations

import math
import numpy as np

from .errors import ParameterError
from .kernels.scene import flatten
from .models.crystal import cell_vectors_and_derivatives
from .models.detector import DBL_MIN, _CONVENTION_VECTORS
from .models.geometry import axis_rotation_matrix, rotation_xyz_matrix, unitize
from .units import DTR, RTD, deg2rad

SCALAR_PARAMS = (
    "cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma",
    "misset_x", "misset_y", "misset_z", "Na", "Nb", "Nc", "wavelength", "fluence",
    "distance", "beam_x", "beam_y", "detector_rotx", "detector_roty", "detector_rotz", "twotheta",
    "mosaic_spread", "phi0", "osc", "polar", "water",
)
ARRAY_PARAMS = ("Fhkl",)
ALL_PARAMS = SCALAR_PARAMS + ARRAY_PARAMS

_CELL = {"cell_a": 0, "cell_b": 1, "cell_c": 2, "cell_alpha": 3, "cell_beta": 4, "cell_gamma": 5}
_MISSET = {"misset_x": 0, "misset_y": 1, "misset_z": 2}
_DET_ANGLE = {"detector_rotx": "rotx", "detector_roty": "roty", "detector_rotz": "rotz", "twotheta": "twotheta"}


def check_names(names, allow_arrays=True):
    names = [names] if isinstance(names, str) else list(names)
    allowed = ALL_PARAMS if allow_arrays else SCALAR_PARAMS
    for n in names:
        if n not in allowed:
            if n in ARRAY_PARAMS:
                raise ParameterError(f"parameter {n!r} is an array; this function takes scalar parameters "
                                     f"({', '.join(SCALAR_PARAMS)})")
            raise ParameterError(f"unknown parameter {n!r}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ParameterError(f"parameter names repeat: {names}")
    return names


# ----------------------------------------------------------------------------- get / set

def _near_point_mm(det):
    """The near point used by the sample-pivot conventions, in mm (Fclose, Sclose)."""
    px = det.pixel_size
    fx = (det.orgx - 0.5) * px if det.orgx is not None else (det.detsize_f or px * det.fpixels) / 2.0
    fy = (det.orgy - 0.5) * px if det.orgy is not None else (det.detsize_s or px * det.spixels) / 2.0
    return fx, fy


def _default_beam_mm(det):
    """nanoBragg's default -Xbeam/-Ybeam for the detector's convention (mm)."""
    px = det.pixel_size
    dsf = det.detsize_f if det.detsize_f is not None else px * det.fpixels
    dss = det.detsize_s if det.detsize_s is not None else px * det.spixels
    conv = det.convention
    if conv == "adxv":
        return (dsf + px) / 2.0, (dss - px) / 2.0
    if conv in ("mosflm", "denzo"):
        return (dss + px) / 2.0, (dsf + px) / 2.0
    # custom: Xbeam defaults to Xclose, itself defaulting to the near point
    xc = det.xclose if det.xclose is not None else _near_point_mm(det)[0]
    yc = det.yclose if det.yclose is not None else _near_point_mm(det)[1]
    return xc, yc


def get_params(exp, names):
    """Current values of named parameters (user units); ``Fhkl`` is a copy of the grid."""
    names = check_names(names)
    c, b, d, s, st = exp.crystal, exp.beam, exp.detector, exp.sampling, exp.structure
    out = {}
    for n in names:
        if n in _CELL:
            out[n] = float(c.cell[_CELL[n]])
        elif n in _MISSET:
            out[n] = float(c.misset[_MISSET[n]])
        elif n in ("Na", "Nb", "Nc"):
            out[n] = float(getattr(c, n))
        elif n == "wavelength":
            out[n] = b.wavelength
        elif n == "fluence":
            out[n] = b.fluence
        elif n == "polar":
            out[n] = float(b.polarization)
        elif n == "water":
            out[n] = float(s.water)
        elif n == "distance":
            out[n] = float(d.close_distance if d.close_distance is not None else d.distance)
        elif n in ("beam_x", "beam_y"):
            i = 0 if n == "beam_x" else 1
            if d.convention in ("xds", "dials"):
                out[n] = float(_near_point_mm(d)[i])
            else:
                v = d.beam_x if i == 0 else d.beam_y
                out[n] = float(v if v is not None else _default_beam_mm(d)[i])
        elif n in _DET_ANGLE:
            out[n] = float(getattr(d, _DET_ANGLE[n]))
        elif n == "mosaic_spread":
            out[n] = float(c.mosaic_spread or 0.0)
        elif n == "phi0":
            out[n] = float(c.phi0)
        elif n == "osc":
            from .models.crystal import resolve_phi
            _, osc, _, _ = resolve_phi(deg2rad(c.phi0), -1.0 if c.osc is None else deg2rad(c.osc),
                                       -1.0 if c.phistep is None else deg2rad(c.phistep),
                                       -1 if c.phisteps is None else c.phisteps)
            out[n] = float(c.osc) if c.osc is not None else osc * RTD
        elif n == "Fhkl":
            if st.Fhkl is None:
                raise ParameterError("parameter 'Fhkl': the experiment has no structure-factor grid (no -hkl)")
            out[n] = np.array(st.Fhkl)
    return out


def set_params(exp, values):
    """A new Experiment with the named parameters set (user units)."""
    names = check_names(list(values))
    c, b, d, s, st = exp.crystal, exp.beam, exp.detector, exp.sampling, exp.structure
    ck, bk, dk, sk, tk = {}, {}, {}, {}, {}
    cell = list(c.cell)
    misset = list(c.misset)
    for n in names:
        v = values[n]
        if n != "Fhkl":
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ParameterError(f"parameter {n!r}: value {v!r} is not a number") from None
        if n in _CELL:
            cell[_CELL[n]] = v
            ck["cell"] = tuple(cell)
        elif n in _MISSET:
            misset[_MISSET[n]] = v
            ck["misset"] = tuple(misset)
        elif n in ("Na", "Nb", "Nc", "mosaic_spread", "phi0", "osc"):
            ck[n] = v
        elif n in ("wavelength", "fluence"):
            bk[n] = v
        elif n == "polar":
            bk["polarization"] = v
        elif n == "water":
            sk["water"] = v
        elif n == "distance":
            dk["close_distance" if d.close_distance is not None else "distance"] = v
        elif n in ("beam_x", "beam_y"):
            if d.convention in ("xds", "dials"):
                dk["orgx" if n == "beam_x" else "orgy"] = v / d.pixel_size + 0.5
            else:
                dk[n] = v
        elif n in _DET_ANGLE:
            dk[_DET_ANGLE[n]] = v
        elif n == "Fhkl":
            if st.Fhkl is None:
                raise ParameterError("parameter 'Fhkl': the experiment has no structure-factor grid (no -hkl)")
            grid = np.asarray(v, dtype=float)
            if grid.shape != st.Fhkl.shape:
                raise ParameterError(f"parameter 'Fhkl': shape {grid.shape}, expected {st.Fhkl.shape}")
            tk["Fhkl"] = grid
    return exp.replace(
        crystal=c.replace(**ck) if ck else c,
        beam=b.replace(**bk) if bk else b,
        detector=d.replace(**dk) if dk else d,
        sampling=s.replace(**sk) if sk else s,
        structure=st.replace(**tk) if tk else st,
    )


# ----------------------------------------------------------------------------- tangents

def _skew(v):
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def _orientation_parts(model):
    """Per orientation: (phi rotation R_p, domain rotation U_i, index p, index i)."""
    c = model.crystal
    phis = c.phis
    out = []
    for p, phi in enumerate(phis):
        Rp = axis_rotation_matrix(c.spindle, phi) if phi != 0.0 else np.eye(3)
        for i in range(c.mosaic_domains):
            out.append((Rp, c.mosaic_umats[i], p, i))
    return out


def _crystal_tangent(model, d_real_A, tan):
    """Fill orientation and reciprocal tangents from d(real vectors in Angstrom)."""
    c = model.crystal
    d_real0 = 1e-10 * d_real_A
    orients = np.zeros_like(c.orientations)
    for m, (Rp, U, p, i) in enumerate(_orientation_parts(model)):
        M = U @ Rp
        orients[m] = d_real0 @ M.T
    tan["orients"] = orients
    if c.shape in ("gauss", "tophat"):
        rec = c.recip0
        tan["recip"] = -rec @ d_real_A.T @ rec


def input_tangent(model, name):
    """du/dtheta for every kernel input u and the named scalar parameter theta: a flat
    vector in ``model.layout`` (see :mod:`nbragg.kernels.scene`)."""
    exp = model.experiment
    tan = {}
    c = model.crystal
    if name in _CELL or name in _MISSET:
        R = c.base_rotation
        B, dB = cell_vectors_and_derivatives(exp.crystal.cell)
        if name in _CELL:
            d_real_A = dB[_CELL[name]] @ R.T
        else:
            mis = [deg2rad(x) for x in exp.crystal.misset]
            U0 = np.eye(3) if exp.crystal.orientation is None else np.asarray(exp.crystal.orientation)
            j = _MISSET[name]
            Rx = rotation_xyz_matrix(mis[0], 0, 0)
            Ry = rotation_xyz_matrix(0, mis[1], 0)
            Rz = rotation_xyz_matrix(0, 0, mis[2])
            E = np.eye(3)
            gens = [_skew(E[0]), _skew(E[1]), _skew(E[2])]
            if j == 0:
                dR = Rz @ Ry @ gens[0] @ Rx
            elif j == 1:
                dR = Rz @ gens[1] @ Ry @ Rx
            else:
                dR = gens[2] @ Rz @ Ry @ Rx
            d_real_A = B @ (dR @ U0).T * DTR
        _crystal_tangent(model, d_real_A, tan)
    elif name in ("phi0", "osc", "mosaic_spread"):
        real0 = c.real0
        K_sp = _skew(unitize(c.spindle)[0])
        nphi = c.phisteps
        orients = np.zeros_like(c.orientations)
        for m, (Rp, U, p, i) in enumerate(_orientation_parts(model)):
            if name == "mosaic_spread":
                dU = c.mosaic_shrinks[i] * _skew(c.mosaic_axes[i]) @ U * DTR
                dM = dU @ Rp
            else:
                if name == "phi0":
                    dphi = DTR
                else:   # phi_p = phi0 + p * osc / phisteps, unless a phi step was given
                    dphi = (p / nphi) * DTR if exp.crystal.phistep is None else 0.0
                dM = U @ (K_sp @ Rp) * dphi
            orients[m] = real0 @ dM.T
        tan["orients"] = orients
    elif name in ("Na", "Nb", "Nc"):
        tan[name] = 1.0 if getattr(exp.crystal, name) >= 1.0 else 0.0
    elif name == "wavelength":
        lam0 = model.wavelength
        src = exp.beam.sources
        if src is None:
            tan["lambdas"] = model.sources.wavelengths / lam0 * 1e-10
        else:
            tan["lambdas"] = np.where(np.isnan(np.asarray(src)[:, 4]), 1e-10, 0.0)
    elif name == "fluence":
        tan["scale"] = model.scale / model.fluence
        tan["I_bg"] = model.I_bg / model.fluence
    elif name == "polar":
        tan["kahn"] = 1.0
    elif name == "water":
        w = exp.sampling.water
        tan["I_bg"] = 3.0 * model.I_bg / w if w != 0.0 else 0.0
    elif name in ("distance", "beam_x", "beam_y") or name in _DET_ANGLE:
        _detector_tangent(model, name, tan)
    else:
        raise ParameterError(f"no tangent for parameter {name!r}")
    return flatten(model.layout, tan)


# ----------------------------------------------------------------------------- detector

def _rot_axis_apply(v, axis, phi):
    s, c = math.sin(phi), math.cos(phi)
    a = np.asarray(axis, dtype=float)
    return a * (a @ v) * (1.0 - c) + v * c + np.cross(a, v) * s


def _rot_axis_dphi(v, axis, phi):
    s, c = math.sin(phi), math.cos(phi)
    a = np.asarray(axis, dtype=float)
    return a * (a @ v) * s - v * s + np.cross(a, v) * c


def _detector_tangent(model, name, tan):
    """Forward-mode derivative of nanoBragg's detector placement (see models.detector)."""
    exp = model.experiment
    det = exp.detector
    g = model.detector
    conv = det.convention
    beam_v, f0, s0, o0, tt_axis, _, _ = (np.array(v, dtype=float) for v in _CONVENTION_VECTORS[conv])
    if conv == "custom":
        for fld, which in (("fdet_vector", "f"), ("sdet_vector", "s"), ("odet_vector", "o"),
                           ("beam_vector", "b"), ("twotheta_axis", "t")):
            v = getattr(det, fld)
            if v is None:
                continue
            if which == "f":
                f0 = np.array(v, dtype=float)
            elif which == "s":
                s0 = np.array(v, dtype=float)
            elif which == "o":
                o0 = np.array(v, dtype=float)
            elif which == "b":
                beam_v = np.array(v, dtype=float)
            else:
                tt_axis = np.array(v, dtype=float)
    beam_v = unitize(beam_v)[0]
    f0 = unitize(f0)[0]
    s0 = unitize(s0)[0]
    o0 = unitize(o0)[0]
    if g.odet_autogenerated:
        o0 = unitize(np.cross(f0, s0))[0]
    rx, ry, rz = deg2rad(det.rotx), deg2rad(det.roty), deg2rad(det.rotz)
    tt = deg2rad(det.twotheta)
    Rx, Ry, Rz = rotation_xyz_matrix(rx, 0, 0), rotation_xyz_matrix(0, ry, 0), rotation_xyz_matrix(0, 0, rz)
    Rxyz = Rz @ Ry @ Rx
    E = np.eye(3)
    # tangents of the continuous inputs
    d_rx = d_ry = d_rz = d_tt = 0.0
    d_dist_in = d_close_in = 0.0
    d_Fb = d_Sb = d_Fc = d_Sc = 0.0
    if name in _DET_ANGLE:
        which = _DET_ANGLE[name]
        if which == "rotx":
            d_rx = DTR
        elif which == "roty":
            d_ry = DTR
        elif which == "rotz":
            d_rz = DTR
        else:
            d_tt = DTR
    elif name == "distance":
        if det.close_distance is not None:
            d_close_in = 1e-3
        else:
            d_dist_in = 1e-3
    else:
        i = 0 if name == "beam_x" else 1
        if conv in ("mosflm", "denzo"):
            if i == 0:
                d_Sb = 1e-3
            else:
                d_Fb = 1e-3
        elif conv == "adxv":
            if i == 0:
                d_Fb = 1e-3
            else:
                d_Sb = -1e-3
        elif conv == "custom":
            if i == 0:
                d_Fb = d_Fc = 1e-3
            else:
                d_Sb = d_Sc = 1e-3
        else:  # xds, dials: near point
            if i == 0:
                d_Fc = 1e-3
            else:
                d_Sc = 1e-3
    dRxyz = (_skew(E[2]) @ Rz @ Ry @ Rx * d_rz + Rz @ _skew(E[1]) @ Ry @ Rx * d_ry
             + Rz @ Ry @ _skew(E[0]) @ Rx * d_rx)

    def T(v):
        return _rot_axis_apply(v, tt_axis, tt)

    def dT(v, dv):
        return _rot_axis_apply(dv, tt_axis, tt) + _rot_axis_dphi(v, tt_axis, tt) * d_tt

    ratio = float(beam_v @ (Rxyz @ o0))
    d_ratio = float(beam_v @ (dRxyz @ o0))
    if ratio == 0.0:
        ratio, d_ratio = DBL_MIN, 0.0
    if det.close_distance is not None:
        close_in = det.close_distance / 1000.0
    else:
        dist_in = det.distance / 1000.0
        sgn = 1.0 if ratio * dist_in >= 0 else -1.0
        close_in = abs(ratio * dist_in)
        d_close_in = sgn * (d_ratio * dist_in + ratio * d_dist_in)
    dist1 = close_in / ratio
    d_dist1 = d_close_in / ratio - close_in * d_ratio / ratio ** 2

    f = T(Rxyz @ f0)
    s = T(Rxyz @ s0)
    o = T(Rxyz @ o0)
    df = dT(Rxyz @ f0, dRxyz @ f0)
    ds = dT(Rxyz @ s0, dRxyz @ s0)
    do = dT(Rxyz @ o0, dRxyz @ o0)
    if g.pivot == "sample":
        Fc0, Sc0 = _initial_near_point(model)
        v = -Fc0 * f0 - Sc0 * s0 + close_in * o0
        dv = -d_Fc * f0 - d_Sc * s0 + d_close_in * o0
        pix0 = T(Rxyz @ v)
        dpix0 = dT(Rxyz @ v, dRxyz @ v + Rxyz @ dv)
    else:
        Fb0, Sb0 = _initial_beam_spot(model)
        pix0 = -Fb0 * f - Sb0 * s + dist1 * beam_v
        dpix0 = -d_Fb * f - Fb0 * df - d_Sb * s - Sb0 * ds + d_dist1 * beam_v
    close = float(pix0 @ o)
    d_close = float(dpix0 @ o + pix0 @ do)
    d_distance = d_close / ratio - close * d_ratio / ratio ** 2
    tan.update(pix0=dpix0, fdet=df, sdet=ds, odet=do, close_distance=d_close, distance=d_distance)


def _initial_beam_spot(model):
    """Fbeam, Sbeam before the rotations (metres), as models.detector computes them."""
    det = model.experiment.detector
    px = det.pixel_size / 1000.0
    dss = det.detsize_s / 1000.0 if det.detsize_s is not None else px * det.spixels
    X = model.detector.Xbeam
    Y = model.detector.Ybeam
    conv = det.convention
    if conv == "adxv":
        return X, dss - Y
    if conv == "mosflm":
        return Y + 0.5 * px, X + 0.5 * px
    if conv == "denzo":
        return Y + 0.0 * px, X + 0.0 * px
    return X, Y


def _initial_near_point(model):
    det = model.experiment.detector
    if det.convention == "custom":
        return model.detector.Xbeam, model.detector.Ybeam
    fx, fy = _near_point_mm(det)
    px = det.pixel_size / 1000.0
    Fc = (det.orgx - 0.5) * px if det.orgx is not None else fx / 1000.0
    Sc = (det.orgy - 0.5) * px if det.orgy is not None else fy / 1000.0
    return Fc, Sc
