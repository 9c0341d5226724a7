"""Trace one pixel: every intermediate quantity of nanoBragg's model (``-printout``).

This walks the same loops as the kernel, in Python, calling the kernel's own per-sample
functions, and records each sample: sub-pixel, source, phi step and mosaic domain,
the scattering vector q, fractional and nearest Miller indices, F_cell, F_latt, and the
solid angle, polarization and capture fraction in force.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import cpu as K


def trace_pixel(model, fpixel, spixel):
    """Return (value in photons, omega, polar, capture, list of sample dicts)."""
    geom, fpar, ipar = model.geom, model.fpar, model.ipar
    sources = model.sources.directions
    lambdas = model.sources.wavelengths
    orients = model.crystal.orientations
    recip = model.crystal.recip0
    grid = model.structure.grid
    os_ = int(ipar[K.I_OVERSAMPLE])
    os_omega, os_polar, os_thick = (bool(ipar[i]) for i in (K.I_OS_OMEGA, K.I_OS_POLAR, K.I_OS_THICK))
    water = bool(ipar[K.I_WATER])
    I = fpar[K.F_I_BG]
    polar = 1.0 if ipar[K.I_NOPOLAR] else 0.0
    omega = 0.0
    capture = 0.0
    samples = []
    nmos = model.crystal.mosaic_domains
    for t in range(int(ipar[K.I_THICKSTEPS])):
        capture = 1.0 if fpar[K.F_THICK] == 0.0 else 0.0
        for subS in range(os_):
            for subF in range(os_):
                px, py, pz = K.subpixel_position(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
                R = math.sqrt(px * px + py * py + pz * pz)
                d = np.array([px, py, pz]) / R
                if omega == 0.0 or os_omega:
                    omega = fpar[K.F_PIXEL] ** 2 / R / R * fpar[K.F_CLOSE_DISTANCE] / R
                    if ipar[K.I_POINT_PIXEL]:
                        omega = 1.0 / R / R
                if capture == 0.0 or os_thick:
                    par = float(d @ geom[3])
                    mu, ts = fpar[K.F_MU], fpar[K.F_THICKSTEP]
                    capture = math.exp(-t * ts * mu / par) - math.exp(-(t + 1) * ts * mu / par)
                for s in range(len(lambdas)):
                    inc = -sources[s]
                    q = (d - inc) / lambdas[s]
                    stol = 0.5 * math.sqrt(float(q @ q))
                    if fpar[K.F_DMIN] > 0 and stol > 0 and fpar[K.F_DMIN] > 0.5 / stol:
                        samples.append(dict(layer=t, subS=subS, subF=subF, source=s, skipped="dmin",
                                            position=(px, py, pz), q=q, stol=stol))
                        continue
                    if polar == 0.0 or os_polar:
                        polar = K.polarization_factor(fpar[K.F_KAHN], *inc, *d, *geom[5])
                    for m in range(orients.shape[0]):
                        h, k, l = orients[m] @ q
                        h0, k0, l0 = (math.ceil(x - 0.5) for x in (h, k, l))
                        F_latt = K.lattice_factor(h, k, l, h0, k0, l0, int(ipar[K.I_SHAPE]), fpar[K.F_NA],
                                                  fpar[K.F_NB], fpar[K.F_NC], fpar[K.F_FUDGE], recip)
                        rec = dict(layer=t, subS=subS, subF=subF, source=s, phi_step=m // nmos, domain=m % nmos,
                                   position=(px, py, pz), q=q, stol=stol, hkl=(h, k, l), hkl0=(h0, k0, l0),
                                   F_latt=F_latt, omega=omega, polar=polar, capture=capture)
                        if F_latt == 0.0 and not water:
                            rec["F_cell"] = None
                            samples.append(rec)
                            continue
                        F_cell = K.lookup_F(h, k, l, h0, k0, l0, grid, ipar, fpar[K.F_DEFAULT_F])
                        rec["F_cell"] = F_cell
                        I += F_cell * F_cell * F_latt * F_latt
                        if os_thick:
                            I *= capture
                        if os_polar:
                            I *= polar
                        if os_omega:
                            I *= omega
                        rec["I"] = I
                        samples.append(rec)
    value = I
    if not os_thick:
        value *= capture
    if not os_polar:
        value *= polar
    if not os_omega:
        value *= omega
    return value * model.scale, omega, polar, capture, samples, I


def _block(model, f32, fpixel, spixel, detail):
    value, omega, polar, capture, samples, I = trace_pixel(model, fpixel, spixel)
    lam0 = model.wavelength
    out = []
    last = samples[-1] if samples else None
    pos = last["position"] if last else (0.0, 0.0, 0.0)
    twotheta = math.atan2(math.sqrt(pos[1] ** 2 + pos[2] ** 2), pos[0])
    stol = last["stol"] if last else 0.0
    out.append("%4d %4d : stol = %g or %g" % (fpixel, spixel, stol, math.sin(twotheta / 2.0) / (lam0 * 1e10)))
    out.append("at %g %g %g" % pos)
    if last and "hkl" in last:
        out.append("hkl= %f %f %f  hkl0= %d %d %d" % (*last["hkl"], *last["hkl0"]))
        out.append(" F_cell=%g  F_latt=%g   I = %g" % (last.get("F_cell") or 0.0, last["F_latt"], I))
    out.append("I/steps %15.10g" % (I / model.steps))
    out.append("polar   %15.10g" % polar)
    out.append("omega   %15.10g" % omega)
    out.append("capfrac %15.10g" % capture)
    out.append("pixel   %15.10g" % f32[spixel, fpixel])
    if detail:
        out.append("samples (layer subS subF source phi domain: q (1/A) | h k l | h0 k0 l0 | F_cell F_latt "
                   "| omega polar capture):")
        for r in samples:
            q = np.asarray(r["q"]) * 1e-10
            head = "  %d %d %d %d" % (r["layer"], r["subS"], r["subF"], r["source"])
            if r.get("skipped"):
                out.append(head + " : q= %.6g %.6g %.6g skipped by -dmin" % tuple(q))
                continue
            Fc = r["F_cell"]
            out.append(head + " %d %d : q= %.6g %.6g %.6g | %.5f %.5f %.5f | %d %d %d | %s %.6g | %.6g %.6g %.6g" % (
                r["phi_step"], r["domain"], *q, *r["hkl"], *r["hkl0"],
                "skipped" if Fc is None else "%.6g" % Fc, r["F_latt"], r["omega"], r["polar"], r["capture"]))
    return out


def printout_lines(model, f32, pixel=None):
    """nanoBragg's -printout block for one pixel (with every sample) or for every pixel."""
    if pixel is not None:
        return _block(model, f32, pixel[0], pixel[1], detail=True)
    xmin, xmax, ymin, ymax = model.roi_clipped
    lines = []
    use_mask = model.experiment.detector.mask is not None
    for s in range(ymin, ymax + 1):
        for f in range(xmin, xmax + 1):
            if use_mask and model.mask[s, f] == 0:
                continue
            lines.extend(_block(model, f32, f, s, detail=False))
    return lines
