"""PyTorch bridge: nbragg's image as a differentiable function of torch tensors.

``import nbragg`` never imports torch; this module does (``pip install torch``, or the
``nbragg[torch]`` extra).

:func:`simulate` maps named parameters (see :mod:`nbragg.params`) held as tensors to the
image, through a :class:`torch.autograd.Function` whose backward is nbragg's adjoint
(:func:`nbragg.gradient`): one pass of the adjoint kernel for every parameter together,
memory O(pixels) whatever their number.  :class:`Simulator` is an ``nn.Module`` holding
the parameters as ``nn.Parameter``.

The image is always computed in float64 by nbragg and returned in the parameters' dtype
(and the gradients in each parameter's dtype).  nbragg's kernels run on host arrays or
through numba-cuda and return host numpy arrays: with tensors on a CUDA device the bridge
runs ``backend="cuda"`` and copies the image to the device after the forward, and the
upstream gradient to the host before the backward (one copy of an image each way; the
parameters themselves are read as Python numbers).  Sharing device memory with torch
(DLPack) would need the engine to hand back device arrays, which it does not.

Only first derivatives: the backward is not itself differentiable.
"""

from __future__ import annotations

try:
    import torch
except ImportError as exc:          # the one place torch is needed
    raise ImportError("nbragg.torch needs PyTorch, which is not installed: pip install torch "
                      "(or pip install 'nbragg[torch]')") from exc

from functools import reduce

import numpy as np
from torch.autograd.function import once_differentiable

from .engine import build_model, check_backend, render
from .errors import ParameterError
from .experiment import Experiment
from .gradients import _response_of, gradient
from .params import check_names, get_params, set_params

__all__ = ["simulate", "Simulator"]


class _Call:
    """What one forward needs besides the values: the experiment, the names in the order
    of the values, and how to run."""

    def __init__(self, exp, names, backend, threads, detected, warn, dtype, device):
        self.exp, self.names, self.backend, self.threads = exp, names, backend, threads
        self.detected, self.warn, self.dtype, self.device = detected, warn, dtype, device

    def experiment(self, values):
        return set_params(self.exp, {n: _number(n, v) for n, v in zip(self.names, values)})

    def image(self, exp):
        """Photons (``nbragg.simulate(exp).image``), or the detector's expected signal."""
        image = render(build_model(exp, warn=self.warn), backend=self.backend, threads=self.threads)[0]
        if self.detected:
            from .response import expected_signal
            image = expected_signal(image, exp.response, exp.detector.pixel_size)
        return image


def _number(name, value):
    """A tensor as set_params takes it: a float, or a float64 array for Fhkl."""
    v = value.detach()
    if name == "Fhkl":
        return v.to("cpu", torch.float64).numpy()
    if v.ndim != 0:
        raise ParameterError(f"parameter {name!r}: expected a 0-d tensor, got shape {tuple(v.shape)}")
    return float(v)


