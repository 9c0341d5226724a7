"""nanoBragg-style reports: the resolved settings and the run statistics.

The lines use nanoBragg.c's words, order and ``%g`` formatting, so that the two
programs' logs can be compared with ``diff``.
"""

from __future__ import annotations

import numpy as np

from .units import RTD

# the words nanoBragg prints for each spot shape, and the short names in its settings
_SHAPE_NAMES = {"square": "parallelpiped", "round": "ellipsoidal", "gauss": "gaussian", "tophat": "tophat-spot",
                "gauss_domain": "gaussian domain"}
_SHAPE_KEYS = {"square": "parallelpiped", "round": "ellipsoidal", "gauss": "gaussian", "tophat": "tophat",
               "gauss_domain": "gaussian_domain"}


def _g(x):
    return "%g" % x


def resolved_settings(model):
    """The settings nanoBragg derives, as a dict (keys as in the golden ``c_resolved``)."""
    d = model.detector
    c = model.crystal
    s = model.sources
    exp = model.experiment
    flags = []
    if exp.sampling.oversample_thick:
        flags.append("+thick")
    if exp.sampling.oversample_polar:
        flags.append("+polar")
    if exp.sampling.oversample_omega:
        flags.append("+omega")
    return {
        "convention": d.convention,
        "pivot": d.pivot,
        "oversample": model.oversample,
        "oversample_auto_selected": model.oversample_auto,
        "oversample_flags": flags,
        "sources": int(len(s.wavelengths)),
        "divergence_steps": s.divsteps,
        "dispersion_steps": s.dispsteps,
        "mosaic_domains": c.mosaic_domains,
        "phisteps": c.phisteps,
        "thicksteps": d.thicksteps,
        "sensor_thick_m": d.thick,
        "sensor_mu_per_m": d.mu,
        "hkls": model.structure.hkls,
        "kahn_polarization": None if exp.beam.nopolar else exp.beam.polarization,
        "polarization_disabled": bool(exp.beam.nopolar),
        "xtal_shape": _SHAPE_KEYS[c.shape],
        "cells": "%.0fx%.0fx%.0f" % (c.Na, c.Nb, c.Nc),
        "wavelength_m": model.wavelength,
        "fluence": model.fluence,
        "distance_m": d.distance,
        "detsize_f_m": d.detsize_f,
        "detsize_s_m": d.detsize_s,
        "pixel_m": d.pixel,
        "fpixels": d.fpixels,
        "spixels": d.spixels,
        "Xbeam_Ybeam_m": [d.Xbeam, d.Ybeam],
        "Fbeam_Sbeam_m": [d.Fbeam, d.Sbeam],
        "Xclose_Yclose_m": [d.Xclose, d.Yclose],
        "Fclose_Sclose_m": [d.Fclose, d.Sclose],
        "fdet_vector": d.fdet.tolist(),
        "sdet_vector": d.sdet.tolist(),
        "odet_vector": d.odet.tolist(),
        "beam_vector": d.beam.tolist(),
        "spindle_axis": d.spindle.tolist(),
        "dials_origin_mm": d.dials_origin.tolist(),
        "roi": list(d.roi),
        "interpolation": model.structure.interpolation_mode,
        "ORGX_ORGY": [d.ORGX, d.ORGY],
        "close_distance_m": d.close_distance,
        "steps": model.steps,
    }


