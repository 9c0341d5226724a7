"""Derivatives of the per-sample pieces the kernels combine (CPU, Numba).

Each function returns local partial derivatives (or applies them to an upstream
gradient, for the vector-Jacobian products); the adjoint and tangent kernels are built
from these, so every derivative is written once.  See :mod:`nbragg.kernels.physics`
for the values.
"""

import math
from typing import NamedTuple

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .physics import (DOMAIN, GAUSS, GAUSS_WIDTH, ROUND, ROUND_SCALE, SQUARE, TOPHAT_RADIUS_SQR, amorphous_grad_lanes,
                      amorphous_stol, aniso_exponent, axes_hkl, capture_fraction, domain_cells, domain_offset,
                      flat_grid_index, grid_cells, grid_extent, lagrange4, lagrange4_grad, node_offset,
                      orientation_axes, pixel_solid_angle, polarization_frame, polarization_parts, sinc3_grad,
                      sincg_grad, soa_hkl, square_lattice_grad, square_lattice_grad_far, weighted)

# lattice partials buffer: dL/dh dL/dk dL/dl | dL/dNa dNb dNc | dL/dfudge | dL/drecip (9) |
# dL/dN_ab dN_ac dN_bc (the Gaussian domain's off-diagonal terms)
LP_NAB, LP_NAC, LP_NBC = 16, 17, 18
LP_SIZE = 19


@njit(cache=True, error_model="numpy", inline="always")
def bragg_weight_partials(S, s, qx, qy, qz):
    """(w, dw/dw_s, dw/dB, c) for a Bragg term's weight w = w_s exp(-B |q|^2 / 2)
    (physics.bragg_weight, its value bit for bit), with dw/dq = c q; once per block."""
    return weight_partials(S.beam.weights[s], S.fhkl.B, qx, qy, qz)


@njit(cache=True, error_model="numpy", inline="always")
def weight_partials(ws, B, qx, qy, qz):
    """:func:`bragg_weight_partials` from the source's weight ws and the B factor."""
    dw = weighted(1.0, B, qx, qy, qz)     # the Debye-Waller factor (exactly: 1.0 * it)
    w = ws * dw                            # = weighted(ws, ...), bit for bit, one exp
    return w, dw, -0.5 * (qx * qx + qy * qy + qz * qz) * w, -B * w


@njit(cache=True, error_model="numpy", inline="always")
def bragg_weight_tangent(partials, d, L, p, s, qx, qy, qz, dq):
    """d(bragg_weight)/d(theta_p) along tangent direction p, from the block's
    :func:`bragg_weight_partials` (``dq``: the q tangents)."""
    _, dws, dwB, c = partials
    v = dws * d[p, L.weights + s] + dwB * d[p, L.B]
    if c != 0.0:
        v += c * (qx * dq[p, 0] + qy * dq[p, 1] + qz * dq[p, 2])
    return v


@njit(cache=True, error_model="numpy", inline="always")
def bragg_weight_vjp(S, s, qx, qy, qz, gw, g, L):
    """Pushes gw = dL/d(bragg_weight) to the source's weight and to B; returns its part of
    dL/dq."""
    _, dws, dwB, c = bragg_weight_partials(S, s, qx, qy, qz)
    g[L.weights + s] += gw * dws
    g[L.B] += gw * dwB
    return gw * c * qx, gw * c * qy, gw * c * qz


