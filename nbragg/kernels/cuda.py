"""GPU kernels (numba.cuda): forward, tangent and adjoint, one thread per pixel.

The per-pixel functions are the CPU's own (:func:`~nbragg.kernels.cpu.pixel_value`,
:func:`~nbragg.kernels.tangent.pixel_tangent`,
:func:`~nbragg.kernels.adjoint.pixel_adjoint`): :func:`device_function` recompiles a
CPU function, and every compiled function it calls, as CUDA device functions, so the
physics exists once.  On the GPU the orientations of a block are summed one by one
(the CPU's bulk vector loops are a CPU optimisation) and the adjoint always takes the
general replay path.

Determinism of the adjoint: a fixed number W of threads (set by the problem size and a
memory budget, never by the device) each accumulate private partial gradients over the
pixels tid, tid + W, ...; the partials are then summed by a reduction kernel in a fixed
order.  Structure-factor gradients, too many to keep per thread, are accumulated with
atomic adds of 128-bit fixed-point integers: integer addition is exact, so the result
does not depend on the order in which threads arrive.  The fixed-point scale comes from
a first pass that bounds the sum of |contributions|.

Importing this module needs numba-cuda (``pip install "nbragg[cuda]"``); the rest of
nbragg never imports it unless a GPU backend is asked for.
"""

import math
import time
import types

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import config, cuda, float32, float64, int64
from numba.core.registry import CPUDispatcher

from ..errors import BackendError
from . import adjoint as A
from . import cpu as K
from . import physics as PH
from . import precision as P
from . import tangent as T
from .derivs import LP_SIZE
from .scene import Scene, as_single, orients_to_soa

MAXP = 32              # parameters per tangent launch (more are done in groups)
SIMULATED = bool(getattr(config, "ENABLE_CUDASIM", 0))
# the simulator runs a Python thread per GPU thread and its block loop competes with them
# for the GIL: with long per-pixel loops one thread per block is 20-40x faster there than
# eight; the GPU wants fuller blocks
THREADS_PER_BLOCK = 1 if SIMULATED else 128
REDUCE_THREADS = 128   # threads of the tree reduction (a compile-time size)
SERIAL_REDUCE_MAX = 4096
ADJOINT_BUDGET = 512 * 2 ** 20   # bytes of per-thread partial gradients, at most
ADJOINT_MAX_THREADS = 65536

# ----------------------------------------------------------------------------- device twins

_twins = {}


def device_function(fn, single=False):
    """The CUDA device-function twin of a CPU-compiled (njit) function.

    Its Python source is compiled again for the GPU, with every njit function it refers
    to replaced by that function's own twin (or by an entry of ``_OVERRIDES``); with
    ``single``, the single-precision twin (see :mod:`.precision`)."""
    if (fn, single) in _OVERRIDES:
        return _OVERRIDES[(fn, single)]
    twin = _twins.get((fn, single))
    if twin is not None:
        return twin
    if single:
        clone = P.single_clone(fn, lambda f: device_function(f, single=True))
    else:
        py = fn.py_func
        names = dict(py.__globals__)
        for name in py.__code__.co_names:
            value = names.get(name)
            if isinstance(value, CPUDispatcher):
                names[name] = device_function(value)
        clone = types.FunctionType(py.__code__, names, py.__name__, py.__defaults__, py.__closure__)
        clone.__qualname__ = py.__qualname__
    twin = cuda.jit(device=True)(clone)
    _twins[(fn, single)] = twin
    return twin


# 128-bit fixed-point accumulation of structure-factor gradients.  gF is uint64 (2, n + 1):
# row 0 the low words, row 1 the high words; column n holds the mode (row 0: 0 off,
# 1 bound -- add |value| to the thread's slot after its cotangent --, 2 accumulate) and
# the binary exponent of the scale (row 1).
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_TWO64 = 18446744073709551616.0
_MODE_OFF = 0
_MODE_BOUND = 1
_MODE_SUM = 2


