"""Crystal: unit cell -> real/reciprocal vectors, missetting, phi steps, mosaic domains."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from ..rng import NRGenerator, mosaic_rotation_umat
from ..units import ANGSTROM, RTD, deg2rad
from .geometry import cos, cross, dot, re, rotate_axis, rotation_xyz_matrix, scalar, sin, sqrt


def _reciprocal_standard(cell, c_star_z_exact=True):
    """Reciprocal vectors (rows, 1/A) with a* along x and b* in the x-y plane."""
    a, b, c = cell[:3]
    alpha, beta, gamma = (deg2rad(x) for x in cell[3:])
    ca, cb, cg = math.cos(alpha), math.cos(beta), math.cos(gamma)
    sa, sb, sg = math.sin(alpha), math.sin(beta), math.sin(gamma)
    aavg = (alpha + beta + gamma) / 2
    skew = abs(math.sin(aavg) * math.sin(aavg - alpha) * math.sin(aavg - beta) * math.sin(aavg - gamma))
    V = 2.0 * a * b * c * math.sqrt(skew)
    Vs = 1.0 / V
    ast, bst, cst = b * c * sa * Vs, c * a * sb * Vs, a * b * sg * Vs
    cas = (cb * cg - ca) / (sb * sg)
    cbs = (cg * ca - cb) / (sg * sa)
    cgs = (ca * cb - cg) / (sa * sb)
    sgs = c * Vs / ast / bst
    # the real c axis is along z, so c*_z = 1/c; nanoBragg.c uses c* V / (a b c sin(gamma*)),
    # which equals 1/c only when the cell is orthogonal
    czs = 1.0 / c if c_star_z_exact else cst * V / (a * b * c * sgs)
    return np.array([[ast, 0.0, 0.0],
                     [bst * cgs, bst * sgs, 0.0],
                     [cst * cbs, cst * (cas - cbs * cgs) / sgs, czs]])


def cell_vectors(cell):
    """Real-space cell vectors (rows a, b, c; Angstrom) of ``cell`` in nanoBragg's frame.

    The frame puts a* along x and b* in the x-y plane, as nanoBragg.c does for
    ``-cell``; so c lies along z and b in the y-z plane:

        a = (a S / sin(alpha), a (cos(gamma) - cos(alpha) cos(beta)) / sin(alpha), a cos(beta))
        b = (0, b sin(alpha), b cos(alpha))
        c = (0, 0, c)

    with S = sqrt(1 - cos^2 alpha - cos^2 beta - cos^2 gamma + 2 cos alpha cos beta cos gamma).
    """
    a, b, c = (scalar(x) for x in cell[:3])
    al, be, ga = (deg2rad(x) for x in cell[3:])
    ca, cb, cg = cos(al), cos(be), cos(ga)
    sa = sin(al)
    S = sqrt(1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg)
    return np.array([[a * S / sa, a * (cg - ca * cb) / sa, a * cb],
                     [0.0, b * sa, b * ca],
                     [0.0, 0.0, c]])


def reciprocal_from_real(real):
    """Rows a*, b*, c* from rows a, b, c (same length unit, inverted)."""
    a, b, c = real
    V = dot(a, cross(b, c))
    return np.array([cross(b, c), cross(c, a), cross(a, b)]) / V


def cell_from_vectors(real):
    """(a, b, c, alpha, beta, gamma) of real-space row vectors (Angstrom, degrees)."""
    a, b, c = real
    la, lb, lc = (math.sqrt(dot(v, v)) for v in (a, b, c))
    def ang(u, v, lu, lv):
        return math.degrees(math.acos(max(-1.0, min(1.0, dot(u, v) / (lu * lv)))))
    return (la, lb, lc, ang(b, c, lb, lc), ang(a, c, la, lc), ang(a, b, la, lb))


# more steps than any simulation can use (a step in the wrong unit lands above it)
MAX_STEPS = 100000


def resolve_phi(phi0, osc, phistep, phisteps):
    """nanoBragg's phi rules (radians; -1 = unset).  Returns (phi0, osc, phistep, phisteps)."""
    if phisteps < 0:
        if re(osc) < 0.0:
            if re(phistep) <= 0.0:
                phisteps, osc, phistep = 1, 0.0, 0.0
            else:
                osc, phisteps = phistep, 2
        else:
            if re(phistep) <= 0.0:
                phisteps = 2
                phistep = osc / 2.0
            else:
                phisteps = math.ceil(re(osc / phistep))
    else:
        if phisteps == 0:
            phisteps = 1
        if re(osc) < 0.0:
            if re(phistep) <= 0.0:
                osc = 1.0 / RTD
                phistep = osc / phisteps
            else:
                osc, phisteps = phistep, 2
        else:
            if re(phistep) < 0.0:
                phistep = osc / phisteps
    return phi0, osc, phistep, phisteps


