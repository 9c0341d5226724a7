"""Trace one pixel: every intermediate quantity of nanoBragg's model (``-printout``).

This walks the same loops as the kernel, in Python, calling the kernel's own per-sample
functions, and records each sample: sub-pixel, source, phi step and mosaic domain,
the scattering vector q, fractional and nearest Miller indices, F_cell, F_latt, and the
solid angle, polarization and capture fraction in force.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import physics as K


def trace_pixel(model, fpixel, spixel):
    """Return (value in photons, omega, polar, capture, list of sample dicts)."""
    S = model.scene
    det, beam, xt, fs, samp = S
    sources = beam.sources
    lambdas = beam.lambdas
    orients = xt.orients
    os_ = det.oversample
    os_omega, os_polar, os_thick = samp.os_omega, samp.os_polar, samp.os_thick
    water = samp.water
    I = samp.I_bg
    polar = 1.0 if beam.nopolar else 0.0
    omega = 0.0
    capture = 0.0
    samples = []
    nmos = model.crystal.mosaic_domains
    for t in range(det.thicksteps):
        capture = 1.0 if det.thick == 0.0 else 0.0
        for subS in range(os_):
            for subF in range(os_):
                px, py, pz, R, dx, dy, dz = K.direction(fpixel, spixel, subF, subS, t, det, beam)
                d = np.array([dx, dy, dz])
                if omega == 0.0 or os_omega:
                    omega = K.solid_angle(R, det)
                if capture == 0.0 or os_thick:
                    capture = K.capture_fraction(t, dx, dy, dz, det)
                for s in range(len(lambdas)):
                    inc = -sources[s]
                    q = (d - inc) / lambdas[s]
                    stol = 0.5 * math.sqrt(float(q @ q))
                    if K.beyond_dmin(q[0], q[1], q[2], samp.dmin):
                        samples.append(dict(layer=t, subS=subS, subF=subF, source=s, skipped="dmin",
                                            position=(px, py, pz), q=q, stol=stol))
                        continue
                    if polar == 0.0 or os_polar:
                        polar = K.polarization_factor(beam.kahn, *inc, *d, *beam.polar_axis)
                    for m in range(orients.shape[0]):
                        h, k, l = orients[m] @ q
                        h0, k0, l0 = (math.ceil(x - 0.5) for x in (h, k, l))
                        F_latt = K.lattice_factor(h, k, l, h0, k0, l0, xt)
                        rec = dict(layer=t, subS=subS, subF=subF, source=s, phi_step=m // nmos, domain=m % nmos,
                                   position=(px, py, pz), q=q, stol=stol, hkl=(h, k, l), hkl0=(h0, k0, l0),
                                   F_latt=F_latt, omega=omega, polar=polar, capture=capture)
                        if F_latt == 0.0 and not water:
                            rec["F_cell"] = None
                            samples.append(rec)
                            continue
                        F_cell = K.lookup_F(h, k, l, h0, k0, l0, fs)
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
    det = model.scene.det
    for s in range(ymin, ymax + 1):
        for f in range(xmin, xmax + 1):
            if det.use_mask and det.mask[s, f] == 0:
                continue
            lines.extend(_block(model, f32, f, s, detail=False))
    return lines
