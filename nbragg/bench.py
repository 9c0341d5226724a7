"""Benchmarks: ``python -m nbragg.bench``.

Prints inner evaluations per second (pixels * oversample^2 * sources * phi steps *
mosaic domains * sensor layers, per second) of the forward kernel for the standard
cases at 1 and 2 threads, or on the GPU with ``--backend cuda`` (whole call, with the
copies to and from the device, and the kernel alone).  With ``--nanobragg PATH`` it also runs that nanoBragg
binary and ``nbragg`` (the command line, as a separate process) on the same arguments,
alternately, and prints the ratio of their wall-clock times (with ``--resident``, also the
command on a resident server started for the run).  Timings are medians of
``--repeat`` runs; compare ratios from one run, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "B1": "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 1024 -pixel 0.1",
    "B1L": "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 2048 -pixel 0.05",
    "B3": "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 2048 -pixel 0.05",
    "B2": ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 8 -lambda 1.5 -distance 100 -detpixels 512 "
           "-pixel 0.1 -mosaic 0.5 -mosaic_dom 10 -phi 0.1 -osc 0.5 -phisteps 3 -oversample 2"),
}


def _experiment(name):
    """The benchmark's experiment; "B2hkl" is B2 with a structure-factor grid (random F)."""
    from .nbargs import parse_nanobragg_args
    import numpy as np
    if name == "B2hkl":
        exp = parse_nanobragg_args(CASES["B2"].split(), warn=lambda m: None).experiment
        grid = np.random.default_rng(0).uniform(1.0, 100.0, (41, 41, 41))
        return exp.replace(structure=exp.structure.replace(Fhkl=grid, hkl_origin=(-20, -20, -20), hkl_count=grid.size))
    return parse_nanobragg_args(CASES[name].split(), warn=lambda m: None).experiment


def _model(args):
    from .engine import build_model
    from .nbargs import parse_nanobragg_args
    return build_model(parse_nanobragg_args(args.split(), warn=lambda m: None).experiment, warn=lambda m: None)