@njit(cache=True, error_model="numpy")
def lattice_grad(h, k, l, h0, k0, l0, xt, out):
    """F_latt and its partials (written to ``out``, see LP_SIZE); ``xt`` is the scene's
    Crystal block."""
    shape = xt.shape
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    fudge = xt.fudge
    recip = xt.recip
    for j in range(LP_SIZE):
        out[j] = 0.0
    dh = h - h0
    dk = k - k0
    dl = l - l0
    if shape == SQUARE:
        ga = gb = gc = 1.0
        dga = dgb = dgc = 0.0
        nga = ngb = ngc = 0.0
        if Na > 1.0:
            ga, dga, nga = sincg_grad(dh, Na)
        if Nb > 1.0:
            gb, dgb, ngb = sincg_grad(dk, Nb)
        if Nc > 1.0:
            gc, dgc, ngc = sincg_grad(dl, Nc)
        out[0] = dga * gb * gc
        out[1] = ga * dgb * gc
        out[2] = ga * gb * dgc
        out[3] = nga * gb * gc
        out[4] = ga * ngb * gc
        out[5] = ga * gb * ngc
        return ga * gb * gc
    P = Na * Nb * Nc
    if shape == ROUND:
        hrad = dh * dh * Na * Na + dk * dk * Nb * Nb + dl * dl * Nc * Nc
        u = math.pi * math.sqrt(hrad * fudge)
        f, fpx = sinc3_grad(u)
        L = P * ROUND_SCALE * f
        # dL/dhrad = P s f'(u) du/dhrad = P s (f'(u)/u) pi^2 fudge / 2
        dL_dhrad = P * ROUND_SCALE * fpx * math.pi * math.pi * fudge / 2.0
        out[0] = dL_dhrad * 2.0 * dh * Na * Na
        out[1] = dL_dhrad * 2.0 * dk * Nb * Nb
        out[2] = dL_dhrad * 2.0 * dl * Nc * Nc
        out[3] = L / Na + dL_dhrad * 2.0 * dh * dh * Na
        out[4] = L / Nb + dL_dhrad * 2.0 * dk * dk * Nb
        out[5] = L / Nc + dL_dhrad * 2.0 * dl * dl * Nc
        out[6] = P * ROUND_SCALE * fpx * math.pi * math.pi * hrad / 2.0
        return L
    if shape == DOMAIN:
        ab = xt.N_ab
        ac = xt.N_ac
        bc = xt.N_bc
        x, y, z = domain_offset(dh, dk, dl, xt)
        rad = x * x + y * y + z * z
        E = math.exp(-(rad / GAUSS_WIDTH * fudge))
        L = domain_cells(xt) * E
        c = -2.0 * L * fudge / GAUSS_WIDTH      # 2 dL/drad
        out[0] = c * (Na * x + ab * y + ac * z)
        out[1] = c * (ab * x + Nb * y + bc * z)
        out[2] = c * (ac * x + bc * y + Nc * z)
        out[3] = E * (Nb * Nc - bc * bc) + c * x * dh
        out[4] = E * (Na * Nc - ac * ac) + c * y * dk
        out[5] = E * (Na * Nb - ab * ab) + c * z * dl
        out[6] = -L * rad / GAUSS_WIDTH
        out[LP_NAB] = 2.0 * E * (bc * ac - Nc * ab) + c * (x * dk + y * dh)
        out[LP_NAC] = 2.0 * E * (ab * bc - Nb * ac) + c * (x * dl + z * dh)
        out[LP_NBC] = 2.0 * E * (ab * ac - Na * bc) + c * (y * dl + z * dk)
        return L
    dx = dh * recip[0, 0] + dk * recip[1, 0] + dl * recip[2, 0]
    dy = dh * recip[0, 1] + dk * recip[1, 1] + dl * recip[2, 1]
    dz = dh * recip[0, 2] + dk * recip[1, 2] + dl * recip[2, 2]
    P2 = P * P
    rad = (dx * dx + dy * dy + dz * dz) * P2
    if shape == GAUSS:
        L = P * math.exp(-(rad / GAUSS_WIDTH * fudge))
        dL_drad = -L * fudge / GAUSS_WIDTH
        for a in range(3):
            da = dh if a == 0 else (dk if a == 1 else dl)
            dot = dx * recip[a, 0] + dy * recip[a, 1] + dz * recip[a, 2]
            out[a] = dL_drad * 2.0 * dot * P2
            out[7 + 3 * a] = dL_drad * 2.0 * da * dx * P2
            out[8 + 3 * a] = dL_drad * 2.0 * da * dy * P2
            out[9 + 3 * a] = dL_drad * 2.0 * da * dz * P2
        out[3] = L / Na + dL_drad * 2.0 * rad / Na
        out[4] = L / Nb + dL_drad * 2.0 * rad / Nb
        out[5] = L / Nc + dL_drad * 2.0 * rad / Nc
        out[6] = -L * rad / GAUSS_WIDTH
        return L
    # top hat: the edge is a jump; only the height depends smoothly on N
    if rad * fudge < TOPHAT_RADIUS_SQR:
        out[3] = Nb * Nc
        out[4] = Na * Nc
        out[5] = Na * Nb
        return P
    return 0.0


@njit(cache=True, error_model="numpy")
def F_grad(h, k, l, h0, k0, l0, fs, fidx, fw):
    """Structure factor, its derivatives in h, k, l, and the grid entries it used.

    Returns (F, dF/dh, dF/dk, dF/dl, n, dF/d(default_F), -F); the first n entries of
    ``fidx``/``fw`` are the flat grid indices and their weights dF/dgrid.  With
    anisotropic displacements F carries exp(-h^T beta h), and dF/dbeta_j is the last
    value times the monomial of beta_j (see :func:`aniso_monomials`; 0 without them).
    """
    F, Fh, Fk, Fl, n, Fdef = _grid_F_grad(h, k, l, h0, k0, l0, fs, fidx, fw)
    if not fs.aniso:
        return F, Fh, Fk, Fl, n, Fdef, 0.0
    b = fs.beta
    D = math.exp(-aniso_exponent(h, k, l, b))
    for j in range(n):
        fw[j] *= D
    FD = F * D
    eh = 2.0 * (b[0] * h + b[3] * k + b[4] * l)
    ek = 2.0 * (b[3] * h + b[1] * k + b[5] * l)
    el = 2.0 * (b[4] * h + b[5] * k + b[2] * l)
    return FD, Fh * D - FD * eh, Fk * D - FD * ek, Fl * D - FD * el, n, Fdef * D, -FD