@cuda.jit(device=True)
def _add_F_device(gF, g, j, value):
    n = gF.shape[1] - 1
    mode = gF[0, n]
    if mode == _MODE_BOUND:
        g[g.shape[0] - 1] += abs(value)     # the thread's bound slot, after the layout
    elif mode == _MODE_SUM:
        x = value * 2.0 ** (np.int64(gF[1, n]) - 1024)
        a = abs(x)
        hi_f = math.floor(a / _TWO64)
        lo_f = math.floor(a - hi_f * _TWO64 + 0.5)
        hi = np.uint64(hi_f)
        lo = np.uint64(lo_f)
        if x < 0.0:
            lo = ~lo + _U1
            hi = ~hi + (_U1 if lo == _U0 else _U0)
        old = cuda.atomic.add(gF, (0, j), lo)
        carry = _U1 if old + lo < old else _U0
        cuda.atomic.add(gF, (1, j), hi + carry)


@cuda.jit(device=True)
def _floor_float_device(x):
    return float64(math.floor(x))


@cuda.jit(device=True)
def _floor_float_device_single(x):
    return float32(math.floor(x))


# CPU functions with GPU versions of their own: (function, single precision) -> device function
_OVERRIDES = {(A.add_F, False): _add_F_device, (A.add_F, True): _add_F_device,
              # (numpy's floor, which keeps CPU loops vectorised, has no GPU version)
              (PH.floor_float, False): _floor_float_device, (PH.floor_float, True): _floor_float_device_single}


def fixed_to_float(gF, exponent):
    """Values of the 128-bit fixed-point words (uint64 (2, n)) as float64."""
    lo = gF[0]
    hi = gF[1].view(np.int64)
    out = hi.astype(np.float64) * _TWO64 + lo.astype(np.float64)
    neg1 = hi == -1            # small negative numbers: avoid cancellation
    out[neg1] = -((~lo[neg1]).astype(np.float64) + 1.0)
    return np.ldexp(out, -exponent)


# ----------------------------------------------------------------------------- kernels

_pixel_value = device_function(K.pixel_value)
_pixel_tangent = device_function(T.pixel_tangent)
_pixel_adjoint = device_function(A.pixel_adjoint)


@cuda.jit(device=True)
def _thread_pixel(i, xmin, ymin, nx, ny, det):
    """(slow, fast, active): the pixel of thread i of an nx x ny region, and whether it
    is inside the region and not masked."""
    if i >= nx * ny:
        return 0, 0, False
    spixel = ymin + i // nx
    fpixel = xmin + i % nx
    return spixel, fpixel, not det.use_mask or det.mask[spixel, fpixel] != 0


def _rebind(fn, **names):
    """fn with some of its global names bound to other objects."""
    scope = dict(fn.__globals__, **names)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__
    return clone


def _forward(S, ori, fflat, xmin, ymin, nx, ny, image, omega_img):
    spixel, fpixel, active = _thread_pixel(cuda.grid(1), xmin, ymin, nx, ny, S.det)
    if not active:
        return
    buf = cuda.local.array(1, float64)
    ibuf = cuda.local.array(1, int64)
    v, o = _pixel_value(fpixel, spixel, S, False, ori, fflat, buf, ibuf)
    image[spixel, fpixel] = v
    omega_img[spixel, fpixel] = o


_forward_kernel = cuda.jit(_forward)
_forward_kernel_single = cuda.jit(_rebind(_forward, _pixel_value=device_function(K.pixel_value, single=True),
                                          float64=float32))