def _best(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gradient_figures(name, threads, repeat, nparams=15, backend="cpu"):
    """(forward s, gradient-of-everything s, Jacobian s for nparams parameters)."""
    import numpy as np
    from .engine import build_model, render, tangent_image
    from .gradients import raw_gradient
    from .params import SCALAR_PARAMS, input_tangent
    model = build_model(_experiment(name), warn=lambda m: None)
    w = np.random.default_rng(0).uniform(0.5, 1.5, model.shape)
    names = list(SCALAR_PARAMS)

    def everything():
        raw = raw_gradient(model, w, threads=threads, backend=backend)
        for n in names:                      # the chain rule to every named parameter
            raw.contract(input_tangent(model, n))

    tans = np.array([input_tangent(model, n) for n in names[:nparams]])
    tf = _best(lambda: render(model, backend=backend, threads=threads), repeat)
    tg = _best(everything, repeat)
    tj = _best(lambda: tangent_image(model, tans, threads=threads, backend=backend), repeat)
    return tf, tg, tj


def memory_probe(name, what):
    """Run one forward or gradient in this process; print the peak resident memory (kB)."""
    import numpy as np
    from .engine import build_model, render
    from .gradients import raw_gradient
    model = build_model(_experiment(name), warn=lambda m: None)
    if what == "forward":
        render(model)
    else:
        raw_gradient(model, np.ones(model.shape))
    print(_peak_rss_kb())


def _peak_rss_kb():
    """This process's peak resident memory (kB): Linux's VmHWM, which starts afresh at
    exec (ru_maxrss keeps the high-water mark of the process that forked it, here the
    benchmark's own, which has compiled every kernel)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# the PyTorch bridge's memory figure: B2 on a 1024x1024 detector
TORCH_CASE = CASES["B2"].replace("-detpixels 512", "-detpixels 1024")


def torch_memory_probe(what):
    """Import torch and nbragg.torch, then (``what``) nothing, a forward through the bridge,
    or a forward and backward (every kernel parameter requiring grad); print the peak
    resident memory (kB)."""
    import torch
    from . import torch as nt
    from .nbargs import parse_nanobragg_args
    from .params import SCALAR_PARAMS, get_params
    exp = parse_nanobragg_args(TORCH_CASE.split(), warn=lambda m: None).experiment
    params = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for n, v in get_params(exp, SCALAR_PARAMS).items()}
    if what != "import":
        image = nt.simulate(exp, params, warn=lambda m: None)
        if what == "backward":
            image.sum().backward()
    print(_peak_rss_kb())


def torch_memory():
    """Peak resident memory (MB) of processes that import the bridge only, run a forward
    through it, and run a forward and backward."""
    out = {}
    for what in ("import", "forward", "backward"):
        code = f"from nbragg.bench import torch_memory_probe; torch_memory_probe({what!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_package_env())
        if proc.returncode != 0:
            raise RuntimeError(f"the torch memory probe ({what}) failed: {proc.stderr[-500:]}")
        out[what] = int(proc.stdout.strip().splitlines()[-1]) / 1024.0
    return out


def working_arrays(name):
    """Bytes of the arrays a forward call and a gradient call allocate (beyond inputs)."""
    from .engine import build_model
    from .kernels import adjoint as A
    m = build_model(_experiment(name), warn=lambda m: None)
    npix = m.shape[0] * m.shape[1]
    forward = 8 * npix + 8 * m.shape[0]
    xmin, xmax, ymin, ymax = m.roi_clipped
    grid = m.structure.grid.size
    nch = A.n_chunks(ymax - ymin + 1, grid, 8 * npix)
    per_chunk = m.layout.size + grid
    return forward, 8 * nch * per_chunk


def peak_memory(name):
    """Peak resident memory (MB) of a process doing one forward, and one gradient."""
    out = {}
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for what in ("forward", "gradient"):
        code = f"from nbragg.bench import memory_probe; memory_probe({name!r}, {what!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        out[what] = int(proc.stdout.strip().splitlines()[-1]) / 1024.0
    return out


def time_forward(model, threads, repeat, backend="cpu", precision="float64"):
    from .engine import render
    render(model, backend=backend, threads=threads, precision=precision)  # compile / load, first-touch
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        render(model, backend=backend, threads=threads, precision=precision)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_figures(name, repeat, gradients=True):
    """Lines of GPU figures for one case: forward (whole call and kernel alone), gradient
    and Jacobian against the forward."""
    from .kernels import cuda as C
    model = _model(CASES[name])
    n = model.inner_evaluations
    lines = []
    for precision in ("float64", "float32"):
        whole = time_forward(model, None, repeat, backend="cuda", precision=precision)
        kernel = C.forward_kernel_seconds(model.scene, repeat, single=precision == "float32")
        lines.append(f"  forward  cuda {precision}: {whole:8.3f} s   {n / whole:12.4g} evaluations/s (whole call); "
                     f"kernel {kernel:8.4f} s   {n / kernel:12.4g} evaluations/s")
    if gradients:
        for v in [name] + (["B2hkl"] if name == "B2" else []):
            tf, tg, tj = gradient_figures(v, None, repeat, backend="cuda")
            label = v + (" (with a 41^3 Fhkl grid)" if v == "B2hkl" else "")
            lines.append(f"  {label}, cuda: forward {tf:.3f} s; gradient of all {len(_scalar_names())}"
                         f"{' + Fhkl' if v == 'B2hkl' else ''} parameters {tg:.3f} s = {tg / tf:.2f}x forward; "
                         f"Jacobian (15 parameters) {tj:.3f} s = {tj / tf:.2f}x forward")
    return lines


def _run_process(cmd, env, cwd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return dt


def compare_nanobragg(binary, args, threads, repeat, resident_env=None):
    """Alternate nanoBragg, the nbragg command line by itself and (given ``resident_env``,
    see :func:`resident_server`) on a resident server; returns the medians (t_c,
    t_nbragg, t_resident or None)."""
    outputs = ["-floatfile", "float.bin", "-intfile", "int.img", "-nonoise", "-nopgm"]
    with tempfile.TemporaryDirectory() as tmp:
        env_c = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env_n = _package_env()
        c_cmd = [binary] + args.split() + outputs
        n_cmd = [sys.executable, "-m", "nbragg"] + args.split() + outputs + ["-threads", str(threads), "-noprogress"]
        _run_process(n_cmd, env_n, tmp)  # warm the compile cache
        tc, tn, tr = [], [], []
        for _ in range(repeat):
            tc.append(_run_process(c_cmd, env_c, tmp))
            tn.append(_run_process(n_cmd, env_n, tmp))
            if resident_env:
                tr.append(_run_process(n_cmd, resident_env, tmp))
        return statistics.median(tc), statistics.median(tn), (statistics.median(tr) if tr else None)


@contextlib.contextmanager
def resident_server():
    """A resident server (nbragg-resident) of this checkout in a private socket directory
    for the benchmark's run; yields the environment whose commands run on it."""
    folder = tempfile.mkdtemp(prefix="nbrb")
    try:
        os.chmod(folder, 0o700)
        env = _package_env(NBRAGG_RESIDENT="on", NBRAGG_RESIDENT_DIR=folder)
        cmd = [sys.executable, "-m", "nbragg.resident"]
        subprocess.run(cmd + ["start", "--idle", "600"], env=env, check=True, stdout=subprocess.DEVNULL)
        try:
            yield env
        finally:
            subprocess.run(cmd + ["stop"], env=env, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


STARTUP_ARGS = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 64 -pixel 0.1"


# the least any command built on cached Numba code pays: the interpreter, numpy and numba
# imported, and one cached function loaded the way the commands load theirs
# (nbragg._numba_start), the process then ended as theirs are
_FLOOR_MODULE = """import os

from nbragg._numba_start import lighter_cache_loads, load_blas_module

if not lighter_cache_loads():
    load_blas_module()

from numba import njit


@njit(cache=True)
def one(x):
    return x + 1


one(1)
os._exit(0)
"""


def startup_figures(repeat, binary=None, resident_env=None):
    """(seconds of ``python -c "import nbragg"``, of the warm nbragg command on a 64x64
    image, of a Python process that loads one cached one-line Numba function, of the
    nanoBragg binary on it or None, of the command on a resident server or None):
    medians, the commands alternated."""
    outputs = ["-floatfile", "float.bin", "-intfile", "int.img", "-nonoise", "-nopgm"]
    env = _package_env()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "numba_floor.py"), "w") as f:
            f.write(_FLOOR_MODULE)
        imp = [sys.executable, "-c", "import nbragg"]
        floor = [sys.executable, "-c", "import numba_floor"]      # (-c: the working directory, tmp, on the path)
        cmd = [sys.executable, "-m", "nbragg"] + STARTUP_ARGS.split() + outputs + ["-noprogress"]
        _run_process(cmd, env, tmp)          # the kernels compiled or loaded once
        _run_process(floor, env, tmp)
        ti, tn, tf, tc, tr = [], [], [], [], []
        for _ in range(repeat):
            ti.append(_run_process(imp, env, tmp))
            tn.append(_run_process(cmd, env, tmp))
            tf.append(_run_process(floor, env, tmp))
            if binary:
                tc.append(_run_process([binary] + STARTUP_ARGS.split() + outputs, dict(os.environ), tmp))
            if resident_env:
                tr.append(_run_process(cmd, resident_env, tmp))
    return (statistics.median(ti), statistics.median(tn), statistics.median(tf),
            statistics.median(tc) if tc else None, statistics.median(tr) if tr else None)