@njit(cache=True, error_model="numpy", inline="always")
def aniso_monomials(h, k, l, j):
    """d(h^T beta h)/d(beta_j) for beta = (b11, b22, b33, b12, b13, b23)."""
    if j == 0:
        return h * h
    if j == 1:
        return k * k
    if j == 2:
        return l * l
    if j == 3:
        return 2.0 * h * k
    if j == 4:
        return 2.0 * h * l
    return 2.0 * k * l


@njit(cache=True, error_model="numpy", inline="always")
def _grid_F_grad(h, k, l, h0, k0, l0, fs, fidx, fw):
    fgrid = fs.grid
    hmin = fs.hkl_min[0]
    kmin = fs.hkl_min[1]
    lmin = fs.hkl_min[2]
    hmax = fs.hkl_max[0]
    kmax = fs.hkl_max[1]
    lmax = fs.hkl_max[2]
    nk = kmax - kmin + 1
    nl = lmax - lmin + 1
    if fs.interpolate:
        hr = hmax - hmin + 1
        kr = nk
        lr = nl
        if not ((h - hmin + 3) > hr or (h - 2) < hmin or (k - kmin + 3) > kr or (k - 2) < kmin
                or (l - lmin + 3) > lr or (l - 2) < lmin):
            hf = math.floor(h)
            kf = math.floor(k)
            lf = math.floor(l)
            wh = lagrange4(h - hf)
            wk = lagrange4(k - kf)
            wl = lagrange4(l - lf)
            dwh = lagrange4_grad(h - hf)
            dwk = lagrange4_grad(k - kf)
            dwl = lagrange4_grad(l - lf)
            ih = int(hf) - 1 - hmin
            ik = int(kf) - 1 - kmin
            il = int(lf) - 1 - lmin
            F = 0.0
            Fh = 0.0
            Fk = 0.0
            Fl = 0.0
            n = 0
            for i in range(4):
                for j in range(4):
                    for m in range(4):
                        v = fgrid[ih + i, ik + j, il + m]
                        w = wh[i] * wk[j] * wl[m]
                        F += w * v
                        Fh += dwh[i] * wk[j] * wl[m] * v
                        Fk += wh[i] * dwk[j] * wl[m] * v
                        Fl += wh[i] * wk[j] * dwl[m] * v
                        fidx[n] = ((ih + i) * nk + (ik + j)) * nl + (il + m)
                        fw[n] = w
                        n += 1
            return F, Fh, Fk, Fl, n, 0.0
    if fs.has_hkls and hmin <= h0 <= hmax and kmin <= k0 <= kmax and lmin <= l0 <= lmax:
        fidx[0] = ((h0 - hmin) * nk + (k0 - kmin)) * nl + (l0 - lmin)
        fw[0] = 1.0
        return fgrid[h0 - hmin, k0 - kmin, l0 - lmin], 0.0, 0.0, 0.0, 1, 0.0
    return fs.default_F, 0.0, 0.0, 0.0, 0, 1.0


@njit(cache=True, error_model="numpy")
def rotate_axis_vjp(vx, vy, vz, ax, ay, az, phi, gx, gy, gz):
    """Gradients of rotate_axis(v, a, phi) for upstream g: (gv(3), ga(3), gphi)."""
    s = math.sin(phi)
    c = math.cos(phi)
    ag = ax * gx + ay * gy + az * gz
    av = ax * vx + ay * vy + az * vz
    gvx = (1.0 - c) * ax * ag + c * gx + s * (gy * az - gz * ay)
    gvy = (1.0 - c) * ay * ag + c * gy + s * (gz * ax - gx * az)
    gvz = (1.0 - c) * az * ag + c * gz + s * (gx * ay - gy * ax)
    gax = (1.0 - c) * (gx * av + ag * vx) + s * (vy * gz - vz * gy)
    gay = (1.0 - c) * (gy * av + ag * vy) + s * (vz * gx - vx * gz)
    gaz = (1.0 - c) * (gz * av + ag * vz) + s * (vx * gy - vy * gx)
    # d out / d phi = a (a.v) s - v s + (a x v) c
    cx = ay * vz - az * vy
    cy = az * vx - ax * vz
    cz = ax * vy - ay * vx
    gphi = (gx * (ax * av * s - vx * s + cx * c) + gy * (ay * av * s - vy * s + cy * c)
            + gz * (az * av * s - vz * s + cz * c))
    return gvx, gvy, gvz, gax, gay, gaz, gphi