def setup_lines(model, notes=(), seed=None, noise=True, mask_name="mask"):
    """The set-up part of nanoBragg's log, from a resolved model."""
    d = model.detector
    c = model.crystal
    s = model.sources
    st = model.structure
    exp = model.experiment
    out = []
    out.append(f"{d.convention} convention selected.")
    out.append("pivoting detector around sample" if d.pivot == "sample" else "pivoting detector around direct beam spot")
    xb = d.xds_incident_beam
    out.append("XDS incident beam: %g %g %g" % (xb[0], xb[1], xb[2]))
    mode = st.interpolation_mode
    if mode == "auto-on":
        out.append("auto-selected tricubic interpolation of structure factors")
    elif mode == "auto-off":
        out.append("auto-selected no interpolation")
    out.extend(n for n in notes if n.startswith("reading"))
    out.extend(n for n in notes if n.startswith("random orientation"))
    real = c.real0 @ np.eye(3)
    la, lb, lc, al, be, ga = c.cell
    out.append("Unit Cell: %g %g %g %g %g %g" % (la, lb, lc, al, be, ga))
    rec = c.recip0
    rl = np.sqrt((rec ** 2).sum(axis=1))

    def ang(u, v):
        return np.degrees(np.arccos(np.clip(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))
    out.append("Recp Cell: %g %g %g %g %g %g" % (rl[0], rl[1], rl[2], ang(rec[1], rec[2]), ang(rec[0], rec[2]),
                                                 ang(rec[0], rec[1])))
    out.append("volume = %g A^3" % c.volume)
    out.append("real-space cell vectors (Angstrom):")
    out.append("     %-10s  %-10s  %-10s" % ("a", "b", "c"))
    ra = real * 1e10
    for i, ax in enumerate("XYZ"):
        out.append("%s: %11.8f %11.8f %11.8f" % (ax, ra[0, i], ra[1, i], ra[2, i]))
    out.append("reciprocal-space cell vectors (Angstrom^-1):")
    out.append("     %-10s  %-10s  %-10s" % ("a_star", "b_star", "c_star"))
    for i, ax in enumerate("XYZ"):
        out.append("%s: %11.8f %11.8f %11.8f" % (ax, rec[0, i], rec[1, i], rec[2, i]))
    lens = np.sqrt((c.real0 ** 2).sum(axis=1))
    out.append("crystal is %g x %g x %g microns" % (lens[0] * c.Na * 1e6, lens[1] * c.Nb * 1e6, lens[2] * c.Nc * 1e6))
    if model.oversample_auto:
        out.append("auto-selected %d-fold oversampling" % model.oversample)
    # nanoBragg's rough molecular weight: crystal volume * 1.2 g/cm^3 / number of cells
    out.append("approximate MW = %g" % (lens[0] * lens[1] * lens[2] * 1.2e6 * 6.02214179e23))
    for t in range(d.thicksteps):
        out.append("thick%d = %g um" % (t, d.thickstep * t * 1e6))
    for t, phi in enumerate(c.phis):
        out.append("phi%d = %g" % (t, phi * RTD))
    if not s.from_file:
        for h, v in s.divergence_offsets:
            out.append("divergence deviation: %g %g" % (h, v))
        for t, lam in enumerate(s.lambdas):
            out.append("lambda%d = %.15g" % (t, lam))
    out.append("  created a total of %d sources:" % len(s.wavelengths))
    for x, y, z, w, lam in s.listing:
        out.append("%g %g %g   %g %g" % (x, y, z, w, lam))
    out.append("  created a total of %d mosaic domains" % c.mosaic_domains)
    out.append("  %d initialized hkls (all others =%g)" % (st.hkls, st.default_F))
    out.append("  %s xtal: %.0fx%.0fx%.0f cells" % (_SHAPE_NAMES[c.shape], c.Na, c.Nb, c.Nc))
    out.append("  wave=%g meters +/- %g%% in %d steps" % (model.wavelength, s.disp[0] * 100, s.dispsteps))
    if exp.beam.nopolar:
        out.append("  polarization effect disabled")
    else:
        out.append("  Kahn polarization factor: %f" % exp.beam.polarization)
    if d.curved:
        out.append("  curved detector: all pixels same distance from origin")
    if d.point_pixel:
        out.append("  pixel obliquity effect disabled")
    out.append("  incident fluence: %g photons/m^2" % model.fluence)
    out.append("  distance=%g detsize=%gx%g  pixel=%g meters (%dx%d pixels)" % (
        d.distance, d.detsize_f, d.detsize_s, d.pixel, d.fpixels, d.spixels))
    out.append("  sensor is %g m thick in %d layers with mu= %g" % (d.thick, d.thicksteps, d.mu))
    out.append("  Xbeam=%g Ybeam=%g" % (d.Xbeam, d.Ybeam))
    out.append("  Fbeam=%g Sbeam=%g" % (d.Fbeam, d.Sbeam))
    out.append("  Xclose=%g Yclose=%g" % (d.Xclose, d.Yclose))
    out.append("  Fclose=%g Sclose=%g" % (d.Fclose, d.Sclose))
    out.append("  DIRECTION_OF_DETECTOR_X-AXIS= %g %g %g" % tuple(d.fdet))
    out.append("  DIRECTION_OF_DETECTOR_Y-AXIS= %g %g %g" % tuple(d.sdet))
    out.append("  DIRECTION_OF_DETECTOR_Z-AXIS= %g %g %g" % tuple(d.odet))
    out.append("  INCIDENT_BEAM_DIRECTION= %g %g %g" % tuple(d.beam))
    out.append("  spindle ROTATION_AXIS= %g %g %g" % tuple(d.spindle))
    pn = np.cross(d.beam, d.polar)
    out.append("  POLARIZATION_PLANE_NORMAL= %g %g %g" % tuple(pn))
    out.append("  dials origin= %g %g %g" % tuple(d.dials_origin))
    out.append("  roi: %d < x < %d && %d < y < %d" % tuple(d.roi))
    out.append("  hdivrange=%g hdivstep=%g  radians" % (s.hdiv[0], s.hdiv[1]))
    out.append("  vdivrange=%g vdivstep=%g  radians" % (s.vdiv[0], s.vdiv[1]))
    out.append("  %d divergence steps" % s.divsteps)
    out.append("  %d sources" % len(s.wavelengths))
    out.append("  %d mosaic domains over mosaic spread of %g degrees" % (c.mosaic_domains, c.mosaic_spread * RTD))
    out.append("  %d phi steps from %g to %g degrees" % (c.phisteps, c.phi0 * RTD, (c.phi0 + c.osc) * RTD))
    flags = "".join(f for f, on in ((" +thick", exp.sampling.oversample_thick), (" +polar", exp.sampling.oversample_polar),
                                    (" +omega", exp.sampling.oversample_omega)) if on)
    out.append("  %dx%d pixel oversample steps%s" % (model.oversample, model.oversample, flags))
    if exp.detector.mask is not None:
        out.append("  skipping zero-flagged pixels in %s" % mask_name)
    if noise and seed is not None:
        out.append("")
        out.append("  noise image paramters:")
        out.append("  seed: %d" % seed)
        out.append("  water droplet size: %g m" % model.water)
    return out


def stats_lines(stats):
    """The statistics nanoBragg prints after rendering."""
    return [
        "solid angle subtended by detector = %g steradian ( %g%% sphere)" % (
            stats.solid_angle_sr, 100 * stats.solid_angle_sr / 4 / np.pi),
        "max_I = %g  at %g %g" % (stats.max_I, stats.max_I_fast_m, stats.max_I_slow_m),
        "mean= %g rms= %g rmsd= %g" % (stats.mean, stats.rms, stats.rmsd),
    ]