# the detector-response figure: a B1L image (2048x2048, 0.05 mm pixels) through a Gaussian
# PSF of 3 pixels FWHM with every noise term
RESPONSE_FLAGS = "-psf gauss -psf_fwhm 150 -pixel 0.05 -readout 3 -flicker 0.02 -calibration 0.03 -seed 1"


def response_figures(repeat, noisify_binary=None):
    """(seconds of the Python API's response stage on the B1L image, of nbragg-noisify,
    of a noisify binary (or None)): medians, the commands alternated."""
    import numpy as np
    from .engine import render
    from .experiment import Response
    from .response import respond
    image = render(_model(CASES["B1L"]))[0]
    r = Response(psf="gauss", psf_fwhm=150.0, readout=3.0, flicker=0.02, calibration=0.03)
    respond(image, r, 0.05)
    t_api = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        respond(image, r, 0.05)
        t_api.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        np.ascontiguousarray(image, dtype="<f4").tofile(os.path.join(tmp, "b1l.bin"))
        args = ["-floatfile", "b1l.bin", "-detpixels", "2048"] + RESPONSE_FLAGS.split()
        t_cmd, t_c = _alternated("nbragg-noisify", noisify_binary, args, _package_env(), tmp, repeat)
    return statistics.median(t_api), t_cmd, t_c