@njit(cache=True, error_model="numpy")
def position_vjp(gx, gy, gz, fpixel, spixel, subF, subS, t, det, beam, L, g):
    """Push the gradient of a sub-pixel position back to pix0/fdet/sdet/odet (and the
    beam and distance for a curved detector); accumulates into ``g`` (layout ``L``)."""
    os = det.oversample
    sub = det.subpixel
    f = det.fdet
    s = det.sdet
    o = det.odet
    cF = fpixel * os + subF + 0.5
    cS = spixel * os + subS + 0.5
    Fdet = sub * (fpixel * os + subF) + sub / 2.0
    Sdet = sub * (spixel * os + subS) + sub / 2.0
    Odet = t * det.thickstep
    if det.curved:
        D = det.distance
        b = beam.beam
        py = Fdet * f[1] + Sdet * s[1] + Odet * o[1] + det.pix0[1]
        pz = Fdet * f[2] + Sdet * s[2] + Odet * o[2] + det.pix0[2]
        v0x = D * b[0]
        v0y = D * b[1]
        v0z = D * b[2]
        # v1 = rotate(v0, sdet, py/D)
        s1 = math.sin(py / D)
        c1 = math.cos(py / D)
        sx, sy, sz = s[0], s[1], s[2]
        d1 = (sx * v0x + sy * v0y + sz * v0z) * (1.0 - c1)
        v1x = sx * d1 + v0x * c1 + (-sz * v0y + sy * v0z) * s1
        v1y = sy * d1 + v0y * c1 + (sz * v0x - sx * v0z) * s1
        v1z = sz * d1 + v0z * c1 + (-sy * v0x + sx * v0y) * s1
        gv1x, gv1y, gv1z, gfx, gfy, gfz, gphi2 = rotate_axis_vjp(
            v1x, v1y, v1z, f[0], f[1], f[2], pz / D, gx, gy, gz)
        gv0x, gv0y, gv0z, gsx, gsy, gsz, gphi1 = rotate_axis_vjp(
            v0x, v0y, v0z, sx, sy, sz, py / D, gv1x, gv1y, gv1z)
        g[L.fdet] += gfx
        g[L.fdet + 1] += gfy
        g[L.fdet + 2] += gfz
        g[L.sdet] += gsx
        g[L.sdet + 1] += gsy
        g[L.sdet + 2] += gsz
        g[L.beam] += D * gv0x
        g[L.beam + 1] += D * gv0y
        g[L.beam + 2] += D * gv0z
        g[L.distance] += (b[0] * gv0x + b[1] * gv0y + b[2] * gv0z
                          - gphi2 * pz / (D * D) - gphi1 * py / (D * D))
        gx = 0.0
        gy = gphi1 / D
        gz = gphi2 / D
    flat_position_vjp(gx, gy, gz, Fdet * gx, Fdet * gy, Fdet * gz, cF * (f[0] * gx + f[1] * gy + f[2] * gz),
                      Sdet, cS, t, det, L, g)


@njit(cache=True, error_model="numpy", inline="always")
def flat_position_vjp(gx, gy, gz, fgx, fgy, fgz, cfg, Sdet, cS, t, det, L, g):
    """The flat-detector part of :func:`position_vjp` for sub-pixels of one row, slow
    coordinate and layer: (gx, gy, gz) the gradient of their positions, fg it times each
    one's fast coordinate Fdet, cfg the sum of (column + 1/2) (fdet . gradient); sums over
    a row's pixels may be pushed at once."""
    s = det.sdet
    o = det.odet
    Odet = t * det.thickstep
    g[L.pix0] += gx
    g[L.pix0 + 1] += gy
    g[L.pix0 + 2] += gz
    g[L.fdet] += fgx
    g[L.fdet + 1] += fgy
    g[L.fdet + 2] += fgz
    g[L.sdet] += Sdet * gx
    g[L.sdet + 1] += Sdet * gy
    g[L.sdet + 2] += Sdet * gz
    g[L.odet] += Odet * gx
    g[L.odet + 1] += Odet * gy
    g[L.odet + 2] += Odet * gz
    g[L.subpixel] += cfg + cS * (s[0] * gx + s[1] * gy + s[2] * gz)
    g[L.thickstep] += t * (o[0] * gx + o[1] * gy + o[2] * gz)


