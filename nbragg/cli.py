"""``nbragg``: the nanoBragg command line.

Takes nanoBragg.c's flags and writes the same files.  nbragg-only flags:
``-threads N`` (CPU threads; default all cores), ``-device cpu|cuda`` (``cuda``: an
NVIDIA GPU through numba-cuda) and ``-precision float64|float32`` (float32: the model
computed in single precision, for speed on GPUs); structure factors from an MTZ
(``-mtz``), an mmCIF reflection file (``-sf_cif``) or a coordinate file (``-model``),
expanded to P1 (``-column``, ``-sf_dmin``; these need gemmi).
User errors print one line on stderr and exit with status 2, writing no image.
"""

from __future__ import annotations

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
structure   -hkl FILE   -default_F F   -interpolate -nointerpolate   -dmin A
            -mtz FILE | -sf_cif FILE  -column LABEL  -sf_dmin A   -model FILE -sf_dmin A  (need gemmi)
beam        -lambda A | -energy eV   -fluence ph/m^2 | -flux ph/s -exposure s -beamsize mm
            -polar k -nopolar   -dispersion % -dispsteps n   -divergence mrad -divsteps n
            -hdivrange -vdivrange mrad  -hdivsteps -vdivsteps n  -round_div -square_div
            -sourcefile FILE   -source_distance mm
rotation    -phi deg -osc deg -phistep deg -phisteps n   -spindle_axis x y z
detector    -distance mm | -close_distance mm   -pixel mm   -detpixels n (-detpixels_f/_s)
            -detsize mm   -Xbeam -Ybeam mm | -ORGX -ORGY px | -Xclose -Yclose mm   -pivot beam|sample
            -mosflm -xds -adxv -denzo -dials   -fdet_vector -sdet_vector -odet_vector -beam_vector x y z
            -detector_rotx -detector_roty -detector_rotz -twotheta deg   -twotheta_axis x y z
            -detector_thick um -detector_abs um -detector_thicksteps n   -curved_det   -point_pixel
sampling    -oversample n   -oversample_omega -oversample_polar -oversample_thick   -roi x0 x1 y0 y1
background  -water um
input       -img FILE (header)   -mask FILE (zero pixels skipped)
output      -floatfile F -intfile F -noisefile F -pgmfile F   -nonoise -nopgm   -scale s -pgmscale s
            -adc offset   -seed n   -printout -printout_pixel f s   -noprogress
nbragg      -threads n (CPU threads)   -device cpu|cuda   -precision float64|float32
            -h / --help (this text)   --version

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


def _header_fields(model, exp):
    d = model.detector
    c = model.crystal
    from .units import RTD
    return {
        "fpixels": d.fpixels, "spixels": d.spixels, "pixel_m": d.pixel, "distance_m": d.distance,
        "wavelength_m": model.wavelength, "Xbeam": d.Xbeam, "Ybeam": d.Ybeam, "Fbeam": d.Fbeam,
        "Sbeam": d.Sbeam, "detsize_s": d.detsize_s, "dials_origin": d.dials_origin, "ORGX": d.ORGX,
        "ORGY": d.ORGY, "close_distance_m": d.close_distance, "phi0_deg": c.phi0 * RTD,
        "osc_deg": c.osc * RTD, "twotheta_deg": d.twotheta * RTD,
    }


def run(argv, stdout=None, stderr=None):
    """Run the command line; returns the exit status.  Raises NbraggError on user errors."""
    from . import engine
    from .io.atomic import check_output_paths
    from .io.pgm import write_float, write_pgm
    from .io.smv import write_smv
    from .nbargs import parse_nanobragg_args
    from .noise import c_int_image, c_noise_image, c_pgm_image, intfile_scale
    from .report import setup_lines, stats_lines

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
    stats = engine.compute_stats(model, f32.astype(np.float64), omega_sum)
    if o.printout:
        from .trace import printout_lines
        for line in printout_lines(model, f32, o.printout_pixel):
            say(line)
    say("")
    roi = model.detector.roi
    lines = stats_lines(stats)
    say(lines[0])
    say("writing %s as %d %d-byte floats" % (o.floatfile, f32.size, 4))
    write_float(o.floatfile, f32)
    say(lines[1])
    say(lines[2])
    scale = intfile_scale(o.intfile_scale, stats.max_I)
    say("intfile_scale = %g" % scale)
    fields = _header_fields(model, exp)
    say("writing %s as %d-byte integers" % (o.intfile, 2))
    write_smv(o.intfile, c_int_image(f32, roi, scale, o.adc_offset), fields)
    if o.write_pgm:
        pgm_scale = o.pgm_scale
        if pgm_scale <= 0.0:
            pgm_scale = scale
            if stats.rmsd > 0.0:
                pgm_scale = 250.0 / (5.0 * stats.rmsd)
        say("pgm_scale = %g" % pgm_scale)
        say("writing %s as %d-byte integers" % (o.pgmfile, 1))
        write_pgm(o.pgmfile, c_pgm_image(f32, roi, pgm_scale), pgm_scale)
    if o.calculate_noise:
        noise, total, overloads = c_noise_image(f32, roi, o.seed, o.adc_offset)
        say("%.0f photons on noise image (%d overloads)" % (total, overloads))
        say("writing %s as %d-byte integers" % (o.noisefile, 2))
        write_smv(o.noisefile, noise, fields, noise=True)
    return 0


def main(argv=None):
    """Console entry point."""
    return console_main("nbragg", run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