class _Image(torch.autograd.Function):
    """values -> image; backward: nbragg.gradient with the upstream image."""

    @staticmethod
    def forward(ctx, call, *values):
        exp = call.experiment(values)
        image = call.image(exp)
        ctx.call, ctx.exp = call, exp
        ctx.like = [(v.dtype, v.device) for v in values]
        return torch.from_numpy(image).to(device=call.device, dtype=call.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        call = ctx.call
        need = [n for n, wanted in zip(call.names, ctx.needs_input_grad[1:]) if wanted]
        grads = {}
        if need:
            upstream = grad_output.detach().to("cpu", torch.float64).contiguous().numpy()
            grads = gradient(ctx.exp, need, upstream, backend=call.backend, threads=call.threads,
                             detected=call.detected)
        out = [None]                     # for ``call``
        for n, (dtype, device) in zip(call.names, ctx.like):
            out.append(torch.as_tensor(grads[n], dtype=torch.float64).to(device=device, dtype=dtype)
                       if n in grads else None)
        return tuple(out)


def _tensors(params):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameter name -> tensor, got {type(params).__name__}")
    check_names(list(params))
    return {n: v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
            for n, v in params.items()}


def _placement(values, backend):
    """(dtype, device, backend) of the output: the values' common device and promoted
    floating dtype (float64 when there is none); backend "cuda" for CUDA tensors."""
    devices = {v.device for v in values}
    if len(devices) > 1:
        raise ValueError(f"parameter tensors are on different devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    floats = [v.dtype for v in values if v.is_floating_point()]
    dtype = reduce(torch.promote_types, floats) if floats else torch.float64
    if backend is None:
        backend = "cuda" if device.type == "cuda" else "cpu"
    return dtype, device, check_backend(backend)


def _one(exp, values, backend, threads, detected, warn):
    if not isinstance(exp, Experiment):
        raise TypeError(f"expected an nbragg.Experiment (or a list of them), got {type(exp).__name__}")
    names = list(values)
    _response_of(exp, names, detected)          # response parameters need detected=True, and a response
    dtype, device, backend = _placement(list(values.values()), backend)
    call = _Call(exp, names, backend, threads, detected, warn, dtype, device)
    return _Image.apply(call, *values.values())


def simulate(exp, params, backend=None, threads=None, detected=False, warn=None):
    """The image as a torch tensor, differentiable with respect to ``params``.

    Parameters
    ----------
    exp : Experiment, or a list of them (a batch)
    params : dict name -> tensor (see :mod:`nbragg.params` for the names and units): a
        0-d tensor for a scalar, an array of the grid's shape for ``Fhkl``.  With a batch,
        a value with a leading axis of the batch's length gives each experiment its own
        value; one without it is shared by all (its gradient sums over the batch).
        Parameters not named keep the experiment's values.
    backend : "cpu" or "cuda"; None: "cuda" when the tensors are on a CUDA device
    threads : CPU threads (None: Numba's default)
    detected : return the detector's expected signal E = adc + gain * PSF * (scale *
        calibration * photons) of ``exp.response`` (no noise) instead of the photons; the
        response's own parameters (psf_fwhm, gain, response_scale, adc) need it
    warn : callable receiving nbragg's warnings (default: the ``nbragg`` logger)

    Returns
    -------
    torch.Tensor
        ``nbragg.simulate(exp).image`` with the parameters set: (slow, fast), or (panels,
        slow, fast); a batch stacks them on a leading axis.  Its dtype is the parameters'
        (promoted; float64 if none is floating), its device theirs.  The gradient of any
        loss comes from one adjoint pass per experiment (:func:`nbragg.gradient` with the
        upstream ``grad_output``), for the tensors that require grad.
    """
    values = _tensors(params)
    if isinstance(exp, Experiment):
        return _one(exp, values, backend, threads, detected, warn)
    exps = list(exp)
    if not exps:
        raise ValueError("simulate: the list of experiments is empty")
    per = [{} for _ in exps]
    for n, v in values.items():
        base = 3 if n == "Fhkl" else 0            # the grid is (h, k, l)
        if v.ndim == base:
            for p in per:
                p[n] = v
        elif v.ndim == base + 1 and v.shape[0] == len(exps):
            for i, p in enumerate(per):
                p[n] = v[i]
        else:
            raise ParameterError(f"parameter {n!r}: shape {tuple(v.shape)} for a batch of {len(exps)} "
                                 f"experiments; expected a leading axis of {len(exps)}"
                                 + (" (or none, to share one value)" if n != "Fhkl" else ""))
    images = [_one(e, p, backend, threads, detected, warn) for e, p in zip(exps, per)]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"simulate: the experiments of a batch make images of different shapes {sorted(shapes)}")
    return torch.stack(images)


class Simulator(torch.nn.Module):
    """The image as a module of named parameters.

    ``Simulator(exp, names)`` holds each named parameter as a float64 ``nn.Parameter``
    (in ``self.params``, a ParameterDict keyed by name) initialised from
    ``nbragg.get_params(exp, names)`` or from ``init`` (name -> value); with a list of
    experiments each gets a leading batch axis.  ``forward()`` returns the image (see
    :func:`simulate`); ``experiment()`` the Experiment(s) with the current values.
    """

    def __init__(self, exp, names, init=None, backend=None, threads=None, detected=False, warn=None):
        super().__init__()
        names = check_names(names)
        init = dict(init or {})
        extra = [n for n in init if n not in names]
        if extra:
            raise ParameterError(f"init names {extra[0]!r}, which is not among the parameters {names}")
        self.exp = exp
        self.backend, self.threads, self.detected, self.warn = backend, threads, detected, warn
        exps = [exp] if isinstance(exp, Experiment) else list(exp)
        self.params = torch.nn.ParameterDict()
        for n in names:
            if n in init:
                v = torch.as_tensor(init[n]).detach().to(torch.float64).clone()
            else:
                start = [np.asarray(get_params(e, [n])[n], dtype=np.float64) for e in exps]
                v = torch.from_numpy(start[0] if isinstance(exp, Experiment) else np.stack(start))
            self.params[n] = torch.nn.Parameter(v)

    def forward(self):
        return simulate(self.exp, dict(self.params), backend=self.backend, threads=self.threads,
                        detected=self.detected, warn=self.warn)

    def experiment(self):
        """The Experiment (or list) with the parameters' current values."""
        values = {n: p.detach().to("cpu", torch.float64).numpy() for n, p in self.params.items()}
        if isinstance(self.exp, Experiment):
            return set_params(self.exp, {n: v if n == "Fhkl" else float(v) for n, v in values.items()})
        out = []
        for i, e in enumerate(self.exp):
            pick = {n: v[i] if v.ndim > (3 if n == "Fhkl" else 0) else v for n, v in values.items()}
            out.append(set_params(e, {n: v if n == "Fhkl" else float(v) for n, v in pick.items()}))
        return out