@njit(cache=True, error_model="numpy")
def direction_vjp(gdx, gdy, gdz, gR, px, py, pz, R, dx, dy, dz):
    """Gradient of d = P/|P| and R = |P| back to P."""
    t = dx * gdx + dy * gdy + dz * gdz
    return ((gdx - dx * t) / R + gR * dx, (gdy - dy * t) / R + gR * dy, (gdz - dz * t) / R + gR * dz)


@njit(cache=True, error_model="numpy", inline="always")
def omega_partials(R, det, omega):
    """(domega/dR, domega/dpixel, domega/dclose_distance) at the given omega."""
    return solid_angle_partials(R, det.pixel, det.close_distance, det.point_pixel, omega)


@njit(cache=True, error_model="numpy", inline="always")
def solid_angle_partials(R, pixel, close_distance, point_pixel, omega):
    """:func:`omega_partials` from the detector's scalars."""
    if point_pixel:
        return -2.0 * omega / R, 0.0, 0.0
    return -3.0 * omega / R, 2.0 * omega / pixel, omega / close_distance


@njit(cache=True, error_model="numpy", inline="always")
def capture_partials(t, dx, dy, dz, det):
    """(capture, dcap/dd (3), dcap/dodet (3), dcap/dthickstep, dcap/dmu)."""
    ox, oy, oz = det.odet[0], det.odet[1], det.odet[2]
    rho = dx * ox + dy * oy + dz * oz
    ts = det.thickstep
    mu = det.mu
    A = ts * mu / rho
    e0 = math.exp(-t * A)
    e1 = math.exp(-(t + 1) * A)
    cap = e0 - e1
    dA = -t * e0 + (t + 1) * e1
    drho = -dA * A / rho
    return (cap, drho * ox, drho * oy, drho * oz, drho * dx, drho * dy, drho * dz,
            dA * mu / rho, dA * ts / rho)


# rows of the per-orientation scratch that square_partials fills (the vectorised blocks of
# the tangent and adjoint kernels add their own rows after SQ_ROWS)
SQ_L, SQ_LH, SQ_LK, SQ_LL, SQ_LNA, SQ_LNB, SQ_LNC, SQ_F, SQ_T = range(9)
SQ_ROWS = 9


@njit(cache=True, error_model="numpy", inline="always")
def square_partials(qx, qy, qz, ori, nreal, xt, fs, fflat, sc, ibuf):
    """One block's orientations (parallelepiped spots, nearest F), all at once: F_latt
    (SQ_L), its partials in h, k, l (SQ_LH..) and in Na, Nb, Nc (SQ_LNA..), F (SQ_F) and
    the term F^2 F_latt^2 exactly as the forward kernel's :func:`square_terms` computes
    it (SQ_T), for ``ori`` (9, npad) zero-padded past ``nreal``; F and the term are 0 on
    the padding.  With a grid, ``ibuf`` receives each orientation's flat grid index (-1
    outside).  The first loop has no gathers, so it vectorises."""
    n = ori.shape[1]
    use_grid = fs.has_hkls
    extent = grid_extent(fs)
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    for m in range(n):
        h, k, l = soa_hkl(ori, m, qx, qy, qz)
        dh = node_offset(h)
        dk = node_offset(k)
        dl = node_offset(l)
        T, Lt, LH, LK, LL, LNa, LNb, LNc = square_lattice_grad(dh, dk, dl, Na, Nb, Nc)
        sc[SQ_L, m] = Lt
        sc[SQ_LH, m] = LH
        sc[SQ_LK, m] = LK
        sc[SQ_LL, m] = LL
        sc[SQ_LNA, m] = LNa
        sc[SQ_LNB, m] = LNb
        sc[SQ_LNC, m] = LNc
        sc[SQ_T, m] = T
        if use_grid:
            ibuf[m] = flat_grid_index(int(math.ceil(h - 0.5)), int(math.ceil(k - 0.5)), int(math.ceil(l - 0.5)),
                                      extent)
    default_F = fs.default_F
    if use_grid:
        for m in range(nreal):
            j = ibuf[m]
            sc[SQ_F, m] = fflat[j] if j >= 0 else default_F
    else:
        for m in range(nreal):
            sc[SQ_F, m] = default_F
    for m in range(nreal, n):
        sc[SQ_F, m] = 0.0
    for m in range(n):
        F = sc[SQ_F, m]
        sc[SQ_T, m] = sc[SQ_T, m] * (F * F)


