"""A slow, plainly written numpy version of nanoBragg's model, for tests only.

It takes the resolved :class:`nbragg.engine.Model` (geometry, sources, orientations and
structure factors already in SI arrays) and evaluates the image pixel by pixel with
vectorised numpy over pixels and Python loops over the samples, in nanoBragg's loop
order.  It shares no code with the Numba kernels: trigonometry is numpy's, lattice
factors use the textbook formulas.  Tiny detectors only.
"""

import math

import numpy as np

R_E_SQR = 7.94079248018965e-30


def sincg_reference(h, N):
    """|sin(N pi h) / sin(pi h)|, evaluated on the fractional part of h.

    sin(N pi (h0 + d)) = +-sin(N pi d) and sin(pi (h0 + d)) = +-sin(pi d) for integer
    h0 and N; using d keeps the digits that pi*N*h would lose.  Value N at d = 0.
    """
    d = h - np.ceil(h - 0.5)
    den = np.sin(np.pi * d)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(np.sin(N * np.pi * d) / den)
    return np.where(den == 0.0, N, r)


def sinc3_reference(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        v = 3.0 * (np.sin(x) - x * np.cos(x)) / x ** 3
    series = 1.0 - x ** 2 / 10.0 + x ** 4 / 280.0 - x ** 6 / 15120.0
    return np.where(np.abs(x) < 0.02, series, v)


def polarization_reference(kahn, incident, d, axis):
    """Kahn polarization factor, vectorised over diffracted directions d (..., 3)."""
    cos2t = d @ incident
    sin2t_sqr = 1.0 - cos2t ** 2
    if kahn == 0.0:
        return 0.5 * (1.0 + cos2t ** 2)
    B = np.cross(axis, incident)
    B = B / np.linalg.norm(B)
    E = np.cross(incident, B)
    E = E / np.linalg.norm(E)
    psi = -np.arctan2(d @ B, d @ E)
    return 0.5 * (1.0 + cos2t ** 2 - kahn * np.cos(2 * psi) * sin2t_sqr)


def lagrange_weights(t):
    """Cubic Lagrange basis on nodes -1, 0, 1, 2 evaluated at t (..., ) -> (..., 4)."""
    nodes = np.array([-1.0, 0.0, 1.0, 2.0])
    w = []
    for j in range(4):
        others = [n for i, n in enumerate(nodes) if i != j]
        num = np.ones_like(t)
        den = 1.0
        for n in others:
            num = num * (t - n)
            den *= nodes[j] - n
        w.append(num / den)
    return np.stack(w, axis=-1)


def structure_factor(h, k, l, st):
    """F at fractional hkl: tricubic where the 4x4x4 neighbourhood fits, else nearest."""
    grid = st.grid
    lo = np.array(st.hkl_min)
    hi = np.array(st.hkl_max)
    idx = np.stack([np.ceil(x - 0.5) for x in (h, k, l)], axis=-1).astype(np.int64)
    inside = np.all((idx >= lo) & (idx <= hi), axis=-1) & (st.hkls > 0)
    F = np.full(h.shape, st.default_F)
    rel = np.clip(idx - lo, 0, np.array(grid.shape) - 1)
    F = np.where(inside, grid[rel[..., 0], rel[..., 1], rel[..., 2]], F)
    if st.interpolate:
        frac = np.stack([h, k, l], axis=-1)
        ranges = hi - lo + 1
        ok = np.ones(h.shape, dtype=bool)
        for ax in range(3):
            x = frac[..., ax]
            ok &= ~(((x - lo[ax] + 3) > ranges[ax]) | ((x - 2) < lo[ax]))
        flr = np.floor(frac).astype(np.int64)
        w = [lagrange_weights(frac[..., ax] - flr[..., ax]) for ax in range(3)]
        Fi = np.zeros(h.shape)
        for i in range(4):
            for j in range(4):
                for m in range(4):
                    ih = np.clip(flr[..., 0] - 1 + i - lo[0], 0, grid.shape[0] - 1)
                    ik = np.clip(flr[..., 1] - 1 + j - lo[1], 0, grid.shape[1] - 1)
                    il = np.clip(flr[..., 2] - 1 + m - lo[2], 0, grid.shape[2] - 1)
                    Fi += w[0][..., i] * w[1][..., j] * w[2][..., m] * grid[ih, ik, il]
        F = np.where(ok, Fi, F)
    return F


def lattice(h, k, l, model):
    c = model.crystal
    Na, Nb, Nc = c.Na, c.Nb, c.Nc
    if c.shape == "square":
        F = np.ones(h.shape)
        for x, N in ((h, Na), (k, Nb), (l, Nc)):
            if N > 1:
                F = F * sincg_reference(x, N)
        return F
    d = np.stack([x - np.ceil(x - 0.5) for x in (h, k, l)], axis=-1)
    if c.shape == "round":
        hrad = (d[..., 0] * Na) ** 2 + (d[..., 1] * Nb) ** 2 + (d[..., 2] * Nc) ** 2
        return Na * Nb * Nc * 0.723601254558268 * sinc3_reference(np.pi * np.sqrt(hrad * c.fudge))
    if c.shape == "gauss_domain":
        x = model.experiment.crystal
        N = np.array([[Na, x.N_ab, x.N_ac], [x.N_ab, Nb, x.N_bc], [x.N_ac, x.N_bc, Nc]])
        return np.linalg.det(N) * np.exp(-((d @ N) ** 2).sum(axis=-1) / 0.63 * c.fudge)
    dq = d @ c.recip0
    rad = (dq ** 2).sum(axis=-1) * (Na * Nb * Nc) ** 2
    if c.shape == "gauss":
        return Na * Nb * Nc * np.exp(-rad / 0.63 * c.fudge)
    return Na * Nb * Nc * (rad * c.fudge < 0.3969)


def reference_image(model):
    """The image in photons, (spixels, fpixels) -- or (panels, spixels, fpixels) for a
    detector of several panels -- zero outside ROI and mask.  Each source's terms carry
    its weight (model.scene.beam.weights)."""
    images = [_panel_image(model, panel) for panel in model.panels]
    return images[0] if len(images) == 1 else np.stack(images)


def _panel_image(model, det):
    """One panel (models.detector.Panel); the beam and polarization axes are shared."""
    beam, polar_axis = model.detector.beam, model.detector.polar
    exp = model.experiment
    samp = exp.sampling
    S, F = det.spixels, det.fpixels
    os_ = model.oversample
    sub = det.pixel / os_
    fi, si = np.meshgrid(np.arange(F), np.arange(S))
    physical = exp.physics == "physical"
    # nanoBragg's water starts the sum; the physical mode's is a per-sample amorphous term
    water = model.water != 0.0 and not physical
    I = np.full((S, F), 0.0 if physical else model.I_bg)
    bg = np.zeros((S, F))         # the amorphous background: factors taken per sample
    materials = [(amorphous_reference(m), amount_reference(m, model)) for m in exp.background]
    if physical and model.water != 0.0:
        molecules = model.water ** 3 * 1e6 * 6.02214179e23 / 18.0
        materials.append((lambda stol: np.full(np.shape(stol), 2.57),
                          molecules * model.crystal.mosaic_domains * model.crystal.phisteps))
    polar = np.full((S, F), 1.0 if exp.beam.nopolar else 0.0)
    omega = np.zeros((S, F))
    capture = np.zeros((S, F))
    for t in range(det.thicksteps):
        capture = np.full((S, F), 1.0 if det.thick == 0.0 else 0.0)
        for subS in range(os_):
            for subF in range(os_):
                Fd = sub * (fi * os_ + subF) + sub / 2.0
                Sd = sub * (si * os_ + subS) + sub / 2.0
                P = (Fd[..., None] * det.fdet + Sd[..., None] * det.sdet
                     + t * det.thickstep * det.odet + det.pix0)
                if det.curved:
                    P = np.stack([_curved(P[s_, f_], det, beam) for s_, f_ in np.ndindex(S, F)]).reshape(S, F, 3)
                R = np.linalg.norm(P, axis=-1)
                d = P / R[..., None]
                new_omega = det.pixel ** 2 / R ** 2 * det.close_distance / R
                if det.point_pixel:
                    new_omega = 1.0 / R ** 2
                omega = np.where((omega == 0.0) | samp.oversample_omega, new_omega, omega)
                parallax = d @ det.odet
                new_cap = (np.exp(-t * det.thickstep * det.mu / parallax)
                           - np.exp(-(t + 1) * det.thickstep * det.mu / parallax))
                capture = np.where((capture == 0.0) | samp.oversample_thick, new_cap, capture)
                for src, lam, w in zip(model.sources.directions, model.sources.wavelengths,
                                       model.scene.beam.weights):
                    inc = -src
                    q = (d - inc) / lam
                    stol = 0.5 * np.linalg.norm(q, axis=-1)
                    if materials:
                        p_bg = 1.0 if exp.beam.nopolar else polarization_reference(exp.beam.polarization, inc, d,
                                                                                      polar_axis)
                        c_bg = 1.0 if det.thick == 0.0 else new_cap
                        for Fm, amount in materials:
                            Fv = Fm(stol)
                            bg += amount * np.sign(Fv) * Fv ** 2 * p_bg * new_omega * w * c_bg
                    with np.errstate(divide="ignore"):
                        skip = (model.dmin > 0) & (stol > 0) & (model.dmin > 0.5 / np.where(stol > 0, stol, 1))
                    use = ~skip
                    # the overall B factor: F^2 exp(-2 B (sin(theta)/lambda)^2), stol in 1/A
                    dw = np.exp(-2.0 * exp.structure.B_iso * (stol * 1e-10) ** 2)
                    new_polar = polarization_reference(exp.beam.polarization, inc, d, polar_axis)
                    polar = np.where(use & ((polar == 0.0) | samp.oversample_polar), new_polar, polar)
                    for orient in model.crystal.orientations:
                        hkl = q @ orient.T
                        h, k, l = hkl[..., 0], hkl[..., 1], hkl[..., 2]
                        Fl = lattice(h, k, l, model)
                        Fc = structure_factor(h, k, l, model.structure)
                        U = exp.structure.U_aniso
                        if U is not None:
                            # CIF's U_ij: F exp(-2 pi^2 sum_ij U_ij h_i h_j a*_i a*_j)
                            Um = np.array([[U[0], U[3], U[4]], [U[3], U[1], U[5]], [U[4], U[5], U[2]]])
                            star = np.linalg.norm(model.crystal.recip0, axis=1)
                            hs = np.stack([h, k, l], axis=-1) * star
                            Fc = Fc * np.exp(-2 * np.pi ** 2 * np.einsum("...i,ij,...j->...", hs, Um, hs))
                        add = use & ~((Fl == 0.0) & (not water))
                        if physical:
                            # each term times its own sample's factors
                            factors = new_omega * (new_cap if det.thick != 0.0 else 1.0)
                            if not exp.beam.nopolar:
                                factors = factors * new_polar
                            I = np.where(add, I + w * dw * (Fc ** 2 * Fl ** 2) * factors, I)
                            continue
                        I = np.where(add, I + w * dw * (Fc ** 2 * Fl ** 2), I)
                        if samp.oversample_thick:
                            I = np.where(add, I * capture, I)
                        if samp.oversample_polar:
                            I = np.where(add, I * polar, I)
                        if samp.oversample_omega:
                            I = np.where(add, I * omega, I)
    value = I
    if physical:
        return _in_roi(model, det, fi, si, R_E_SQR * model.fluence * (value + bg) / model.steps)
    if not samp.oversample_thick:
        value = value * capture
    if not samp.oversample_polar:
        value = value * polar
    if not samp.oversample_omega:
        value = value * omega
    return _in_roi(model, det, fi, si, R_E_SQR * model.fluence * (value + bg) / model.steps)


def _in_roi(model, det, fi, si, image):
    xmin, xmax, ymin, ymax = det.roi
    keep = (fi >= xmin) & (fi <= xmax) & (si >= ymin) & (si <= ymax)
    if det.mask is not None:
        keep &= det.mask != 0
    return np.where(keep, image, 0.0)


def amorphous_reference(material):
    """F(stol in 1/m) of a material: the cubic through the four table rows around stol
    (the rows nearest-1 .. nearest+2, nearest the last at or below stol), with two
    far-away rows added at each end as nonBragg.c does (the kernels leave them out)."""
    t = material.parsed
    x = np.concatenate(([-1e99, -1e98], t.stol_per_m, [1e98, 1e99]))
    y = np.concatenate(([t.F[0]] * 2, t.F, [t.F[-1]] * 2))

    def F(stol):
        stol = np.asarray(stol, dtype=float)
        j = np.searchsorted(x, stol, side="right") - 2      # the first of the four rows
        out = np.zeros_like(stol)
        for a in range(4):
            term = y[j + a]
            for b in range(4):
                if b != a:
                    term = term * (stol - x[j + b]) / (x[j + a] - x[j + b])
            out = out + term
        return out
    return F


def amount_reference(material, model):
    """Molecules in the material's volume, times its scale and the orientations per
    sample (the engine divides every term by the steps, which count them)."""
    volume = material.thickness * material.width * material.height * 1e-9
    molecules = (material.molecules if material.molecules is not None
                 else volume * material.density_g_cm3 * 1e6 * 6.02214179e23 / material.mw_g_mol)
    return material.scale * molecules * model.crystal.mosaic_domains * model.crystal.phisteps


def _rotate(v, axis, phi):
    axis = np.asarray(axis)
    return (v * math.cos(phi) + np.cross(axis, v) * math.sin(phi)
            + axis * np.dot(axis, v) * (1 - math.cos(phi)))


def _curved(p, det, beam):
    """nanoBragg's curved detector: distance*beam swung about sdet by y/D, then fdet by z/D."""
    D = det.distance
    v = _rotate(D * beam, det.sdet, p[1] / D)
    return _rotate(v, det.fdet, p[2] / D)


def reference_reflection_photons(model):
    """{(h, k, l): photons} -- every pixel's Bragg terms summed by the reciprocal-lattice
    node each is nearest (ceil(h - 0.5)), times the pixel's factors and r_e^2 fluence /
    steps -- for experiments without -oversample_* flags (plain loops over pixels)."""
    exp = model.experiment
    polar_axis = model.detector.polar
    out = {}
    scale = R_E_SQR * model.fluence / model.steps
    for det in model.panels:
        os_ = model.oversample
        sub = det.pixel / os_
        xmin, xmax, ymin, ymax = det.roi
        for s_ in range(max(ymin, 0), min(ymax, det.spixels - 1) + 1):
            for f_ in range(max(xmin, 0), min(xmax, det.fpixels - 1) + 1):
                if det.mask is not None and det.mask[s_, f_] == 0:
                    continue
                terms, omega, polar, capture = {}, None, None, 1.0
                for t in range(det.thicksteps):
                    capture = 1.0 if det.thick == 0.0 else None
                    for subS in range(os_):
                        for subF in range(os_):
                            P = ((sub * (f_ * os_ + subF) + sub / 2) * det.fdet + (sub * (s_ * os_ + subS) + sub / 2)
                                 * det.sdet + t * det.thickstep * det.odet + det.pix0)
                            R = np.linalg.norm(P)
                            d = P / R
                            if omega is None:
                                omega = 1.0 / R ** 2 if det.point_pixel else det.pixel ** 2 / R ** 2 * det.close_distance / R
                            if capture is None:
                                par = d @ det.odet
                                capture = (np.exp(-t * det.thickstep * det.mu / par)
                                           - np.exp(-(t + 1) * det.thickstep * det.mu / par))
                            for src, lam, w in zip(model.sources.directions, model.sources.wavelengths,
                                                   model.scene.beam.weights):
                                q = (d + src) / lam
                                if polar is None:
                                    polar = (1.0 if exp.beam.nopolar else
                                             polarization_reference(exp.beam.polarization, -src, d, polar_axis))
                                for orient in model.crystal.orientations:
                                    h, k, l = q @ orient.T
                                    Fl = lattice(np.array(h), np.array(k), np.array(l), model)
                                    Fc = structure_factor(np.array(h), np.array(k), np.array(l), model.structure)
                                    key = tuple(int(np.ceil(x - 0.5)) for x in (h, k, l))
                                    terms[key] = terms.get(key, 0.0) + float(w * Fc ** 2 * Fl ** 2)
                for key, v in terms.items():
                    out[key] = out.get(key, 0.0) + v * capture * polar * omega * scale
    return out
