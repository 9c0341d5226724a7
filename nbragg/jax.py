"""The JAX bridge: nbragg's image as a differentiable JAX function.

``simulate(exp, params)`` returns the image for the named parameters ``params`` (a dict
name -> JAX array: 0-d for a scalar, the grid's shape for ``Fhkl``).  It is a
``jax.custom_vjp`` function: the forward pass runs nbragg on the host through
``jax.pure_callback``, and the backward pass is nbragg's adjoint (:func:`nbragg.gradient`:
one kernel pass for every parameter, memory O(pixels)).  It works under ``jax.jit``,
``jax.grad`` and ``jax.vmap`` (a batch runs one image after another).  The backward pass
asks only for the parameters being differentiated (a structure-factor grid passed as a
constant costs nothing).  Forward-mode derivatives (``jax.jvp``, ``jax.jacfwd``) are not
defined; ``jax.jacrev`` works but runs one adjoint pass per pixel (``nbragg.jacobian``
gives the Jacobian in one tangent pass).

nbragg computes in float64.  Enable JAX's 64-bit mode for exact gradients::

    jax.config.update("jax_enable_x64", True)

Without it the image and the gradients are rounded to float32 on their way back to JAX.
The image has JAX's default float type (float64 in 64-bit mode); each parameter's
gradient has that parameter's dtype.  Integer values (``Na=5``) are taken as floats.

Importing :mod:`nbragg` never imports JAX; only ``import nbragg.jax`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero
except ImportError as exc:          # one clear message instead of a bare "No module named"
    raise ImportError(f"nbragg.jax needs JAX: pip install jax (or the nbragg[jax] extra) ({exc})") from exc

import numpy as np

from .engine import build_model, check_backend
from .engine import simulate as _simulate
from .errors import ParameterError
from .experiment import Experiment
from .gradients import _response_of, gradient
from .params import check_names, get_params, set_params
from .response import expected_signal

__all__ = ["simulate"]

# XLA may run host callbacks from several threads at once; nbragg's Numba kernels and
# their thread pool are called one at a time
_HOST_LOCK = threading.Lock()


def _quiet(msg):
    pass


def _default_float():
    """JAX's default float: float64 in 64-bit mode, else float32."""
    return jnp.asarray(0.0).dtype


class _Static:
    """A residual that is not an array (the indices of the perturbed parameters): a pytree
    with no leaves, so custom_vjp carries it as structure."""

    def __init__(self, value):
        self.value = value


jax.tree_util.register_pytree_node(_Static, lambda s: ((), s.value), lambda aux, _: _Static(aux))


def _as_value(name, value, shape):
    """A parameter's value as a JAX float array of the expected shape."""
    try:
        x = jnp.asarray(value)
    except TypeError:
        raise ParameterError(f"parameter {name!r}: value of type {type(value).__name__} is not an array") from None
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ParameterError(f"parameter {name!r}: complex values are not supported")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(_default_float())
    if x.shape != shape:
        want = "a 0-d array (a scalar)" if shape == () else f"shape {shape}"
        raise ParameterError(f"parameter {name!r}: got shape {x.shape}, expected {want}")
    return x


def _host_values(names, values):
    """The values nbragg.set_params takes: floats, and a float64 grid for Fhkl."""
    return {n: (np.array(v, dtype=np.float64) if n == "Fhkl" else float(np.asarray(v)))
            for n, v in zip(names, values)}


def _bridge(exp, names, shape, backend, threads, detected):
    """The custom_vjp function of the parameters' values (in the order of ``names``)."""
    out = jax.ShapeDtypeStruct(shape, _default_float())

    def forward_host(*values):
        with _HOST_LOCK:
            e = set_params(exp, _host_values(names, values))
            image = _simulate(e, backend=backend, threads=threads, warn=_quiet).image
            if detected:
                image = expected_signal(image, e.response, e.detector.pixel_size)
        return np.asarray(image, dtype=out.dtype).reshape(shape)

    def image(*values):
        return jax.pure_callback(forward_host, out, *values, vmap_method="sequential")

    fn = jax.custom_vjp(image)

    def fwd(*primals):
        values = tuple(p.value for p in primals)
        # only the parameters being differentiated get gradients (Fhkl's is not free)
        wanted = tuple(i for i, p in enumerate(primals) if p.perturbed)
        return image(*values), (values, _Static(wanted))

    def bwd(res, g):
        values, wanted = res[0], res[1].value
        zeros = [jnp.zeros_like(v) for v in values]
        if isinstance(g, SymbolicZero) or not wanted:
            return tuple(zeros)
        grad_names = [names[i] for i in wanted]
        specs = tuple(jax.ShapeDtypeStruct(values[i].shape, values[i].dtype) for i in wanted)

        def backward_host(*args):
            *vals, upstream = args
            with _HOST_LOCK:
                e = set_params(exp, _host_values(names, vals))
                grads = gradient(e, grad_names, np.asarray(upstream, dtype=np.float64), backend=backend,
                                 threads=threads, detected=detected)
            return tuple(np.asarray(grads[n], dtype=s.dtype).reshape(s.shape) for n, s in zip(grad_names, specs))

        got = jax.pure_callback(backward_host, specs, *values, g, vmap_method="sequential")
        for i, c in zip(wanted, got):
            zeros[i] = c
        return tuple(zeros)

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return fn


def simulate(exp, params, backend="cpu", threads=None, detected=False, warn=None):
    """The image of ``exp`` with the named parameters set, as a differentiable JAX array.

    Parameters
    ----------
    exp : Experiment
        every parameter not in ``params`` keeps its value here
    params : dict name -> array
        nbragg parameter names (see :mod:`nbragg.params`: cell_a ... Fhkl) mapped to JAX
        arrays (or numbers): 0-d for scalars, the grid's shape for ``Fhkl``
    backend, threads : as in :func:`nbragg.simulate` (for the image and its gradient)
    detected : return the detector's expected signal E (``Experiment.response``; see
        :mod:`nbragg.gradients`) instead of the photons; needed for the response's
        parameters (psf_fwhm, gain, response_scale, adc)
    warn : callable receiving the experiment's warnings, given once when the call is
        traced (default: the ``nbragg`` logger)

    Returns
    -------
    jax.Array
        photons (``nbragg.simulate(...).image``), shape (spixels, fpixels) or (panels,
        spixels, fpixels), in JAX's default float type
    """
    if not isinstance(exp, Experiment):
        raise ParameterError(f"expected an nbragg.Experiment, got {type(exp).__name__}")
    if not isinstance(params, Mapping):
        raise ParameterError(f"params must be a dict of parameter name -> value, got {type(params).__name__}")
    names = tuple(check_names(list(params)))
    check_backend(backend)
    _response_of(exp, names, detected)
    # checked here, when traced, so that a bad name fails with nbragg's message rather than
    # inside a host callback; this also gives the shapes (Fhkl's grid)
    current = get_params(exp, names)
    values = tuple(_as_value(n, params[n], np.shape(current[n])) for n in names)
    if not any(isinstance(v, jax.core.Tracer) for v in values):
        # concrete values (an eager call): a bad one (cell_a = -1) fails here as a
        # ParameterError, not as an XLA runtime error from inside the callback
        set_params(exp, _host_values(names, values))
    shape = tuple(build_model(exp, warn=warn).shape)
    return _bridge(exp, names, shape, backend, threads, detected)(*values)