class LaneScratch(NamedTuple):
    """Per-orientation values across a row's pixel lanes (see :func:`orientation_lanes`)."""
    latt: np.ndarray     # F_latt^2
    Lt: np.ndarray       # F_latt, and its partials in h, k, l and in Na, Nb, Nc
    LH: np.ndarray
    LK: np.ndarray
    LL: np.ndarray
    LNa: np.ndarray
    LNb: np.ndarray
    LNc: np.ndarray
    F: np.ndarray        # F of the nearest node, and 1 where that is the default F
    isdef: np.ndarray
    cell: np.ndarray     # its flat index in the grid (-1 outside)
    near: np.ndarray     # 1.0 where square_lattice_grad_far leaves the lane to square_lattice_grad
    nearby: np.ndarray   # those lanes' indices (int64)


class LaneSums(NamedTuple):
    """What the derivative kernels' row lanes add up per pixel over a block's orientations
    (see :func:`orientation_lanes`)."""
    acc: np.ndarray      # (8, n): the forward's eight partial sums of F^2 F_latt^2
    Wx: np.ndarray       # sum over the block of wt dT/dq
    Wy: np.ndarray
    Wz: np.ndarray
    SNa: np.ndarray      # with per_lane (else length 0): sums over all blocks of wt dT/dN
    SNb: np.ndarray      # and wt dT/dF(default) ...
    SNc: np.ndarray
    SD: np.ndarray
    O: np.ndarray        # ... and (9, orientations, n): sums of wt (dT/dh, dT/dk, dT/dl) outer q
    gN: np.ndarray       # (4,): without per_lane, SN* and SD summed over the lanes too


@njit(cache=True, error_model="numpy")
def lane_scratch(n, Fdef):
    return LaneScratch(np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n),
                       np.empty(n), np.full(n, Fdef), np.ones(n), np.full(n, -1, dtype=np.int64), np.empty(n),
                       np.empty(n, dtype=np.int64))


@njit(cache=True, error_model="numpy")
def lane_sums(n, norient, per_lane):
    """The sums for n lanes (without ``per_lane``, the adjoint's: no per-lane N, F and
    orientation sums)."""
    k = n if per_lane else 0
    return LaneSums(np.empty((8, n)), np.empty(n), np.empty(n), np.empty(n), np.zeros(k), np.zeros(k), np.zeros(k),
                    np.zeros(k), np.zeros((9, norient, k)), np.zeros(4))


@njit(cache=True, error_model="numpy")
def _lattice_near_node(A, qx, qy, qz, Na, Nb, Nc, sc, n):
    """The lanes :func:`square_lattice_grad_far` marked, from :func:`square_lattice_grad`.
    (A function of its own, and its lanes gathered first: a conditional call in the
    vector loop's function would be if-converted, evaluating it on every lane.)"""
    nearby = sc.nearby
    count = 0
    for x in range(n):
        if sc.near[x] != 0.0:
            nearby[count] = x
            count += 1
    for i in range(count):
        x = nearby[i]
        h, k, l = axes_hkl(A, qx[x], qy[x], qz[x])
        (sc.latt[x], sc.Lt[x], sc.LH[x], sc.LK[x], sc.LL[x], sc.LNa[x], sc.LNb[x],
         sc.LNc[x]) = square_lattice_grad(node_offset(h), node_offset(k), node_offset(l), Na, Nb, Nc)


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _lane_partial_sums(F, Lt, LH, LK, LL, LNa, LNb, LNc, isdef, wt, qx, qy, qz, n, gor, m, gN):
    """The adjoint's dT/d(orientation m) (nine sums, added to gor[:, m]) and dT/dN,
    dT/dF(default) (added to gN) over one block's n lanes: what the tangent keeps per
    lane (:func:`orientation_lanes`), summed here at once.  ("reassoc": the loop keeps
    its sums in vector registers, so it reads each lane once and stores nothing per lane;
    the order of the additions is fixed by n and the machine, never by the threads.)"""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = 0.0
    na = nb = nc = nd = 0.0
    for x in range(n):
        c = 2.0 * F[x] * F[x] * Lt[x] * wt[x]
        gh = c * LH[x]
        gk = c * LK[x]
        gl = c * LL[x]
        s0 += gh * qx[x]
        s1 += gh * qy[x]
        s2 += gh * qz[x]
        s3 += gk * qx[x]
        s4 += gk * qy[x]
        s5 += gk * qz[x]
        s6 += gl * qx[x]
        s7 += gl * qy[x]
        s8 += gl * qz[x]
        na += c * LNa[x]
        nb += c * LNb[x]
        nc += c * LNc[x]
        nd += isdef[x] * 2.0 * F[x] * Lt[x] * Lt[x] * wt[x]
    gor[0, m] += s0
    gor[1, m] += s1
    gor[2, m] += s2
    gor[3, m] += s3
    gor[4, m] += s4
    gor[5, m] += s5
    gor[6, m] += s6
    gor[7, m] += s7
    gor[8, m] += s8
    gN[0] += na
    gN[1] += nb
    gN[2] += nc
    gN[3] += nd