def byte_compile_package():
    """Write the package's bytecode where it is missing (as an install does; an editable
    checkout under PYTHONDONTWRITEBYTECODE would otherwise compile every module it imports
    on every command), so that the commands are timed as installed."""
    import compileall
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        compileall.compile_dir(pkg_dir, quiet=2, optimize=0)    # (the timed commands run without -O)


def _package_env(**extra):
    """The environment for a command of this package (this checkout first on the path)."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra.setdefault("NBRAGG_RESIDENT", "off")      # (whatever server the machine runs)
    return dict(os.environ, **extra, PYTHONPATH=os.pathsep.join(
        [pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _console_script(command):
    """The argv of a fresh interpreter running ``command``'s console entry point as the
    installed script does (nbragg.resident's function of that name)."""
    function = command.replace("-", "_")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {command!r}; "
            f"from nbragg.resident import {function}; sys.exit({function}())"]


def _alternated(command, binary, args, env, cwd, repeat):
    """(median seconds of the console command ``command args``, of ``binary args`` or
    None): run in turn, after one warm-up run of the command (its compiled code loaded
    from then on)."""
    n_cmd = _console_script(command) + args
    _run_process(n_cmd, env, cwd)
    tn, tc = [], []
    for _ in range(repeat):
        tn.append(_run_process(n_cmd, env, cwd))
        if binary:
            tc.append(_run_process([binary] + args, env, cwd))
    return statistics.median(tn), (statistics.median(tc) if tc else None)


# the amorphous-background figure: nonBragg's water on a 1024x1024 detector, one
# evaluation per pixel
BACKGROUND_FLAGS = "-stol water.stol -lambda 1 -distance 100 -pixel 0.1 -detpixels 1024 -thickness 0.1 -seed 1"