@cuda.jit
def _tangent_kernel(S, d, L, scale, flags, ori, fflat, has_dori, base, xmin, ymin, nx, ny, J, image):
    spixel, fpixel, active = _thread_pixel(cuda.grid(1), xmin, ymin, nx, ny, S.det)
    if not active:
        return
    npar = d.shape[0]
    dP_ = cuda.local.array((MAXP, 3), float64)
    dd_ = cuda.local.array((MAXP, 4), float64)
    dq_ = cuda.local.array((MAXP, 3), float64)
    dI_ = cuda.local.array(MAXP, float64)
    dom_ = cuda.local.array(MAXP, float64)
    dcap_ = cuda.local.array(MAXP, float64)
    dpol_ = cuda.local.array(MAXP, float64)
    dm_ = cuda.local.array(MAXP, float64)
    dbg_ = cuda.local.array(MAXP, float64)
    for p in range(MAXP):
        for j in range(3):
            dP_[p, j] = 0.0
            dq_[p, j] = 0.0
        for j in range(4):
            dd_[p, j] = 0.0
    lp = cuda.local.array(LP_SIZE, float64)
    pbuf = cuda.local.array(10, float64)
    fidx = cuda.local.array(64, int64)
    fw = cuda.local.array(64, float64)
    sc = cuda.local.array((14, 1), float64)
    ibuf = cuda.local.array(1, int64)
    dI = dI_[:npar]
    v = _pixel_tangent(fpixel, spixel, S, d, L, dP_[:npar], dd_[:npar], dq_[:npar], dI, dom_[:npar],
                       dcap_[:npar], dpol_[:npar], dm_[:npar], dbg_[:npar], lp, pbuf, fidx, fw, False, ori, fflat, has_dori,
                       base, flags, sc, ibuf)
    image[spixel, fpixel] = v * scale
    for p in range(npar):
        J[spixel, fpixel, p] = scale * dI[p] + d[p, L.scale] * v


@cuda.jit
def _adjoint_kernel(S, L, upstream, scale, xmin, ymin, nx, ny, acc, acc_or, gF, blk_I, blk_m, blk_K, blk_id, image):
    tid = cuda.grid(1)
    W = acc.shape[1]
    if tid >= W:
        return
    g = acc[:, tid]           # the layout L, then the structure-factor bound slot
    gor = acc_or[:, :, tid]
    for j in range(g.shape[0]):
        g[j] = 0.0
    for j in range(9):
        for o in range(gor.shape[1]):
            gor[j, o] = 0.0
    lp = cuda.local.array(LP_SIZE, float64)
    pbuf = cuda.local.array(10, float64)
    fidx = cuda.local.array(64, int64)
    fw = cuda.local.array(64, float64)
    rec = cuda.local.array(4, int64)
    fac = cuda.local.array(4, float64)
    bI = blk_I[:, tid]
    bm = blk_m[:, tid]
    bK = blk_K[:, tid]
    bid = blk_id[:, tid]
    want_image = image.shape[0] > 0
    use_mask = S.det.use_mask
    mask = S.det.mask
    for i in range(tid, nx * ny, W):
        spixel = ymin + i // nx
        fpixel = xmin + i % nx
        if use_mask and mask[spixel, fpixel] == 0:
            continue
        gv = upstream[spixel, fpixel] * scale
        if gv == 0.0:
            continue
        v = _pixel_adjoint(fpixel, spixel, gv, S, L, bI, bm, bK, bid, rec, fac, lp, pbuf, fidx, fw, g, gor, gF)
        if want_image:
            image[spixel, fpixel] = v * scale


@cuda.jit
def _reduce_rows_serial(acc, out):
    """out[k] = sum over w of acc[k, w] in order, one thread per row (small W)."""
    k = cuda.grid(1)
    if k < acc.shape[0]:
        s = 0.0
        for w in range(acc.shape[1]):
            s += acc[k, w]
        out[k] = s


