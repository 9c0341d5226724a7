"""Frame i of a dataset: its drawn parameters, its experiment, its simulated images."""

from __future__ import annotations

import math

import numpy as np

from ..errors import NbraggError
from .spec import COUNT_TYPES, RESPONSE_PREFIX, DatasetError, material



_BASE_CACHE = {}


def base_experiment(spec):
    """The spec's base Experiment (parsed once per process)."""
    key = (spec.digest(), spec.base_dir)
    if key not in _BASE_CACHE:
        from ..nbargs import parse_nanobragg_args
        parsed = parse_nanobragg_args(spec.base, cwd=spec.base_dir, warn=lambda m: None)
        exp = parsed.experiment
        if exp.detector.panels is not None and len(exp.detector.panels) > 1:
            raise DatasetError(f"base: the detector has {len(exp.detector.panels)} panels (-expt); datasets "
                               f"hold one panel's frames for now: pick one (-expt of a one-panel list), or "
                               f"simulate the panels with nbragg.simulate")
        if spec.background:
            exp = exp.replace(background=[material(m, spec.base_dir) for m in spec.background])
        _BASE_CACHE[key] = exp
    return _BASE_CACHE[key]


def _draw(dist, base_value, rng):
    if not isinstance(dist, dict):
        return float(dist)
    kind, arg = next(iter(dist.items()))
    if kind == "uniform":
        return float(rng.uniform(arg[0], arg[1]))
    if kind == "normal":
        return float(rng.normal(arg[0], arg[1]))
    if kind == "jitter":
        return float(base_value * (1.0 + rng.normal(0.0, arg)))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
    if kind == "integers":
        return float(rng.integers(int(arg[0]), int(arg[1]) + 1))
    return float(arg[int(rng.integers(0, len(arg)))])


def frame_parameters(spec, base, index):
    """(values: {name: float}, orientation 3x3) for frame ``index`` -- deterministic."""
    from ..params import get_params
    rng = np.random.default_rng([spec.seed, index])
    orientation = np.eye(3)
    if spec.vary.get("orientation") == "uniform":
        from scipy.spatial.transform import Rotation
        orientation = Rotation.random(random_state=rng).as_matrix()
    names = spec.experiment_names()
    base_values = get_params(base, names)
    values = {n: _draw(spec.vary[n], base_values[n], rng) for n in names}
    if spec.background_names():
        # the materials' draws, too, come from a stream of their own
        brng = np.random.default_rng([spec.seed, index, 4])
        for n in spec.background_names():
            field, i = n[len("background_"):].rsplit("_", 1)
            values[n] = _draw(spec.background[int(i)][field], None, brng)
    if spec.response_names():
        # the response's draws come from a stream of their own, so adding a response to a
        # spec leaves the experiments' draws as they were
        rrng = np.random.default_rng([spec.seed, index, 2])
        for n in spec.response_names():
            values[n] = _draw(spec.response[n[len(RESPONSE_PREFIX):]], None, rrng)
    return values, orientation


def frame_response(spec, values, index):
    """(Response, noise seed) of frame ``index`` (None, None without a response)."""
    if not spec.response:
        return None, None
    from ..experiment import Response
    fields = {k: (values[RESPONSE_PREFIX + k] if isinstance(v, dict) else v) for k, v in spec.response.items()}
    seed = int(np.random.SeedSequence([spec.seed, index, 3]).generate_state(1)[0])
    return Response(**fields, bits=16 if spec.counts == "uint16" else 32, seed=seed), seed


def frame_spectrum(spec, index, wavelength):
    """Frame ``index``'s incident spectrum (wavelengths_A, weights) about ``wavelength``
    (Angstrom), or None when the spec draws none -- deterministic."""
    if not spec.spectrum:
        return None
    from ..spectrum import sase_spectrum
    seed = int(np.random.SeedSequence([spec.seed, index, 5]).generate_state(1)[0])
    return sase_spectrum(wavelength=wavelength, seed=seed, **spec.spectrum["sase"])


def frame_experiment(base, values, orientation, spec=None, index=None):
    """The Experiment of one frame: the base with ``values`` set and ``orientation``
    applied before the base orientation's misset; with the ``spec`` and the frame's
    ``index``, also the frame's spectrum (:func:`frame_spectrum`)."""
    from ..params import set_params
    values = {n: v for n, v in (values or {}).items() if not n.startswith(RESPONSE_PREFIX)}
    exp = set_params(base, values) if values else base
    spectrum = frame_spectrum(spec, index, exp.beam.wavelength) if spec is not None else None
    if spectrum is not None:
        exp = exp.replace(beam=exp.beam.replace(spectrum=spectrum))
    if orientation is not None and not np.allclose(orientation, np.eye(3)):
        U0 = np.eye(3) if exp.crystal.orientation is None else np.asarray(exp.crystal.orientation)
        exp = exp.replace(crystal=exp.crystal.replace(orientation=np.asarray(orientation) @ U0))
    return exp


def simulate_frame(spec, index, threads=None, backend="cpu"):
    """Simulate frame ``index``: a dict of arrays (images, parameters)."""
    from ..engine import simulate
    base = base_experiment(spec)
    values, orientation = frame_parameters(spec, base, index)
    try:
        exp = frame_experiment(base, values, orientation, spec, index)
    except NbraggError as exc:
        raise DatasetError(f"frame {index}: the drawn parameters make no valid experiment: {exc}") from None
    J = None
    if spec.jacobian and backend == "cpu" and spec.precision == "float64":
        # one pass: the tangent kernel's image is the forward one, bit for bit, on the CPU
        from ..gradients import jacobian
        J, image = jacobian(exp, spec.jacobian, threads=threads, backend=backend, return_image=True)
    else:
        image = simulate(exp, backend=backend, threads=threads, warn=lambda m: None, precision=spec.precision).image
    out = {"params": np.array([values[n] for n in spec.varied_names()], dtype=np.float64),
           "orientation": orientation}
    if spec.spectrum:
        out["spectrum"] = np.column_stack(exp.beam.spectrum)
    if spec.float_out:
        out["photons"] = image.astype(np.float32)
    if spec.response:
        from ..response import respond
        try:
            response, _ = frame_response(spec, values, index)
            out["counts"] = respond(image, response, exp.detector.pixel_size).adu
        except NbraggError as exc:
            raise DatasetError(f"frame {index}: the drawn detector response is not valid: {exc}") from None
    elif spec.counts:
        rng = np.random.default_rng([spec.seed, index, 1])
        cnt = rng.poisson(np.clip(image, 0.0, None))
        out["counts"] = np.minimum(cnt, np.iinfo(COUNT_TYPES[spec.counts]).max).astype(COUNT_TYPES[spec.counts])
    if spec.labels:
        # the reflection table as rows of numbers (columns: nbragg.labels.COLUMNS) and the
        # per-pixel label images; computed on the CPU
        from ..engine import build_model
        from ..labels import COLUMNS, label
        table, lab = label(build_model(exp, warn=lambda m: None), threads=threads)
        out["reflections"] = np.column_stack([table[c].to_numpy(dtype=np.float64) for c in COLUMNS]).reshape(-1, len(COLUMNS))
        out["label_reflection"] = lab.reflection.astype(np.int32)
        out["label_spot_mask"] = lab.spot_mask.astype(np.uint8)
    if spec.jacobian:
        if J is None:
            from ..gradients import jacobian
            J = jacobian(exp, spec.jacobian, threads=threads, backend=backend)
        out["jacobian"] = J.reshape(image.shape + (len(spec.jacobian),)).transpose(2, 0, 1).astype(np.float32)
    return out
