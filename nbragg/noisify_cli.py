"""``nbragg-noisify``: noisify.c's command line (nanoBragg suite, James Holton).

Turns a float image of photons per pixel (a nanoBragg ``-floatfile``) into the SMV and
PGM files noisify.c writes, byte for byte with the same seeds: a noiseless integer image,
a greymap and a noise image.  Flags are matched as the C matches them (``-readout``
also reads ``-readout_noise``, ``-psf_rad`` ``-psf_radius``...), but a flag the C would
ignore gets a warning, and a missing or malformed value is an error naming the flag.

Departures from the C, each documented in the README: the noise seed defaults to 1
(the C takes it from the clock); negative pixel values are clipped to 0 (the C lets
them wrap around); a float file shorter than the grid is an error (the C reads zeros);
``-bits`` other than 16 or 32 and an unknown ``-psf`` type are errors.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError, InputFileError, console_main, console_streams, help_or_version

USAGE = """\
usage: nbragg-noisify -floatfile FILE [flags]      (noisify.c's flags; the same files are written)

input       -floatfile FILE (float32 photons/pixel; also any argument containing floatimage.bin)
            -header FILE.img (grid, pixel and header from an SMV file)   -detpixels n (-detpixels_x/_y)
            -pixel mm   -scale s   -fluence ph/m^2
noise       -seed n   -calibration frac -calib_seed n   -flicker frac   -readout_noise ADU   -nonoise
detector    -gain ADU/photon   -adc ADU   -bits 16|32   -psf gauss|fiber -psf_fwhm um -psf_radius px
header      -distance mm -lambda A -Xbeam -Ybeam mm -phi deg -osc deg
output      -intfile F -noisefile F -pgmfile F   -nopgm
            -h / --help (this text)   --version
"""

DEFAULT_SEED = 1     # the C seeds from the clock; a fixed, printed seed keeps runs repeatable


@dataclass
class Settings:
    """noisify.c's variables, with its defaults."""

    floatfile: str | None = None
    headerfile: str | None = None
    intfile: str = "intimage.img"
    pgmfile: str = "image.pgm"
    noisefile: str = "noiseimage.img"
    distance: float = 100.0e-3
    detsize_x: float = 102.4e-3
    detsize_y: float = 102.4e-3
    pixel: float = 0.1e-3
    Xbeam: float = -1e99
    Ybeam: float = -1e99
    xpixels: int = 0
    ypixels: int = 0
    wavelength: float = 1.0
    psf: str | None = None
    psf_fwhm: float = float(np.float32(46e-6))     # a C float
    psf_radius: int = 0
    bits: int = 16
    readout: float = 0.0
    flicker: float = 0.0
    calibration: float = 0.03
    adc: float = 40.0
    gain: float = 1.0
    calculate_noise: bool = True
    write_pgm: bool = True
    phi: float = 0.0
    osc: float = 1.0
    fluence: float = 125932015286227086360700780544.0
    scale: float = 1.0
    seed: int = -DEFAULT_SEED
    calib_seed: int = 123456789


def _number(flag, text):
    try:
        x = float(text)
    except ValueError:
        raise ArgumentError(f"{flag}: value {text!r} is not a number") from None
    if not math.isfinite(x):
        raise ArgumentError(f"{flag}: value {text!r} is not a finite number")
    return x


def _integer(flag, text):
    x = _number(flag, text)
    if x != int(x):
        raise ArgumentError(f"{flag}: value {text!r} is not an integer")
    return int(x)


def _psf_type(flag, text):
    for name in ("gauss", "fiber"):      # the C looks for these words inside the value
        if name in text:
            return name
    raise ArgumentError(f"{flag}: unknown point-spread function {text!r} (choose gauss or fiber)")


def _c_int(value):
    """What C's atoi makes of an integer: clamped to a long by strtol, then cut to an int."""
    value = max(-2 ** 63, min(2 ** 63 - 1, value))
    return (value + 2 ** 31) % 2 ** 32 - 2 ** 31


def _set(attr, kind=float, scale=None, negate=False):
    def act(st, flag, text):
        if kind is str:
            value = text
        elif kind is int:
            value = _c_int(_integer(flag, text))
        else:
            value = _number(flag, text)
        if scale is not None:
            value = value * scale
        if negate:
            value = -value
        setattr(st, attr, value)
    return act


def _both(a, b, kind=float, scale=None):
    first, second = _set(a, kind, scale), _set(b, kind, scale)

    def act(st, flag, text):
        first(st, flag, text)
        second(st, flag, text)
    return act


def _psf_fwhm(st, flag, text):
    st.psf_fwhm = float(np.float32(_number(flag, text) / 1e6))


def _psf_radius(st, flag, text):
    r = _number(flag, text)
    if r <= -1:
        raise ArgumentError(f"{flag}: value {text!r} must be 0 (automatic) or a positive number of pixels")
    st.psf_radius = int(min(r, 2 ** 31 - 1))      # the C truncates to an int


def _bits(st, flag, text):
    b = _integer(flag, text)
    if b not in (16, 32):
        raise ArgumentError(f"{flag}: value {text!r}: SMV images here have 16 or 32 bits")
    st.bits = b


def _off(attr):
    def act(st, flag, text):
        setattr(st, attr, False)
    return act


def _no_effect(st, flag, text):
    _integer(flag, text)


# (names, the C's test of the word, takes a value, action); the C tries every rule on
# every word, so a word may match several
RULES = [
    (("-lambda",), lambda a: "-lambda" in a, True, _set("wavelength")),
    (("-Xbeam",), lambda a: "-Xbeam" in a, True, _set("Xbeam", scale=1e-3)),
    (("-Ybeam",), lambda a: "-Ybeam" in a, True, _set("Ybeam", scale=1e-3)),
    (("-distance",), lambda a: "-distance" in a, True, _set("distance", scale=1e-3)),
    (("-detsize",), lambda a: "-detsize" in a and len(a) == 8, True, _both("detsize_x", "detsize_y", scale=1e-3)),
    (("-detsize_x",), lambda a: "-detsize_x" in a, True, _set("detsize_x", scale=1e-3)),
    (("-detsize_y",), lambda a: "-detsize_y" in a, True, _set("detsize_y", scale=1e-3)),
    (("-detpixels",), lambda a: "-detpixels" in a and len(a) == 10, True, _both("xpixels", "ypixels", int)),
    (("-detpixels_x",), lambda a: "-detpixels_x" in a, True, _set("xpixels", int)),
    (("-detpixels_y",), lambda a: "-detpixels_y" in a, True, _set("ypixels", int)),
    (("-pixel",), lambda a: "-pixel" in a, True, _set("pixel", scale=1e-3)),
    (("-psf",), lambda a: "-psf" in a and len(a) == 4, True,
     lambda st, f, t: setattr(st, "psf", _psf_type(f, t))),
    (("-psf_radius",), lambda a: "-psf_rad" in a, True, _psf_radius),
    (("-psf_fwhm", "-psf_size", "-psf_width"), lambda a: "-psf_si" in a or "-psf_fw" in a or "-psf_wi" in a, True,
     _psf_fwhm),
    (("-fluence",), lambda a: "-fluence" in a, True, _set("fluence")),
    (("-floatfile", "-floatimage", "-bin"), lambda a: "-floatfile" in a or "-floatimage" in a or "-bin" in a, True,
     _set("floatfile", str)),
    (("-header",), lambda a: "-header" in a, True, _set("headerfile", str)),
    (("-pgmfile", "-pgmimage"), lambda a: "-pgmfile" in a or "-pgmimage" in a, True, _set("pgmfile", str)),
    (("-intfile", "-intimage"), lambda a: "-intfile" in a or "-intimage" in a, True, _set("intfile", str)),
    (("-bits",), lambda a: "-bits" in a, True, _bits),
    (("-noisefile", "-noiseimage"), lambda a: "-noisefile" in a or "-noiseimage" in a, True,
     _set("noisefile", str)),
    (("-nonoise",), lambda a: "-nonoise" in a, False, _off("calculate_noise")),
    (("-nopgm",), lambda a: "-nopgm" in a, False, _off("write_pgm")),
    (("-readout_noise", "-readnoise", "-readout"), lambda a: "-readout" in a or "-readnoi" in a, True,
     _set("readout")),
    (("-flicker",), lambda a: "-flicker" in a, True, _set("flicker")),
    (("-calibration",), lambda a: "-calibration" in a, True, _set("calibration")),
    (("-scale",), lambda a: "-scale" in a, True, _set("scale")),
    (("-seed",), lambda a: "-seed" in a, True, _set("seed", int, negate=True)),
    (("-calib_seed",), lambda a: "-calib_seed" in a, True, _set("calib_seed", int, negate=True)),
    (("-badpix_seed", "-hotpix_seed"), lambda a: "-badpix_seed" in a or "-hotpix_seed" in a, True, _no_effect),
    (("-adc",), lambda a: "-adc" in a, True, _set("adc")),
    (("-gain",), lambda a: "-gain" in a, True, _set("gain")),
    (("-phi",), lambda a: "-phi" in a, True, _set("phi")),
    (("-osc",), lambda a: "-osc" in a, True, _set("osc")),
]
KNOWN = sorted({n for names, _, _, _ in RULES for n in names})
NO_EFFECT = {"-badpix_seed", "-hotpix_seed"}


def parse(argv, warn):
    """noisify.c's argument loop -> Settings (errors name the flag)."""
    st = Settings()
    consumed = set()
    for i, a in enumerate(argv):
        if "floatimage.bin" in a:             # the C takes any such word as the input
            st.floatfile = a
            continue
        if not a.startswith("-"):
            continue
        matched = [(names, takes, act) for names, test, takes, act in RULES if test(a)]
        if not matched:
            if i not in consumed:
                close = difflib.get_close_matches(a, KNOWN, n=1, cutoff=0.75)
                warn(f"unknown flag {a} ignored" + (f"; did you mean {close[0]}?" if close else ""))
            continue
        exact = any(a in names for names, _, _ in matched)
        if not exact and i not in consumed:
            warn(f"{a} is not a noisify flag; noisify.c reads it as {matched[0][0][0]}")
        if a in NO_EFFECT:
            warn(f"{a} has no effect (noisify.c reads it and uses it nowhere)")
        for names, takes, act in matched:
            if takes:
                if i + 1 >= len(argv):
                    raise ArgumentError(f"{a}: missing value")
                act(st, a, argv[i + 1])
                consumed.add(i + 1)
            else:
                act(st, a, None)
    return st


def _grid(st, nvalues, warn, say):
    """The pixel grid as the C settles it (header, flags, or a guess from the size)."""
    x, y = st.xpixels, st.ypixels
    if x < 0 or y < 0:
        raise ArgumentError(f"-detpixels: {x}x{y} pixels is not a detector size")
    if not x and not y:
        warn("guessing xy pixel dimensions from the size of the input image (give -detpixels)")
        x = int(math.sqrt(nvalues))
        y = nvalues // x if x else 0
        while nvalues != x * y and x > 0:
            x -= 1
            y = nvalues // x
        if nvalues != x * y:
            x, y = nvalues, 1
    if x and not y:
        y = nvalues // x
    if not x and y:
        x = nvalues // y
    if x < 1 or y < 1:
        raise ArgumentError(f"-detpixels (-detpixels_x, -detpixels_y): the input's {nvalues} values make no "
                            f"{x}x{y} grid")
    return x, y


def run(argv, stdout=None, stderr=None):
    """Run the command line; returns the exit status.  Raises NbraggError on user errors."""
    from .io.atomic import check_output_paths
    from .io.pgm import pgm_bytes
    from .io.atomic import atomic_write
    from .io._text import read_bytes
    from .io.smv import noisify_header, read_smv, write_smv_raw
    from .noisify import noisify

    say, warn = console_streams(stdout, stderr)
    out = stdout or sys.stdout
    early = help_or_version("nbragg-noisify", USAGE, argv, out)
    if early is not None:
        return early
    st = parse(list(argv), warn)
    if st.floatfile is None:
        raise ArgumentError("no input image: give -floatfile FILE (float32 photons per pixel); -h lists the flags")
    raw = read_bytes(st.floatfile, "-floatfile: input image")
    check_output_paths(st, st.write_pgm, st.calculate_noise, float_out=False)

    say("nbragg-noisify: add noise to pixels (noisify by James Holton)")
    nvalues = len(raw) // 4
    header = None
    if st.headerfile is not None:
        say(f"taking header from {st.headerfile}")
        smv = read_smv(st.headerfile, what="-header", header_only=True)
        say(f"reading {st.headerfile}")
        header = smv.raw_header
        st.xpixels, st.ypixels = smv.width, smv.height
        v = smv.value("PIXEL_SIZE")
        if v == v:
            st.pixel = v / 1000.0
        st.detsize_x = st.pixel * st.xpixels
        st.detsize_y = st.pixel * st.ypixels
        v = smv.value("DISTANCE")
        if v == v:
            st.distance = v / 1000.0
        v = smv.value("BEAM_CENTER_X")
        if v == v:
            st.Xbeam = v / 1000.0
        v = smv.value("BEAM_CENTER_Y")
        if v == v:
            st.Ybeam = st.detsize_y - v / 1000.0
    if st.pixel <= 0:
        raise ArgumentError(f"-pixel: pixel size {st.pixel * 1000:g} mm must be positive")
    xpixels, ypixels = _grid(st, nvalues, warn, say)
    st.detsize_x = st.pixel * xpixels
    st.detsize_y = st.pixel * ypixels
    pixels = xpixels * ypixels
    if nvalues < pixels:
        raise InputFileError(f"-floatfile: {st.floatfile!r} holds {nvalues} values; the {xpixels}x{ypixels} grid "
                             f"needs {pixels}")
    if nvalues > pixels or len(raw) % 4:
        warn(f"{st.floatfile} holds {len(raw)} bytes; using the first {pixels} float32 values "
             f"({xpixels}x{ypixels})")
    image = np.frombuffer(raw[:4 * pixels], dtype="<f4").reshape(ypixels, xpixels)
    bad = np.flatnonzero(~np.isfinite(image.ravel()))
    if bad.size:
        raise InputFileError(f"-floatfile: {st.floatfile!r} has {bad.size} values that are not finite (the first, "
                             f"{image.ravel()[bad[0]]}, at pixel {bad[0] % xpixels},{bad[0] // xpixels})")
    say(f"importing {pixels} pixel intensites: {st.floatfile}")
    if st.Xbeam <= -1e99:
        st.Xbeam = st.detsize_x / 2.0
    if st.Ybeam <= -1e99:
        st.Ybeam = st.detsize_y / 2.0
    if not st.calculate_noise:
        st.calibration = st.readout = st.flicker = 0.0

    say("  distance=%g detsize=%gx%g  pixel=%g meters (%dx%d pixels)" % (st.distance, st.detsize_x, st.detsize_y,
                                                                         st.pixel, xpixels, ypixels))
    say("  Xbeam=%g Ybeam=%g" % (st.Xbeam, st.Ybeam))
    if st.psf is not None:
        line = "  %s PSF fwhm = %g um " % ("Gaussian" if st.psf == "gauss" else "fiber", st.psf_fwhm * 1e6)
        if st.psf_radius == 0:
            say(line + "  with automatic rendering radius")
            line = ""
        say(line + "  with rendering radius: %d" % st.psf_radius)
    say("  seed: %d" % st.seed)
    say("  calibration noise seed: %d" % st.calib_seed)
    say("  calibration_noise = %g %%" % (st.calibration * 100))
    say("  input file scale = %g" % st.scale)
    say("  readout_noise = %g ADU" % st.readout)
    say("  flicker_noise = %g %%" % (st.flicker * 100))
    say("  quantum_gain = %g ADU/photon" % st.gain)
    say("  adc_offset = %g ADU" % st.adc)
    say("")
    negative = int(np.count_nonzero(image < 0))
    if negative:
        first = int(np.flatnonzero(image.ravel() < 0)[0])
        warn(f"{negative} negative intensities in {st.floatfile} (the first, {image.ravel()[first]:g}, at pixel "
             f"{first % xpixels},{first // xpixels})")
    max_I = max(0.0, float(image.max()))
    say("maximum value in input file: %g ( %g on photon scale)" % (max_I, max_I * st.scale * st.fluence
                                                                     * 7.94079248018965e-30))
    fwhm_pixels = st.psf_fwhm / st.pixel
    use_psf = st.psf if st.psf is not None and st.psf_fwhm > 0.0 else None
    result = noisify(image, scale=st.scale, fluence=st.fluence, gain=st.gain, adc=st.adc, readout=st.readout,
                     flicker=st.flicker, calibration=st.calibration, psf=use_psf, psf_fwhm_pixels=fwhm_pixels,
                     psf_radius=st.psf_radius, bits=st.bits, seed=st.seed, calib_seed=st.calib_seed,
                     calculate_noise=st.calculate_noise)

    def psf_lines(run):
        if st.psf_radius <= 0:
            say("  maximum input photon/pixel: %g" % run.max_input)
            if run.max_input <= 0.0:
                say("WARNING: no photons, PSF skipped")
                return
            say("  auto-selected psf_radius = %d pixels" % run.auto_radius)
        if run.dropped_pixels:
            warn(f"{run.dropped_pixels} pixels under 0.01 photons have no automatic PSF radius; their light is "
                 "dropped, as in noisify.c (give -psf_radius)")
        say("adding back %g lost photons" % run.lost_added_back)

    if not st.calculate_noise and use_psf is not None:
        say("  applying PSF to noiseless image width = %g pixels" % fwhm_pixels)
        psf_lines(result.psf)
    nbytes = st.bits // 8
    say("writing %s as %d %d-byte integers" % (st.intfile, pixels, nbytes))
    head = header if header is not None else noisify_header(
        xpixels, ypixels, st.pixel * 1000.0, st.distance * 1000.0, st.wavelength, st.Xbeam * 1000.0,
        (st.detsize_y - st.Ybeam) * 1000, st.phi, st.osc, st.bits)
    write_smv_raw(st.intfile, head, result.int16 if st.bits == 16 else result.int32)
    if header is not None and st.bits == 32:
        warn(f"-header with -bits 32: the copied header of {st.headerfile} still says its own TYPE, as noisify.c "
             "writes it")
    if st.write_pgm:
        say("writing %s as 1-byte integers" % st.pgmfile)
        atomic_write(st.pgmfile, pgm_bytes(np.minimum(result.int16, 255).astype(np.uint8), 1.0))
    if result.negative_clipped:
        warn(f"{result.negative_clipped} pixel values below 0 were set to 0 (noisify.c wraps them around)")
    if not st.calculate_noise:
        return 0
    if use_psf is not None:
        say("%.0f photons on noise image before PSF" % result.photons_before_psf)
        say("  applying PSF width = %g um" % (st.psf_fwhm * 1e6))
        psf_lines(result.psf)
    say("%.0f photons on noise image (%d overloads)" % (result.photons_on_noise_image, result.overloads))
    say("writing %s as %d-byte integers" % (st.noisefile, nbytes))
    write_smv_raw(st.noisefile, head, result.noise16 if st.bits == 16 else result.noise32)
    return 0


def main(argv=None):
    """Console entry point."""
    return console_main("nbragg-noisify", run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