@njit(cache=True, error_model="numpy", inline="always")
def orientation_lanes(ori, norient, qx, qy, qz, wt, xt, fs, fflat, per_lane, want_O, gF, gor, sc, sums, n):
    """One block's orientations (parallelepiped spots, nearest F) across n pixel lanes at
    scattering vectors q, each lane's terms T = F^2 F_latt^2 weighted by wt: the forward's
    partial sums (``acc``, reset here: :func:`~nbragg.kernels.cpu.block_total` gives the
    block's sum), and dT/dq contracted over the block (``W*``, reset here); with
    ``per_lane`` (the tangent) each lane's dT/dN and dT/dF(default) summed over blocks
    (``SN*``, ``SD``) and, with ``want_O``, its dT/d(orientation) per orientation (``O``);
    without (the adjoint) those summed over the lanes too, into ``sums.gN`` and ``gor``
    (the orientations' rows of the gradient); with a grid and a non-empty ``gF``, dT/dF
    of each node is added to it.

    What the tangent's and the adjoint's row lanes share (the tangent weights a term by
    the block's Bragg weight, the adjoint by that times the upstream and the pixel's
    factors, G): the orientation
    loops make no calls and carry no parameter index, so LLVM vectorises them."""
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    use_grid = fs.has_hkls
    extent = grid_extent(fs)
    Fdef = fs.default_F
    scatter = use_grid and gF.shape[0] > 0
    n8 = norient // 8 * 8
    acc = sums.acc
    Wx = sums.Wx
    Wy = sums.Wy
    Wz = sums.Wz
    SNa = sums.SNa
    SNb = sums.SNb
    SNc = sums.SNc
    SD = sums.SD
    O = sums.O
    latt = sc.latt
    Lt = sc.Lt
    LH = sc.LH
    LK = sc.LK
    LL = sc.LL
    LNa = sc.LNa
    LNb = sc.LNb
    LNc = sc.LNc
    F = sc.F
    isdef = sc.isdef
    cell = sc.cell
    acc[:, :] = 0.0
    Wx[:] = 0.0
    Wy[:] = 0.0
    Wz[:] = 0.0
    near = sc.near
    for m in range(norient):
        A = orientation_axes(ori, m)
        nnear = 0
        for x in range(n):
            h, k, l = axes_hkl(A, qx[x], qy[x], qz[x])
            latt[x], Lt[x], LH[x], LK[x], LL[x], LNa[x], LNb[x], LNc[x], near[x] = square_lattice_grad_far(
                node_offset(h), node_offset(k), node_offset(l), Na, Nb, Nc)
            nnear += 1 if near[x] != 0.0 else 0
        if nnear > 0:
            _lattice_near_node(A, qx, qy, qz, Na, Nb, Nc, sc, n)
        if use_grid:
            # (the nodes' indices, then the gather: loops of their own, so that all but
            # the gather vectorise)
            grid_cells(ori, m, qx, qy, qz, extent, cell, n)
            for x in range(n):
                c = cell[x]
                F[x] = fflat[c] if c >= 0 else Fdef
                isdef[x] = 0.0 if c >= 0 else 1.0
        j = m & 7 if m < n8 else 0
        for x in range(n):
            F2 = F[x] * F[x]
            acc[j, x] += latt[x] * F2
            c = 2.0 * F2 * Lt[x] * wt[x]
            gh = c * LH[x]
            gk = c * LK[x]
            gl = c * LL[x]
            Wx[x] += gh * A[0] + gk * A[3] + gl * A[6]
            Wy[x] += gh * A[1] + gk * A[4] + gl * A[7]
            Wz[x] += gh * A[2] + gk * A[5] + gl * A[8]
        if not per_lane:
            _lane_partial_sums(F, Lt, LH, LK, LL, LNa, LNb, LNc, isdef, wt, qx, qy, qz, n, gor, m, sums.gN)
        else:
            for x in range(n):
                c = 2.0 * F[x] * F[x] * Lt[x] * wt[x]
                SNa[x] += c * LNa[x]
                SNb[x] += c * LNb[x]
                SNc[x] += c * LNc[x]
                SD[x] += isdef[x] * 2.0 * F[x] * Lt[x] * Lt[x] * wt[x]
        if per_lane and want_O:
            # (a loop of its own: with all the stores in one, LLVM gives up vectorising)
            for x in range(n):
                c = 2.0 * F[x] * F[x] * Lt[x] * wt[x]
                gh = c * LH[x]
                gk = c * LK[x]
                gl = c * LL[x]
                O[0, m, x] += gh * qx[x]
                O[1, m, x] += gh * qy[x]
                O[2, m, x] += gh * qz[x]
                O[3, m, x] += gk * qx[x]
                O[4, m, x] += gk * qy[x]
                O[5, m, x] += gk * qz[x]
                O[6, m, x] += gl * qx[x]
                O[7, m, x] += gl * qy[x]
                O[8, m, x] += gl * qz[x]
        if scatter:
            for x in range(n):
                if cell[x] >= 0 and wt[x] != 0.0:
                    gF[cell[x]] += 2.0 * F[x] * Lt[x] * Lt[x] * wt[x]


