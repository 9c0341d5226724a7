"""Trace one pixel: every intermediate quantity of nanoBragg's model (``-printout``).

The tracing mode of the kernels' pixel walk (:mod:`nbragg.kernels.trace`) runs the forward
model of the pixel and records each sample: sub-pixel, source, phi step and mosaic
domain, the scattering vector q, fractional and nearest Miller indices, F_cell, F_latt,
and the solid angle, polarization and capture fraction in force.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import trace as KT


def trace_pixel(model, fpixel, spixel):
    """Return (value in photons, omega, polar, capture, list of sample dicts, the sum I)."""
    value, I, capture, polar, omega, rows = KT.trace_samples(model.scene, fpixel, spixel)
    nmos = model.crystal.mosaic_domains
    samples = []
    for r in rows:
        rec = dict(layer=int(r[KT.C_LAYER]), subS=int(r[KT.C_SUBS]), subF=int(r[KT.C_SUBF]),
                   source=int(r[KT.C_SOURCE]), position=tuple(float(x) for x in r[KT.C_PX:KT.C_PZ + 1]),
                   q=np.array(r[KT.C_QX:KT.C_QZ + 1]), stol=float(r[KT.C_STOL]))
        if r[KT.C_SKIPPED] == 1:
            rec["skipped"] = "dmin"
            samples.append(rec)
            continue
        m = int(r[KT.C_ORIENT])
        rec.update(phi_step=m // nmos, domain=m % nmos, hkl=tuple(float(x) for x in r[KT.C_H:KT.C_L + 1]),
                   hkl0=tuple(int(x) for x in r[KT.C_H0:KT.C_L0 + 1]), F_latt=float(r[KT.C_FLATT]),
                   omega=float(r[KT.C_OMEGA]), polar=float(r[KT.C_POLAR]), capture=float(r[KT.C_CAPTURE]),
                   F_cell=None if r[KT.C_SKIPPED] == 2 else float(r[KT.C_FCELL]))
        if rec["F_cell"] is not None:
            rec["I"] = float(r[KT.C_I])
        samples.append(rec)
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