def background_figures(repeat, threads, nonbragg_binary=None):
    """(seconds of simulate() for the water image in process, of the nbragg-nonbragg
    command, of a nonBragg binary (or None)): medians, the commands alternated."""
    import gzip
    from .engine import simulate
    from .nonbragg_cli import plan
    exp = plan(BACKGROUND_FLAGS.replace("water.stol", "water").split(), lambda m: None).experiment
    simulate(exp, threads=threads, warn=lambda m: None)
    t_api = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        simulate(exp, threads=threads, warn=lambda m: None)
        t_api.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        from .io.stol import builtin_path
        with gzip.open(builtin_path("water")) as src, open(os.path.join(tmp, "water.stol"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        env = _package_env(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
        args = BACKGROUND_FLAGS.split() + ["-nonoise", "-nopgm", "-floatfile", "w.bin", "-intfile", "w.img"]
        t_cmd, t_c = _alternated("nbragg-nonbragg", nonbragg_binary, args, env, tmp, repeat)
    return statistics.median(t_api), t_cmd, t_c


def tiled(exp, across):
    """``exp`` with its one panel cut into across x across equal panels (the same pixels)."""
    from .engine import build_model
    from .experiment import Panel
    g = build_model(exp, warn=lambda m: None).detector
    nf, ns = g.fpixels // across, g.spixels // across
    px = exp.detector.pixel_size
    tiles = [Panel(origin=tuple(g.pix0 * 1000 + j * nf * px * g.fdet + i * ns * px * g.sdet),
                   fast_axis=tuple(g.fdet), slow_axis=tuple(g.sdet), image_size=(nf, ns), pixel_size=px)
             for i in range(across) for j in range(across)]
    return exp.replace(detector=exp.detector.replace(panels=tiles))


def panel_figures(case, threads, repeat, across=8):
    """(seconds for one panel, for across^2 panels of the same pixels): medians of
    renders alternated in one process."""
    from .engine import build_model, render
    exp = _experiment(case)
    one = build_model(exp, warn=lambda m: None)
    many = build_model(tiled(exp, across), warn=lambda m: None)
    for m in (one, many):
        render(m, threads=threads)
    t1, tn = [], []
    for _ in range(repeat):
        for m, ts in ((one, t1), (many, tn)):
            t0 = time.perf_counter()
            render(m, threads=threads)
            ts.append(time.perf_counter() - t0)
    return statistics.median(t1), statistics.median(tn)


DATASET_BASE = CASES["B2"]   # 512x512 frames with the B2 workload


def _dataset_spec(n):
    return {"seed": 1, "images": n, "shard_size": 4, "base": DATASET_BASE,
            "vary": {"orientation": "uniform", "Na": {"integers": [6, 10]}, "distance": {"normal": [100, 1]}},
            "outputs": {"float": True, "counts": "uint16"}}


def dataset_throughput(workers, nframes):
    """Frames/s of the dataset path and of bare simulate() for 512x512 frames.

    The dataset rate is the steady state: the frames reported after the first report,
    over the time since (cluster start-up does not count; writing, assembly and
    compression do).  Bare simulate() runs the same frames in a loop with ``workers``
    Numba threads."""
    from .dataset import base_experiment, frame_experiment, frame_parameters, generate, load_spec
    from .engine import simulate
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        t_report = []

        def on_frame(i):
            if not t_report or time.perf_counter() - t_report[-1] > 1e-3:
                t_report.append(time.perf_counter())
            stamps.append(t_report[-1])
        generate(_dataset_spec(nframes), os.path.join(tmp, "d.h5"), workers=workers, progress=False,
                 on_frame=on_frame)
    first = stamps.count(stamps[0])
    ds_rate = (len(stamps) - first) / max(stamps[-1] - stamps[0], 1e-9)
    spec = load_spec(_dataset_spec(nframes))
    base = base_experiment(spec)
    exps = [frame_experiment(base, *frame_parameters(spec, base, i), spec, i) for i in range(nframes)]
    simulate(exps[0], threads=workers)
    t0 = time.perf_counter()
    for e in exps:
        simulate(e, threads=workers, warn=lambda m: None)
    bare_rate = nframes / (time.perf_counter() - t0)
    return ds_rate, bare_rate


MANY_BASE = ("-cell 79 79 38 90 90 90 -hkl truth.hkl -lambda 1.3 -distance 80 -pixel 0.3 -detpixels 128 "
             "-oversample 1 -N 10 -gauss_xtal -fluence 1e27")


def many_shot_throughput(nshots, iterations, repeat=1):
    """Wall seconds of refine_many on ``nshots`` 128x128 stills (each shot's misset,
    Ncells and scale, ``iterations`` Gauss-Newton iterations) with 1 and 2 Dask workers,
    alternated; cluster start-up included (it is part of a user's run)."""
    import numpy as np
    from .dataset import generate, load_spec
    from .refine_many import refine_many
    from .refine_many_cli import _dataset_shots, _perturb
    out = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        with open(os.path.join(tmp, "truth.hkl"), "w") as fh:
            for h in range(-20, 21):
                for k in range(-20, 21):
                    for l in range(-10, 11):
                        fh.write(f"{h} {k} {l} {20 + rng.rayleigh(100):.2f}\n")
        spec = {"seed": 19, "images": nshots, "shard_size": 50, "base": MANY_BASE,
                "vary": {"orientation": "uniform", "Ncells": {"uniform": [8, 12]}},
                "outputs": {"float": True, "counts": "uint32"}, "compression": "none"}
        with open(os.path.join(tmp, "stills.json"), "w") as fh:
            json.dump(spec, fh)
        generate(load_spec(os.path.join(tmp, "stills.json")), os.path.join(tmp, "stills.h5"), workers=0,
                 progress=False)
        exps, obs = _dataset_shots("bench", {"dataset": "stills.h5"}, tmp, None)
        start = _perturb("bench", {"seed": 7, "misset": 0.05, "relative": {"Ncells": 0.1}}, exps, [], None)
        own = ["misset_x", "misset_y", "misset_z", "Ncells", "scale"]
        for _ in range(repeat):
            for w in (1, 2):
                t0 = time.perf_counter()
                refine_many(start, obs, per_shot=own,
                            restraints={"scale": (1.0, 0.1)}, workers=w, progress=False, max_iterations=iterations)
                out[w].append(time.perf_counter() - t0)
    return statistics.median(out[1]), statistics.median(out[2])


def _scalar_names():
    from .params import SCALAR_PARAMS
    return SCALAR_PARAMS


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nbragg.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="B1,B2",
                    help="comma-separated benchmark names (B1, B2, B3; B3 and B1L are B1 on a 2048x2048 detector; "
                         "none: only the figures asked for by the other flags)")
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (Numba threads) or cuda (an NVIDIA GPU through numba-cuda)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--nanobragg", metavar="PATH", help="a nanoBragg binary to compare against")
    ap.add_argument("--no-gradients", action="store_true", help="skip the gradient and Jacobian figures")
    ap.add_argument("--dataset", action="store_true",
                    help="also measure dataset generation (512x512 frames) against bare simulate()")
    ap.add_argument("--response", action="store_true",
                    help="also time the detector response on a 2048x2048 image (Gaussian PSF of 3 pixels, all noise)")
    ap.add_argument("--noisify", metavar="PATH", help="with --response: a noisify binary to compare against")
    ap.add_argument("--background", action="store_true",
                    help="time the amorphous background (nonBragg's water, 1024x1024) in process and as a command")
    ap.add_argument("--nonbragg", metavar="PATH", help="with --background: a nonBragg binary to compare against")
    ap.add_argument("--torch", action="store_true",
                    help="peak memory of a forward, and of a forward and backward, through the PyTorch bridge "
                         "(B2 on 1024x1024)")
    ap.add_argument("--startup", action="store_true",
                    help="time `import nbragg` and the warm nbragg command on a 64x64 image (and --nanobragg's)")
    ap.add_argument("--resident", action="store_true",
                    help="also time the commands (--nanobragg, --startup) on a resident server (nbragg-resident), "
                         "started for the run in a private directory")
    ap.add_argument("--many", type=int, metavar="SHOTS",
                    help="time refine_many on this many 128x128 stills with 1 and 2 Dask workers")
    ap.add_argument("--panels", action="store_true",
                    help="time a detector of 64 panels against one panel of the same pixels (B1 and B2)")
    opts = ap.parse_args(argv)
    import numba
    threads = [int(t) for t in opts.threads.split(",") if int(t) <= numba.config.NUMBA_NUM_THREADS]
    from . import engine  # noqa: F401  (the kernels' modules, which choose the vector width)
    from ._vector_width import describe
    print(f"nbragg benchmark  (numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads available; "
          f"{describe()})")
    names = [] if opts.cases in ("", "none") else opts.cases.split(",")
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown benchmark {unknown[0]!r}; choose from {', '.join(CASES)}")
    if opts.nanobragg or opts.startup or opts.response or opts.background:
        byte_compile_package()
    if opts.backend == "cuda":
        from .engine import check_backend, cuda_kernels
        from .errors import BackendError
        try:
            check_backend("cuda")
            cuda_kernels().check_available()
        except BackendError as exc:
            print(f"nbragg.bench: {exc}", file=sys.stderr)
            return 2
        from numba import cuda
        name = getattr(cuda.get_current_device(), "name", "the CUDA simulator")
        print(f"nbragg benchmark on {name.decode() if isinstance(name, bytes) else name}")
        for case in names:
            print(f"\n{case}: {CASES[case]}")
            print(f"  inner evaluations per image: {_model(CASES[case]).inner_evaluations:,}")
            for line in gpu_figures(case, opts.repeat, gradients=not opts.no_gradients):
                print(line, flush=True)
        return 0
    for name in names:
        args = CASES[name]
        model = _model(args)
        n = model.inner_evaluations
        print(f"\n{name}: {args}")
        print(f"  inner evaluations per image: {n:,}")
        for t in threads:
            dt = time_forward(model, t, opts.repeat)
            print(f"  forward  threads={t}: {dt:8.3f} s   {n / dt:12.4g} evaluations/s")
        t = max(threads)
        dt = time_forward(model, t, opts.repeat, precision="float32")
        print(f"  forward  threads={t} float32: {dt:8.3f} s   {n / dt:12.4g} evaluations/s")
        if not opts.no_gradients:
            t = max(threads)
            variants = [name] + (["B2hkl"] if name == "B2" else [])
            for v in variants:
                tf, tg, tj = gradient_figures(v, t, opts.repeat)
                label = v + (" (with a 41^3 Fhkl grid)" if v == "B2hkl" else "")
                print(f"  {label}, threads={t}: forward {tf:.3f} s; gradient of all {len(_scalar_names())}"
                      f"{' + Fhkl' if v == 'B2hkl' else ''} parameters {tg:.3f} s = {tg / tf:.2f}x forward; "
                      f"Jacobian (15 parameters) {tj:.3f} s = {tj / tf:.2f}x forward "
                      f"(goals on B2: gradient at most 2x, Jacobian at most 4x)")
            mem = peak_memory(name)
            fw, gr = working_arrays(name)
            print(f"  peak resident memory: forward process {mem['forward']:.0f} MB, gradient process "
                  f"{mem['gradient']:.0f} MB ({mem['gradient'] / mem['forward']:.2f}x); arrays the call allocates: "
                  f"forward {fw / 2**20:.1f} MB, gradient {gr / 2**20:.1f} MB (plus the caller's upstream image)")
        if opts.nanobragg:
            binary = shutil.which(opts.nanobragg) or opts.nanobragg
            for t in threads:
                with resident_server() if opts.resident else contextlib.nullcontext() as renv:
                    tc, tn, tr = compare_nanobragg(binary, args, t, opts.repeat, renv)
                kern = time_forward(model, t, opts.repeat)
                print(f"  vs nanoBragg threads={t}: nanoBragg {tc:7.3f} s, nbragg command {tn:7.3f} s "
                      f"-> speed ratio {tc / tn:5.2f}x (whole process); kernel only {tc / kern:5.2f}x"
                      + (f"; on a resident server {tr:7.3f} s -> {tc / tr:5.2f}x" if tr is not None else ""))
    if opts.response:
        binary = (shutil.which(opts.noisify) or opts.noisify) if opts.noisify else None
        t_api, t_cmd, t_c = response_figures(opts.repeat, binary)
        print(f"\ndetector response, 2048x2048 B1L image ({RESPONSE_FLAGS}):")
        print(f"  Python API (nbragg.Response, all cores): {t_api:.3f} s; nbragg-noisify command {t_cmd:.3f} s"
              + (f"; noisify {t_c:.3f} s -> {t_c / t_cmd:.2f}x (command), {t_c / t_api:.2f}x (API stage)"
                 if t_c is not None else ""))
    if opts.torch:
        mem = torch_memory()
        fw, bw = mem["forward"] - mem["import"], mem["backward"] - mem["import"]
        print(f"\nPyTorch bridge, peak resident memory ({TORCH_CASE}; {len(_scalar_names())} parameters "
              f"requiring grad):")
        print(f"  import only {mem['import']:.0f} MB; forward {mem['forward']:.0f} MB; forward + backward "
              f"{mem['backward']:.0f} MB -> {mem['backward'] / mem['forward']:.2f}x (goal at most 1.5x); "
              f"above the import: forward {fw:.0f} MB, forward + backward {bw:.0f} MB")
    if opts.background:
        binary = (shutil.which(opts.nonbragg) or opts.nonbragg) if opts.nonbragg else None
        print(f"\namorphous background, water on 1024x1024 ({BACKGROUND_FLAGS}):")
        for t in threads:
            t_api, t_cmd, t_c = background_figures(opts.repeat, t, binary)
            print(f"  threads={t}: simulate() {t_api:.3f} s; nbragg-nonbragg command {t_cmd:.3f} s"
                  + (f"; nonBragg (single-threaded) {t_c:.3f} s -> {t_c / t_cmd:.2f}x (command), "
                     f"{t_c / t_api:.2f}x (in process)" if t_c is not None else ""))
    if opts.startup:
        binary = (shutil.which(opts.nanobragg) or opts.nanobragg) if opts.nanobragg else None
        with resident_server() if opts.resident else contextlib.nullcontext() as renv:
            ti, tn, tf, tc, tr = startup_figures(max(opts.repeat, 5), binary, renv)
        print(f"\nstart-up: python -c 'import nbragg' {ti:.3f} s; warm nbragg command on 64x64 {tn:.3f} s"
              + (f" by itself, {tr:.3f} s on a resident server" if tr is not None else "")
              + (f"; nanoBragg {tc:.3f} s" if tc is not None else "")
              + f"\n  floor: a Python process loading one cached one-line Numba function {tf:.3f} s "
              f"(the command spends {tn - tf:.3f} s beyond it)")
    if opts.many:
        iterations = 6
        print(f"\nrefine_many: {opts.many} stills of 128x128 ({MANY_BASE}), each shot's misset, Ncells and scale, "
              f"{iterations} iterations, start-up included:")
        t1, t2 = many_shot_throughput(opts.many, iterations, opts.repeat)
        print(f"  1 worker {t1:.1f} s, 2 workers {t2:.1f} s -> {t1 / t2:.2f}x (goal at least 1.7x)")
    if opts.panels:
        for case in ("B1", "B2"):
            print(f"\ndetector of 64 panels against one panel of the same pixels ({case}: {CASES[case]}):")
            for t in threads:
                t1, t64 = panel_figures(case, t, opts.repeat)
                print(f"  threads={t}: one panel {t1:.3f} s, 64 panels {t64:.3f} s -> {t64 / t1:.3f}x "
                      f"(goal at most 1.15x)")
    if opts.dataset:
        print(f"\ndataset generation, 512x512 frames ({DATASET_BASE}):")
        rates = {}
        for w in threads:
            ds, bare = dataset_throughput(w, 24)
            rates[w] = ds
            print(f"  {w} worker(s): dataset {ds:.2f} frames/s, bare simulate() with {w} thread(s) {bare:.2f} "
                  f"frames/s -> {100 * ds / bare:.0f} %")
        if 1 in rates and 2 in rates:
            print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
