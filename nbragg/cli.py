"""``nbragg``: the nanoBragg command line.

Takes nanoBragg.c's flags and writes the same files.  nbragg-only flags:
``-threads N`` (CPU threads; default all cores), ``-device cpu|cuda`` (``cuda``: an
NVIDIA GPU through numba-cuda) and ``-precision float64|float32`` (float32: the model
computed in single precision, for speed on GPUs); structure factors from an MTZ
(``-mtz``), an mmCIF reflection file (``-sf_cif``) or a coordinate file (``-model``),
expanded to P1 (``-column``, ``-sf_dmin``; these need gemmi); ``-nxmx FILE`` (an HDF5
NXmx file of the float photons with the detector geometry, every panel in it).
A detector of several panels writes nanoBragg's other outputs one file per panel,
``<stem>_<k><ext>`` (see :func:`panel_paths`).
User errors print one line on stderr and exit with status 2, writing no image.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from .errors import ArgumentError, console_main, help_or_version
from .nbargs import OWN_FLAGS

_OWN_FLAGS = {f: 1 for f in OWN_FLAGS}
COMPILE_NOTICE_S = 3.0


USAGE = """\
usage: nbragg [flags]       (nanoBragg.c's flags; the same files are written)

crystal     -cell a b c al be ga | -mat FILE   -misset x y z | -misset random
            -N n  -Na -Nb -Nc n   -xtalsize mm   -round_xtal -square_xtal -gauss_xtal
            -tophat_spots   -fudge f   -mosaic deg -mosaic_dom n -mosaic_seed n
            -gauss_domain (Gaussian domain of size matrix N; N_ab N_ac N_bc from Python)
structure   -hkl FILE   -default_F F   -interpolate -nointerpolate   -dmin A
            -mtz FILE | -sf_cif FILE  -column LABEL  -sf_dmin A   -model FILE -sf_dmin A  (need gemmi)
beam        -lambda A | -energy eV   -fluence ph/m^2 | -flux ph/s -exposure s -beamsize mm
            -polar k -nopolar   -dispersion % -dispsteps n   -divergence mrad -divsteps n
            -hdivrange -vdivrange mrad  -hdivsteps -vdivsteps n  -round_div -square_div
            -sourcefile FILE   -source_distance mm   -source_weights (honour the file's weights)
            -spectrum FILE (channels: wavelength_A weight; replaces -dispersion)
rotation    -phi deg -osc deg -phistep deg -phisteps n   -spindle_axis x y z
detector    -distance mm | -close_distance mm   -pixel mm   -detpixels n (-detpixels_f/_s)
            -detsize mm   -Xbeam -Ybeam mm | -ORGX -ORGY px | -Xclose -Yclose mm   -pivot beam|sample
            -mosflm -xds -adxv -denzo -dials   -fdet_vector -sdet_vector -odet_vector -beam_vector x y z
            -detector_rotx -detector_roty -detector_rotz -twotheta deg   -twotheta_axis x y z
            -detector_thick um -detector_abs um -detector_thicksteps n   -curved_det   -point_pixel
sampling    -oversample n   -oversample_omega -oversample_polar -oversample_thick   -roi x0 x1 y0 y1
background  -water um
input       -img FILE (header)   -mask FILE (zero pixels skipped)
            -expt FILE (a DIALS experiment list: beam, panels, crystal, scan; flags apply on top)
            -expt_index i (which experiment, from 0)   -expt_image n (which image of its scan)
output      -floatfile F -intfile F -noisefile F -pgmfile F   -nonoise -nopgm   -scale s -pgmscale s
            -adc offset   -seed n   -printout -printout_pixel f s   -noprogress
            -nxmx F (HDF5 NXmx file of the photons and geometry)
nbragg      -threads n (CPU threads)   -device cpu|cuda   -precision float64|float32
            -physical (solid angle, polarization, absorption per sample; water scaled once)
            -h / --help (this text)   --version
many runs   nbragg-resident start (a server that skips the second of start-up; stop, status)

Example: nbragg -cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 256
"""


def _split_own_flags(argv):
    own = {}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _OWN_FLAGS:
            if i + 1 >= len(argv):
                raise ArgumentError(f"{a}: missing value")
            own[a] = argv[i + 1]
            i += 2
            continue
        rest.append(a)
        i += 1
    return own, rest


def _header_fields(model, exp, geometry=None):
    """The SMV header's fields for the model's detector, or for ``geometry`` (one panel's)."""
    d = geometry if geometry is not None else model.detector
    c = model.crystal
    from .units import RTD
    return {
        "fpixels": d.fpixels, "spixels": d.spixels, "pixel_m": d.pixel, "distance_m": d.distance,
        "wavelength_m": model.wavelength, "Xbeam": d.Xbeam, "Ybeam": d.Ybeam, "Fbeam": d.Fbeam,
        "Sbeam": d.Sbeam, "detsize_s": d.detsize_s, "dials_origin": d.dials_origin, "ORGX": d.ORGX,
        "ORGY": d.ORGY, "close_distance_m": d.close_distance, "phi0_deg": c.phi0 * RTD,
        "osc_deg": c.osc * RTD, "twotheta_deg": d.twotheta * RTD,
    }


def panel_paths(path, count):
    """The files one output becomes: ``[path]`` for one panel, else ``<stem>_<k><ext>``
    for panel k, k zero-padded to the width of count - 1 (float_00.bin ... float_63.bin)."""
    if count == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    width = len(str(count - 1))
    return [f"{stem}_{k:0{width}d}{ext}" for k in range(count)]


def panel_noise(images, rois, seed, adc_offset):
    """nanoBragg's noise images for a list of (slow, fast) panels: one generator draws
    through the panels in turn, each panel's ROI in scan order (so panels do not repeat
    each other's noise, and one panel gets nanoBragg's image).  Returns (images, total
    photons, overloads)."""
    # c_noise_image seeds its generator afresh on each call: panels share one stream here
    from .noise import _noise_loop
    from .rng import NRGenerator
    gen = NRGenerator()
    idum = gen.seed_cell(seed)
    out, total, overloads = [], 0.0, 0
    for img, roi in zip(images, rois):
        values = np.ascontiguousarray(img, dtype=np.float32)
        noise = np.zeros(values.shape, dtype=np.uint16)
        t, n = _noise_loop(values, np.asarray(roi, dtype=np.int64), idum, gen.state, gen.fstate,
                           float(adc_offset), noise)
        out.append(noise)
        total += t
        overloads += n
    return out, total, overloads


def write_images(model, exp, f32, stats, o, say):
    """Write nanoBragg's outputs (-floatfile, -intfile, -pgmfile, -noisefile) of the float32
    image ``f32`` with its report lines.  One panel: nanoBragg's files.  Several panels
    (f32 of shape (panels, slow, fast)): one file per panel and output, named by
    :func:`panel_paths`, each with its own panel's header; the scales (from statistics
    over every panel) are shared, so that panels compare."""
    from .io.pgm import write_float, write_pgm
    from .io.smv import write_smv
    from .noise import c_int_image, c_noise_image, c_pgm_image, intfile_scale
    from .report import stats_lines

    lines = stats_lines(stats)
    if f32.ndim == 2:
        images, rois = [f32], [model.detector.roi]
        fields = [_header_fields(model, exp)]
    else:
        from .models.detector import first_panel_geometry
        images, rois = list(f32), [p.roi for p in model.panels]
        fields = [_header_fields(model, exp, first_panel_geometry(model.detector, p)) for p in model.panels]
    count = len(images)

    say(lines[0])
    for path, img in zip(panel_paths(o.floatfile, count), images):
        say("writing %s as %d %d-byte floats" % (path, img.size, 4))
        write_float(path, img)
    say(lines[1])
    say(lines[2])
    scale = intfile_scale(o.intfile_scale, stats.max_I)
    say("intfile_scale = %g" % scale)
    for path, img, roi, fld in zip(panel_paths(o.intfile, count), images, rois, fields):
        say("writing %s as %d-byte integers" % (path, 2))
        write_smv(path, c_int_image(img, roi, scale, o.adc_offset), fld)
    if o.write_pgm:
        pgm_scale = o.pgm_scale
        if pgm_scale <= 0.0:
            pgm_scale = scale
            if stats.rmsd > 0.0:
                pgm_scale = 250.0 / (5.0 * stats.rmsd)
        say("pgm_scale = %g" % pgm_scale)
        for path, img, roi in zip(panel_paths(o.pgmfile, count), images, rois):
            say("writing %s as %d-byte integers" % (path, 1))
            write_pgm(path, c_pgm_image(img, roi, pgm_scale), pgm_scale)
    if o.calculate_noise:
        if count == 1:
            noise, total, overloads = c_noise_image(f32, rois[0], o.seed, o.adc_offset)
            noises = [noise]
        else:
            noises, total, overloads = panel_noise(images, rois, o.seed, o.adc_offset)
        say("%.0f photons on noise image (%d overloads)" % (total, overloads))
        for path, noise, fld in zip(panel_paths(o.noisefile, count), noises, fields):
            say("writing %s as %d-byte integers" % (path, 2))
            write_smv(path, noise, fld, noise=True)


def run(argv, stdout=None, stderr=None):
    """Run the command line; returns the exit status.  Raises NbraggError on user errors."""
    from . import engine
    from .io.atomic import check_output_path, check_output_paths
    from .nbargs import parse_nanobragg_args
    from .report import setup_lines

    out = stdout or sys.stdout
    err = stderr or sys.stderr

    def say(line=""):
        print(line, file=out)

    early = help_or_version("nbragg", USAGE, argv, out)
    if early is not None:
        return early

    def warn(msg):
        print(f"WARNING: {msg}", file=err)

    own, argv = _split_own_flags(list(argv))
    threads = None
    if "-threads" in own:
        try:
            threads = int(own["-threads"])
        except ValueError:
            raise ArgumentError(f"-threads: value {own['-threads']!r} is not an integer") from None
        if threads < 1:
            raise ArgumentError(f"-threads: value {threads} must be at least 1")
        import numba
        most = numba.config.NUMBA_NUM_THREADS
        if threads > most:
            warn(f"-threads {threads}: this machine runs at most {most} threads; using {most}")
            threads = most
    device = own.get("-device", "cpu")
    if device not in engine.BACKENDS:
        raise ArgumentError(f"-device: {device!r} is not known (choose {' or '.join(engine.BACKENDS)})")
    engine.check_backend(device)
    precision = own.get("-precision", "float64")
    if precision not in engine.PRECISIONS:
        raise ArgumentError(f"-precision: {precision!r} is not known (choose {' or '.join(engine.PRECISIONS)})")

    parsed = parse_nanobragg_args(argv, warn=warn)
    o = parsed.outputs
    exp = parsed.experiment
    check_output_paths(o, o.write_pgm, o.calculate_noise)
    if o.nxmxfile is not None:
        check_output_path(o.nxmxfile, "-nxmx")

    model = engine.build_model(exp, warn=warn)
    say("nbragg nanocrystal diffraction simulator (nanoBragg by James Holton and Ken Frankel)")
    for line in setup_lines(model, notes=parsed.notes, seed=o.seed, noise=o.calculate_noise,
                            mask_name=parsed.maskfile or "mask"):
        say(line)

    bar = None
    if o.progress and not o.printout and model.inner_evaluations > 2e7:
        from tqdm import tqdm
        bar = tqdm(total=model.roi_clipped[3] - model.roi_clipped[2] + 1, unit="rows",
                   file=err, leave=False, desc="nbragg")

    # the first run on a machine compiles the kernels (a minute or so, then cached): one
    # pixel is rendered first, and if it has not come back after a few seconds, say so
    import threading
    compiling = threading.Timer(COMPILE_NOTICE_S, lambda: print(
        "nbragg: compiling the kernels for this machine (first run only; they are cached afterwards)...",
        file=err, flush=True))
    compiling.start()
    try:
        engine.prepare(model, backend=device, precision=precision)
    finally:
        compiling.cancel()

    def progress(done, total):
        bar.update(done - bar.n)
    try:
        image, omega_sum = engine.render(model, backend=device, threads=threads,
                                         progress=progress if bar is not None else None, precision=precision)
    finally:
        if bar is not None:
            bar.close()
    f32 = image.astype(np.float32)
    stats = engine.compute_stats(model, f32, omega_sum)
    if o.printout:
        from .trace import printout_lines
        for line in printout_lines(model, f32, o.printout_pixel):
            say(line)
    say("")
    write_images(model, exp, f32, stats, o, say)
    if o.nxmxfile is not None:
        from .io.nexus import write_nxmx_file
        say("writing %s as NXmx (HDF5) with %d 4-byte floats" % (o.nxmxfile, f32.size))
        write_nxmx_file(o.nxmxfile, model, f32)
    return 0


def main(argv=None):
    """Console entry point."""
    return console_main("nbragg", run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