def resolve_mosaic(spread, domains, warn=None):
    """nanoBragg's mosaic rules (spread in radians, -1 = unset).  Returns (spread, domains)."""
    if domains <= 0:
        if re(spread) < 0.0:
            return 0.0, 1
        if re(spread) == 0.0:
            return spread, 1
        if warn is not None:
            warn("finite mosaicity with only one domain! upping to 10 mosaic domains")
        return spread, 10
    if re(spread) < 0.0:
        if warn is not None:
            warn("no mosaic spread specified.  setting mosaic_domains = 1")
        return 0.0, 1
    if re(spread) == 0.0:
        if warn is not None:
            warn("zero mosaic spread specified.  setting mosaic_domains = 1")
        return spread, 1
    return spread, domains


@dataclass
class CrystalModel:
    """Resolved crystal: vectors in metres / inverse Angstrom and the orientation list."""

    real0: np.ndarray           # rows a, b, c at phi = 0, no mosaic (m)
    recip0: np.ndarray          # rows a*, b*, c* (1/Angstrom), for the spot-shape metric
    base_rotation: np.ndarray   # misset @ orientation: real0 = (base_rotation @ B.T).T
    B_real: np.ndarray          # cell vectors in the standard frame (Angstrom)
    orientations: np.ndarray    # (phisteps * domains, 3, 3) rows a, b, c (m)
    phis: np.ndarray            # radians
    phi0: float
    osc: float
    phistep: float
    phisteps: int
    mosaic_spread: float        # radians
    mosaic_domains: int
    mosaic_umats: np.ndarray    # (domains, 3, 3)
    mosaic_axes: np.ndarray     # (domains, 3)
    mosaic_angles: np.ndarray   # (domains,) radians; domain 0 is the identity
    mosaic_shrinks: np.ndarray  # angle = spread * shrink (seed-fixed)
    spindle: np.ndarray
    Na: float
    Nb: float
    Nc: float
    shape: str
    fudge: float
    cell: tuple                 # as reported (Angstrom, degrees)
    volume: float               # Angstrom^3


def rotation_vector_matrix(r):
    """The rotation by the vector r (angle |r| about r / |r|), Rodrigues' formula, written
    for the complex step too (a series where the angle is small)."""
    r = [scalar(x) for x in r]
    t2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2]
    if abs(t2) < 1e-6:
        A = 1.0 - t2 / 6.0 + t2 * t2 / 120.0 - t2 * t2 * t2 / 5040.0
        B = 0.5 - t2 / 24.0 + t2 * t2 / 720.0 - t2 * t2 * t2 / 40320.0
    else:
        t = sqrt(t2)
        A = sin(t) / t
        B = (1.0 - cos(t)) / t2
    K = np.array([[0.0, -r[2], r[1]], [r[2], 0.0, -r[0]], [-r[1], r[0], 0.0]], dtype=np.result_type(*r, float))
    return np.eye(3) + A * K + B * (K @ K)


def anisotropic_draws(domains, seed):
    """(domains, 3) draws for the anisotropic mosaic: N(0, 1) draws whitened so that their
    second moments over the domains are exactly the identity (each component's rms 1, no
    correlation), in pairs z, -z (and one 0 when the count is odd), so that the domains'
    mean rotation is none.  At least 6 domains (3 independent pairs)."""
    half = domains // 2
    z = np.random.default_rng(seed).standard_normal((half, 3))
    L = np.linalg.cholesky(z.T @ z)
    z = np.linalg.solve(L, z.T).T * math.sqrt(domains / 2.0)
    return np.concatenate([z, -z] + ([np.zeros((1, 3))] if domains % 2 else []))


def anisotropic_umats(real0, eta_rad, domains, seed):
    """Each domain's rotation for ``Crystal.mosaic_eta`` (radians), in the laboratory frame
    of the unrotated crystal ``real0`` (rows a, b, c)."""
    axes = [real0[k] / sqrt(dot(real0[k], real0[k])) for k in range(3)]
    z = anisotropic_draws(domains, seed)
    out = []
    for i in range(domains):
        r = sum(eta_rad[k] * z[i, k] * axes[k] for k in range(3))
        out.append(rotation_vector_matrix(r))
    return np.array(out)