# rows of an amorphous background's per-lane partials (amorphous_lane_partials); the
# derivative kernels' own rows follow AM_ROWS
(AM_STOL, AM_OMEGA, AM_OR, AM_OPIX, AM_OCLOSE, AM_POLAR, AM_KAHN, AM_C2, AM_X, AM_Y, AM_CAPTURE, AM_CDX, AM_CDY,
 AM_CDZ, AM_COX, AM_COY, AM_COZ, AM_CTS, AM_CMU, AM_A, AM_DA) = range(21)
AM_ROWS = 21


@njit(cache=True, error_model="numpy")
def amorphous_lane_partials(S, s, t, n, R, dx, dy, dz, qx, qy, qz, w, sq, redo):
    """The amorphous samples of source s at one sub-pixel of layer t of n lanes (R, d and
    q: their distances, directions and scattering vectors, as the row lanes have them), in
    loops over the lanes, for the derivative kernels' row lanes: into rows AM_* of ``w``,
    sin(theta)/lambda, the factors as the walk's amorphous_factor takes them (bit for bit)
    with their partials -- the solid angle's in R, the pixel size and the close distance,
    the polarization's (physics.polarization_parts), the capture fraction's
    (:func:`capture_partials`) -- and the materials' sum A with its slope in
    sin(theta)/lambda (physics.amorphous_grad_lanes, which writes each material's sign(F)
    F^2 to ``sq`` (materials, n); ``redo``: scratch of n booleans).  Rows of
    partials the samples lack (no polarization, no sensor) are left as they are.  Returns
    the source's polarization frame (physics.polarization_frame) and whether it is
    defined."""
    det = S.det
    beam = S.beam
    ix = -beam.sources[s, 0]
    iy = -beam.sources[s, 1]
    iz = -beam.sources[s, 2]
    kahn = beam.kahn
    pv = beam.polar_axis
    pixel = det.pixel
    close_distance = det.close_distance
    point_pixel = det.point_pixel
    stol = w[AM_STOL]
    omega = w[AM_OMEGA]
    polar = w[AM_POLAR]
    capture = w[AM_CAPTURE]
    Bx, By, Bz, bm, Ex, Ey, Ez, em = polarization_frame(ix, iy, iz, pv[0], pv[1], pv[2])
    framed = bm != 0.0 and em != 0.0
    for x in range(n):
        stol[x] = amorphous_stol(qx[x], qy[x], qz[x])
        omega[x] = pixel_solid_angle(R[x], pixel, close_distance, point_pixel)
        w[AM_OR, x], w[AM_OPIX, x], w[AM_OCLOSE, x] = solid_angle_partials(R[x], pixel, close_distance, point_pixel,
                                                                           omega[x])
    if beam.nopolar:
        polar[:n] = 1.0
    else:
        for x in range(n):
            polar[x], w[AM_KAHN, x], w[AM_C2, x], w[AM_X, x], w[AM_Y, x] = polarization_parts(
                kahn, ix, iy, iz, dx[x], dy[x], dz[x], Bx, By, Bz, Ex, Ey, Ez, framed)
    if det.thick != 0.0:
        # (exp: a scalar loop, run only with sensor layers; the value is capture_fraction's,
        # the walk's, whose rounding differs from capture_partials')
        for x in range(n):
            capture[x] = capture_fraction(t, dx[x], dy[x], dz[x], det)
            (_, w[AM_CDX, x], w[AM_CDY, x], w[AM_CDZ, x], w[AM_COX, x], w[AM_COY, x], w[AM_COZ, x], w[AM_CTS, x],
             w[AM_CMU, x]) = capture_partials(t, dx[x], dy[x], dz[x], det)
    else:
        capture[:n] = 1.0
    amorphous_grad_lanes(S.samp, stol, w[AM_A], w[AM_DA], sq, redo, n)
    return Bx, By, Bz, bm, Ex, Ey, Ez, em, framed