@cuda.jit
def _reduce_rows(acc, out):
    """out[k] = sum over w of acc[k, w], in a fixed order (one block per row k)."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    part = cuda.shared.array(REDUCE_THREADS, float64)
    s = 0.0
    for w in range(t, acc.shape[1], REDUCE_THREADS):
        s += acc[k, w]
    part[t] = s
    cuda.syncthreads()
    step = REDUCE_THREADS // 2
    while step > 0:
        if t < step:
            part[t] += part[t + step]
        cuda.syncthreads()
        step //= 2
    if t == 0:
        out[k] = part[0]


# ----------------------------------------------------------------------------- host side

def check_available():
    """Raise BackendError unless a CUDA device (or the simulator) can be used."""
    try:
        ok = cuda.is_available()
    except Exception as exc:  # pragma: no cover - driver trouble
        raise BackendError(f"backend 'cuda': the CUDA driver cannot be used ({exc})") from None
    if not ok:
        raise BackendError("backend 'cuda': no CUDA GPU is visible to numba-cuda (check the driver and "
                           "CUDA_VISIBLE_DEVICES), or use backend 'cpu'")


def _blocks(n):
    return max(1, (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


def _on_device(block):
    return type(block)(*(cuda.to_device(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                         for v in block))


class _Inputs:
    """A scene on the device (float32 copies with ``single``)."""

    def __init__(self, scene, single=False):
        from .scene import roi_clipped
        self.host = as_single(scene) if single else scene
        self.dev = Scene(*(_on_device(b) for b in self.host))
        self.shape = (scene.det.spixels, scene.det.fpixels)
        xmin, xmax, ymin, ymax = roi_clipped(scene.det)
        self.xmin, self.ymin = xmin, ymin
        self.nx = max(0, xmax - xmin + 1)
        self.ny = max(0, ymax - ymin + 1)
        dtype = np.float32 if single else np.float64
        self.ori_dummy = cuda.to_device(np.zeros((9, 1), dtype=dtype))
        self.fflat_dummy = cuda.to_device(np.zeros(1, dtype=dtype))


def _forward_setup(scene, single):
    """(inputs, kernel, image, omega) on the device for a forward launch."""
    check_available()
    inp = _Inputs(scene, single)
    dtype = np.float32 if single else np.float64
    kernel = _forward_kernel_single if single else _forward_kernel
    return (inp, kernel, cuda.to_device(np.zeros(inp.shape, dtype=dtype)),
            cuda.to_device(np.zeros(inp.shape, dtype=dtype)))


def render(scene, progress=None, single=False):
    """Forward image (unscaled kernel values, float64) and the omega sum; ``single``:
    computed in float32."""
    inp, kernel, image, omega = _forward_setup(scene, single)
    n = inp.nx * inp.ny
    if n > 0:
        # launches of whole rows, so that progress can be reported between them
        rows = inp.ny if progress is None else max(1, -(-inp.ny // 50))
        for y0 in range(0, inp.ny, rows):
            ny = min(rows, inp.ny - y0)
            kernel[_blocks(inp.nx * ny), THREADS_PER_BLOCK](
                inp.dev, inp.ori_dummy, inp.fflat_dummy, inp.xmin, inp.ymin + y0, inp.nx, ny, image, omega)
            if progress is not None:
                cuda.synchronize()
                progress(y0 + ny, inp.ny)
    img = image.copy_to_host().astype(np.float64, copy=False)
    om = omega.copy_to_host().astype(np.float64, copy=False)
    return img, float(om.sum(axis=1).sum())


def forward_kernel_seconds(scene, repeat=3, single=False):
    """Best time of the forward kernel alone (inputs already on the device, no copies)."""
    inp, kernel, image, omega = _forward_setup(scene, single)
    n = inp.nx * inp.ny
    times = []
    for _ in range(repeat + 1):            # the first launch compiles or loads
        cuda.synchronize()
        t0 = time.perf_counter()
        if n > 0:
            kernel[_blocks(n), THREADS_PER_BLOCK](
                inp.dev, inp.ori_dummy, inp.fflat_dummy, inp.xmin, inp.ymin, inp.nx, inp.ny, image, omega)
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def run_tangent(scene, L, d, scale):
    """Jacobian (spixels, fpixels, P) of the scaled image along the directions d (P, L.size),
    and the scaled image."""
    check_available()
    inp = _Inputs(scene)
    P = d.shape[0]
    J = np.zeros(inp.shape + (P,))
    image = np.zeros(inp.shape)
    dummy_has = cuda.to_device(np.zeros(1, dtype=np.bool_))     # (the walk's own loops: no square_tangent)
    dummy_base = cuda.to_device(np.zeros((1, 9)))
    n = inp.nx * inp.ny
    for p0 in range(0, P, MAXP):
        group = np.ascontiguousarray(d[p0:p0 + MAXP])
        Pg = group.shape[0]
        flags = T.tangent_flags(group, L)
        Jd = cuda.to_device(np.zeros(inp.shape + (Pg,)))
        imd = cuda.to_device(np.zeros(inp.shape))
        if n > 0:
            _tangent_kernel[_blocks(n), THREADS_PER_BLOCK](
                inp.dev, cuda.to_device(group), L, scale, cuda.to_device(flags), inp.ori_dummy, inp.fflat_dummy,
                dummy_has, dummy_base, inp.xmin, inp.ymin, inp.nx, inp.ny, Jd, imd)
        J[:, :, p0:p0 + Pg] = Jd.copy_to_host()
        image = imd.copy_to_host()
    return J, image


def adjoint_threads(npixels, per_thread_bytes):
    """W, the number of adjoint threads: a function of the problem only."""
    by_memory = max(1, ADJOINT_BUDGET // max(per_thread_bytes, 1))
    return int(max(1, min(npixels, ADJOINT_MAX_THREADS, by_memory)))


def _reduce(acc):
    """Sum a (K..., W) device array over its last axis, deterministically; host result."""
    shape = tuple(acc.shape)
    rows = int(np.prod(shape[:-1]))
    if rows == 0:
        return np.zeros(shape[:-1])
    flat = acc.reshape(rows, shape[-1])
    out = cuda.device_array(rows, dtype=np.float64)
    if shape[-1] <= SERIAL_REDUCE_MAX:
        _reduce_rows_serial[_blocks(rows), THREADS_PER_BLOCK](flat, out)
    else:
        _reduce_rows[rows, REDUCE_THREADS](flat, out)
    return out.copy_to_host().reshape(shape[:-1])


def raw_adjoint(scene, L, upstream, scale, want_F, want_image):
    """dL/d(scene inputs) in the layout L, summed over pixels in a fixed order.

    Returns (g (L.size,), gF (grid shape) or None, scaled image or None)."""
    check_available()
    inp = _Inputs(scene)
    det = scene.det
    grid = scene.fhkl.grid
    nsrc = scene.beam.sources.shape[0]
    norient = scene.xtal.orients.shape[0]
    nblocks = int(det.thicksteps * det.oversample ** 2 * nsrc)
    per_thread = 8 * (L.size + 1 + 9 * norient + 4 * nblocks)
    n = inp.nx * inp.ny
    W = adjoint_threads(max(n, 1), per_thread)
    acc = cuda.device_array((L.size + 1, W))
    acc_or = cuda.device_array((9, norient, W))
    blk_I = cuda.device_array((nblocks, W))
    blk_m = cuda.device_array((nblocks, W))
    blk_K = cuda.device_array((nblocks, W), dtype=np.int64)
    blk_id = cuda.device_array((nblocks, W), dtype=np.int64)
    g = cuda.to_device(np.ascontiguousarray(upstream, dtype=np.float64))
    image = cuda.to_device(np.zeros(inp.shape) if want_image else np.zeros((0, 0)))
    gF_words = np.zeros((2, grid.size + 1), dtype=np.uint64)
    gF_words[0, -1] = _MODE_BOUND if want_F else _MODE_OFF
    gF = cuda.to_device(gF_words)

    def launch():
        _adjoint_kernel[_blocks(W), THREADS_PER_BLOCK](
            inp.dev, L, g, scale, inp.xmin, inp.ymin, inp.nx, inp.ny, acc, acc_or, gF, blk_I, blk_m, blk_K,
            blk_id, image)

    launch()
    total = _reduce(acc)
    result_F = None
    if want_F:
        bound = total[L.size]
        result_F = np.zeros(grid.shape)
        if not np.isfinite(bound):
            # a non-finite contribution has no fixed-point form: say so, as NaN, rather
            # than return a gradient without it
            result_F[:] = np.nan
        elif bound > 0.0:
            # scale so that every partial sum stays below 2^125 in magnitude
            exponent = int(125 - math.ceil(math.log2(bound)))
            exponent = max(-1000, min(1000, exponent))
            gF_words[:] = 0
            gF_words[0, -1] = _MODE_SUM
            gF_words[1, -1] = exponent + 1024
            gF = cuda.to_device(gF_words)
            launch()
            words = gF.copy_to_host()[:, :-1]
            result_F = fixed_to_float(words, exponent).reshape(grid.shape)
            total = _reduce(acc)
    out = total[:L.size].copy()
    gor = _reduce(acc_or)                      # (9, m): rows a_x ... c_z
    out[L.orients:L.orients + 9 * L.npad] = orients_to_soa(gor.T.reshape(norient, 3, 3), L.npad)
    img = image.copy_to_host() if want_image else None
    return out, result_F, img
