"""Compile every CUDA kernel to PTX for a real GPU, without needing one.

The simulator runs kernels as Python, so it accepts code that the CUDA compiler rejects
(a float used as an index, an array allocated in a device function, ...).  This script
runs the host side of each GPU routine with the device replaced by numpy arrays; at each
kernel launch it compiles the kernel, with the argument types of that launch, to PTX
for compute capability 9.0, and prints one line per kernel.

Run with NUMBA_ENABLE_CUDASIM=0 where the CUDA compiler libraries are installed
(``pip install "nbragg[cuda]"``).  Exit status 3: they are not, nothing was checked.
"""

import os
import re
import sys
import types

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
    sys.exit("run with NUMBA_ENABLE_CUDASIM=0")

import numpy as np
from numba import cuda, typeof

CC = (9, 0)
F64_ARITHMETIC = re.compile(r"\b(?:add|sub|mul|fma|div|sqrt|rcp|neg|abs|min|max)(?:\.[a-z]+)*\.f64\b")
KERNELS = ("_forward_kernel", "_forward_kernel_single", "_tangent_kernel", "_adjoint_kernel", "_reduce_rows_serial",
           "_reduce_rows")


def toolkit_available():
    """Whether the CUDA compiler pieces (NVVM, NVRTC, libdevice) compile a trivial kernel."""
    def trivial(out):
        out[0] = 1.0
    try:
        cuda.compile_ptx(trivial, (typeof(np.zeros(1)),), cc=CC)
        return True
    except Exception:
        return False


class _Launched(Exception):
    pass


class _Compiler:
    """Stands in for a kernel: compiles it for the launch's argument types, then stops."""

    def __init__(self, name, kernel, done):
        self.name, self.kernel, self.done = name, kernel, done

    def __getitem__(self, launch_config):
        return self

    def __call__(self, *args):
        sig = tuple(typeof(a) for a in args)
        ptx, _ = cuda.compile_ptx(self.kernel.py_func, sig, cc=CC)
        self.done[self.name] = (len(ptx), len(F64_ARITHMETIC.findall(ptx)))
        raise _Launched


def main():
    if not toolkit_available():
        print("the CUDA compiler libraries are not installed")
        return 3
    import numba.cuda.dispatcher as dispatcher
    # device functions ask the current device for its compute capability when compiled
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
    cuda.to_device = lambda a, *args, **kw: np.array(a, copy=True, order="C")
    cuda.device_array = lambda shape, dtype=np.float64, **kw: np.zeros(shape, dtype=dtype)

    import nbragg
    from nbragg.engine import build_model
    from nbragg.kernels import cuda as C
    from nbragg.params import SCALAR_PARAMS, input_tangent
    C.check_available = lambda: None
    done = {}
    for name in KERNELS:
        setattr(C, name, _Compiler(name, getattr(C, name), done))

    args = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 10 -N 5 -lambda 1 -distance 100 "
            "-detpixels 6 -pixel 0.5 -oversample 2 -mosaic 0.3 -mosaic_dom 3").split()
    exp = nbragg.Experiment.from_nanobragg_args(args, warn=lambda m: None)
    grid = np.random.default_rng(0).uniform(1.0, 9.0, (5, 5, 5))
    exp = exp.replace(structure=exp.structure.replace(Fhkl=grid, hkl_origin=(-2, -2, -2), hkl_count=grid.size))
    model = build_model(exp, warn=lambda m: None)
    calls = [
        lambda: C.render(model.scene),
        lambda: C.render(model.scene, single=True),
        lambda: C.run_tangent(model.scene, model.kernel_layout, np.array([input_tangent(model, n) for n in SCALAR_PARAMS[:3]]),
                              model.scale),
        lambda: C.raw_adjoint(model.scene, model.kernel_layout, np.ones(model.shape), model.scale, want_F=True,
                              want_image=True),
        lambda: C._reduce(np.zeros((3, 10))),
        lambda: C._reduce(np.zeros((3, C.SERIAL_REDUCE_MAX + 1))),
    ]
    for call in calls:
        try:
            call()
        except _Launched:
            pass
    for name, (size, f64) in done.items():
        print(f"{name}: {size} characters of PTX for sm_{CC[0]}{CC[1]}, {f64} float64 arithmetic instructions")
    missing = set(KERNELS) - set(done)
    if missing:
        print("not compiled:", ", ".join(sorted(missing)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