def resolve_crystal(crystal, spindle, warn=None):
    B = cell_vectors(crystal.cell)
    U0 = np.eye(3) if crystal.orientation is None else np.asarray(crystal.orientation, dtype=float)
    mis = [deg2rad(x) for x in crystal.misset]
    R = rotation_xyz_matrix(*mis) @ U0
    real_A = (R @ B.T).T
    recip = reciprocal_from_real(real_A)
    real0 = real_A * ANGSTROM

    phi0, osc, phistep, phisteps = resolve_phi(
        deg2rad(crystal.phi0),
        -1.0 if crystal.osc is None else deg2rad(crystal.osc),
        -1.0 if crystal.phistep is None else deg2rad(crystal.phistep),
        -1 if crystal.phisteps is None else crystal.phisteps,
    )
    if phisteps > MAX_STEPS:
        raise ParameterError(
            f"{phisteps:.3g} phi steps: an oscillation of {re(osc) * RTD:g} degrees (-osc, Crystal.osc) in steps "
            f"of {re(phistep) * RTD:g} degrees (-phistep, Crystal.phistep) is more than {MAX_STEPS} steps")
    if phisteps <= 0:
        # nanoBragg.c makes ceil(osc / phistep) = 0 steps here and divides by 0
        raise ParameterError(
            f"no phi step: an oscillation of {osc * RTD:g} degrees (-osc, Crystal.osc) in steps of "
            f"{phistep * RTD:g} degrees (-phistep, Crystal.phistep) gives {phisteps} phi steps, so there is "
            f"nothing to simulate; give an oscillation larger than 0, a number of steps "
            f"(-phisteps, Crystal.phisteps), or no phi step")
    anisotropic = crystal.mosaic_eta is not None
    if anisotropic:
        # domains rotated about the crystal's axes, before the spindle rotation
        spread, domains = 0.0, crystal.mosaic_domains or 10
        umats = anisotropic_umats(real0, [deg2rad(x) for x in crystal.mosaic_eta], domains, crystal.mosaic_seed)
        axes = np.zeros((domains, 3))
        angles = np.zeros(domains)
        shrinks = np.zeros(domains)
    else:
        spread, domains = resolve_mosaic(
            -1.0 if crystal.mosaic_spread is None else deg2rad(crystal.mosaic_spread),
            -1 if crystal.mosaic_domains is None else crystal.mosaic_domains, warn=warn)
        gen = NRGenerator()
        idum = gen.seed_cell(-crystal.mosaic_seed)
        umats = np.empty((domains, 3, 3), dtype=np.result_type(spread, float))
        axes = np.zeros((domains, 3))
        angles = np.zeros(domains, dtype=umats.dtype)
        shrinks = np.zeros(domains)
        for i in range(domains):
            u, axis, rot, shrink = mosaic_rotation_umat(spread, idum, gen)
            if i == 0:   # nanoBragg forces the first domain to be unrotated
                u, rot, shrink = np.eye(3), 0.0, 0.0
            umats[i], axes[i], angles[i], shrinks[i] = u, axis, rot, shrink

    phis = np.array([phi0 + phistep * t for t in range(phisteps)])
    orient = np.empty((phisteps * domains, 3, 3), dtype=np.result_type(real0, umats, phis))
    # the anisotropic domains turn with the crystal (rotated, then turned by phi);
    # nanoBragg's stay put in the laboratory (turned by phi, then rotated)
    domain_vectors = [real0 @ umats[m].T for m in range(domains)] if anisotropic else None
    for p, phi in enumerate(phis):
        if anisotropic:
            for m, v in enumerate(domain_vectors):
                orient[p * domains + m] = np.array([rotate_axis(x, spindle, phi) for x in v]) if phi != 0.0 else v
            continue
        if phi != 0.0:
            rotated = np.array([rotate_axis(v, spindle, phi) for v in real0])
        else:
            rotated = real0.copy()
        for m in range(domains):
            orient[p * domains + m] = rotated @ umats[m].T
    Na, Nb, Nc = (n if re(n) >= 1.0 else 1.0 for n in (crystal.Na, crystal.Nb, crystal.Nc))
    return CrystalModel(
        real0=real0, recip0=recip, base_rotation=R, B_real=B, orientations=orient, phis=phis,
        phi0=phi0, osc=osc, phistep=phistep, phisteps=phisteps, mosaic_spread=spread,
        mosaic_domains=domains, mosaic_umats=umats, mosaic_axes=axes, mosaic_angles=angles,
        mosaic_shrinks=shrinks,
        spindle=np.asarray(spindle, dtype=float), Na=Na, Nb=Nb, Nc=Nc, shape=crystal.shape,
        fudge=float(crystal.fudge), cell=cell_from_vectors(np.real(real_A)),
        volume=abs(dot(np.real(real_A[0]), cross(np.real(real_A[1]), np.real(real_A[2])))),
    )
