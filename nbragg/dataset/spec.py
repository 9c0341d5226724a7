"""The dataset spec: its schema, validation and loading (YAML, JSON or a dict)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..errors import InputFileError, NbraggError


DIST_KINDS = ("uniform", "normal", "jitter", "loguniform", "integers", "choice")
COUNT_TYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DatasetError(NbraggError):
    """A dataset spec or output that cannot be used."""


@dataclass
class DatasetSpec:
    seed: int
    images: int
    shard_size: int
    base: List[str]
    base_dir: str
    vary: dict = field(default_factory=dict)
    float_out: bool = True
    counts: Optional[str] = "uint16"
    jacobian: List[str] = field(default_factory=list)
    compression: str = "bitshuffle"
    precision: str = "float64"
    response: dict = field(default_factory=dict)
    background: list = field(default_factory=list)
    labels: bool = False
    spectrum: dict = field(default_factory=dict)

    def canonical(self):
        """A JSON text that identifies the content the spec produces."""
        content = {"seed": self.seed, "images": self.images, "shard_size": self.shard_size,
                   "base": self.base, "vary": self.vary, "float": self.float_out, "counts": self.counts,
                   "jacobian": self.jacobian, "compression": self.compression}
        if self.precision != "float64":      # (datasets made before the field keep their identity)
            content["precision"] = self.precision
        if self.response:
            content["response"] = self.response
        if self.background:
            content["background"] = self.background
        if self.labels:
            content["labels"] = True
        if self.spectrum:
            content["spectrum"] = self.spectrum
        return json.dumps(content, sort_keys=True)

    def digest(self):
        cached = self.__dict__.get("_digest")
        if cached is not None:
            return cached
        h = hashlib.sha256(self.canonical().encode())
        tables = [m["table"] for m in self.background if isinstance(m["table"], str)]   # files, not arrays
        for tok in self.base + tables:   # the content of input files the base and the materials name
            p = os.path.join(self.base_dir, tok)
            if os.path.isfile(p) and not tok.startswith("-"):
                with open(p, "rb") as fh:
                    h.update(fh.read())
        self.__dict__["_digest"] = h.hexdigest()[:16]
        return self.__dict__["_digest"]

    @property
    def nshards(self):
        return -(-self.images // self.shard_size)

    def spectrum_channels(self):
        """Channels of each frame's spectrum (0 when the spec draws none)."""
        if not self.spectrum:
            return 0
        from ..spectrum import DEFAULT_CHANNELS
        return self.spectrum["sase"].get("channels", DEFAULT_CHANNELS)

    def experiment_names(self):
        """The varied parameters of the experiment, in :mod:`nbragg.params` order."""
        from ..params import SCALAR_PARAMS, TERM_PARAMS
        return [n for n in SCALAR_PARAMS + TERM_PARAMS if n in self.vary]

    def response_names(self):
        """The detector-response fields drawn per frame, as ``response_<field>``."""
        return [RESPONSE_PREFIX + k for k in RESPONSE_NUMBERS if isinstance(self.response.get(k), dict)]

    def background_names(self):
        """The background materials' fields drawn per frame, as their parameters'
        names (``background_scale_<i>``, ``background_thickness_<i>``)."""
        return [f"background_{f}_{i}" for i, m in enumerate(self.background) for f in BACKGROUND_VARIED
                if isinstance(m.get(f), dict)]

    def varied_names(self):
        """Every per-frame parameter stored in the dataset's table."""
        return self.experiment_names() + self.background_names() + self.response_names()


RESPONSE_PREFIX = "response_"
# nbragg.Response fields a spec may set; the numbers may also be distributions.  bits
# follows outputs.counts and the noise seed comes from (seed, frame).
RESPONSE_NUMBERS = ("scale", "flicker", "calibration", "psf_fwhm", "gain", "adc", "readout")
RESPONSE_OTHERS = ("calibration_seed", "noise", "psf", "psf_radius")
# nbragg.Material fields a spec's background entries may set; the thickness and scale may
# be distributions (they are parameters: background_thickness_<i>, background_scale_<i>)
BACKGROUND_VARIED = ("scale", "thickness")
BACKGROUND_NUMBERS = ("width", "height", "density", "molecular_weight", "molecules")
BACKGROUND_FIELDS = ("table", "units") + BACKGROUND_NUMBERS


def _spec_error(msg):
    raise DatasetError(f"dataset spec: {msg}")


def load_spec(source, base_dir=None):
    """A :class:`DatasetSpec` from a YAML/JSON file path or a dict."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError as exc:
            raise InputFileError(f"dataset spec {path!r} cannot be read: {exc.strerror}") from None
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:  # pragma: no cover - yaml comes with the dataset extra
                raise DatasetError("reading a YAML spec needs PyYAML (pip install pyyaml), or use JSON") from None
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InputFileError(f"dataset spec {path!r} is not valid YAML: {exc}") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"dataset spec {path!r} is not valid JSON: {exc}") from None
        base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    else:
        raw = source
        base_dir = base_dir or os.getcwd()
    if not isinstance(raw, dict):
        _spec_error("expected a mapping at the top level")
    known = {"seed", "images", "shard_size", "base", "vary", "outputs", "compression", "precision", "response",
             "background", "spectrum"}
    for k in raw:
        if k not in known:
            _spec_error(f"unknown field {k!r} (known: {', '.join(sorted(known))})")

    def integer(name, default=None, minimum=None):
        v = raw.get(name, default)
        if v is None:
            _spec_error(f"field {name!r} is required")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            _spec_error(f"{name} = {v!r} is not an integer")
        if minimum is not None and v < minimum:
            _spec_error(f"{name} = {v!r} must be at least {minimum}")
        return int(v)

    seed = integer("seed", 0, 0)
    images = integer("images", None, 1)
    shard_size = integer("shard_size", min(images, 100), 1)
    base = raw.get("base")
    if isinstance(base, str):
        base = base.split()
    if not isinstance(base, list) or not base or not all(isinstance(t, (str, int, float)) for t in base):
        _spec_error("base must be a nanoBragg command line (a string or a list of arguments)")
    base = [str(t) for t in base]
    vary = raw.get("vary") or {}
    if not isinstance(vary, dict):
        _spec_error("vary must be a mapping of parameter: distribution")
    vary = dict(vary)
    if "cell_jitter" in vary:
        try:
            r = _number(vary.pop("cell_jitter"))
        except ValueError:
            _spec_error("vary.cell_jitter must be a number")
        for n in ("cell_a", "cell_b", "cell_c"):
            vary.setdefault(n, {"jitter": r})
    from ..params import SCALAR_PARAMS, TERM_PARAMS
    parameters = SCALAR_PARAMS + TERM_PARAMS
    for name, dist in vary.items():
        if name == "orientation":
            if dist not in ("uniform", None, False):
                _spec_error(f"vary.orientation = {dist!r}: only 'uniform' is known")
            continue
        if name not in parameters:
            _spec_error(f"vary.{name}: unknown parameter (choose from orientation, cell_jitter, "
                        f"{', '.join(parameters)})")
        vary[name] = dist = _normalise_dist(name, dist)
        _check_dist(name, dist)
    outputs = raw.get("outputs") or {}
    if not isinstance(outputs, dict):
        _spec_error("outputs must be a mapping")
    for k in outputs:
        if k not in ("float", "counts", "jacobian", "labels"):
            _spec_error(f"outputs.{k}: unknown (known: float, counts, jacobian, labels)")
    labels = outputs.get("labels", False)
    if not isinstance(labels, bool):
        _spec_error(f"outputs.labels = {labels!r}: true or false")
    float_out = bool(outputs.get("float", True))
    counts = outputs.get("counts", "uint16")
    if counts in (None, False, "none"):
        counts = None
    elif counts not in COUNT_TYPES:
        _spec_error(f"outputs.counts = {counts!r}: choose uint16, uint32 or none")
    if not float_out and counts is None:
        _spec_error("outputs: ask for float photons, counts, or both")
    jac = outputs.get("jacobian") or []
    if isinstance(jac, str):
        jac = [jac]
    for n in jac:
        if n not in parameters:
            _spec_error(f"outputs.jacobian: unknown parameter {n!r}")
    compression = raw.get("compression", "bitshuffle")
    if compression not in ("bitshuffle", "gzip", "none"):
        _spec_error(f"compression = {compression!r}: choose bitshuffle, gzip or none")
    precision = raw.get("precision", "float64")
    if precision not in ("float64", "float32"):
        _spec_error(f"precision = {precision!r}: choose float64 or float32")
    response = _response_spec(raw.get("response"), counts)
    background = _background_spec(raw.get("background"), base_dir)
    spectrum = _spectrum_spec(raw.get("spectrum"))
    return DatasetSpec(seed=seed, images=images, shard_size=shard_size, base=base, base_dir=base_dir, vary=vary,
                       float_out=float_out, counts=counts, jacobian=list(jac), compression=compression,
                       precision=precision, response=response, background=background, labels=labels,
                       spectrum=spectrum)


SASE_FIELDS = {"bandwidth": float, "spikes": int, "channels": int, "span": float}


def _spectrum_spec(raw):
    """The spec's ``spectrum``: ``{sase: {bandwidth, spikes, channels, span}}``, a new
    SASE-like spectrum per frame about the frame's wavelength (nbragg.sase_spectrum)."""
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict) or list(raw) != ["sase"] or not isinstance(raw["sase"], (dict, type(None))):
        _spec_error(f"spectrum = {raw!r}: expected {{sase: {{bandwidth: ..., spikes: ..., channels: ...}}}}")
    out = {}
    for k, v in (raw["sase"] or {}).items():
        if k not in SASE_FIELDS:
            _spec_error(f"spectrum.sase.{k}: unknown field (known: {', '.join(SASE_FIELDS)})")
        kind = SASE_FIELDS[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v) or not v > 0:
            _spec_error(f"spectrum.sase.{k} = {v!r}: a positive {'whole number' if kind is int else 'number'}")
        out[k] = kind(v)
    return {"sase": out}


def _record_fields(where, entry, numbers, others):
    """A record's fields from a spec mapping: ``numbers`` may be distributions (but not
    jitter, which needs a base value), ``others`` are taken as given."""
    out = {}
    for k, v in entry.items():
        if k in numbers:
            out[k] = _normalise_dist(f"{where}.{k}", v)
            _check_dist(f"{where}.{k}", out[k])
            if isinstance(out[k], dict) and next(iter(out[k])) == "jitter":
                _spec_error(f"{where}.{k}: jitter needs a base value; give uniform, normal, ... instead")
        elif k in others:
            out[k] = v
        else:
            _spec_error(f"{where}.{k}: unknown field (known: {', '.join(numbers + others)})")
    return out


def _background_spec(raw, base_dir):
    """The spec's ``background`` list, checked: each entry a mapping of nbragg.Material
    fields (a table name or a file relative to the spec), distributions for the thickness
    and scale, and a Material that builds from the lowest values."""
    if raw in (None, [], False):
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        _spec_error("background must be a list of materials (mappings of nbragg.Material fields)")
    out = []
    for i, entry in enumerate(raw):
        where = f"background[{i}]"
        if not isinstance(entry, dict):
            _spec_error(f"{where} must be a mapping of nbragg.Material fields")
        m = _record_fields(where, entry, BACKGROUND_VARIED, BACKGROUND_FIELDS)
        for k in BACKGROUND_NUMBERS:
            if k in m:
                m[k] = _normalise_dist(f"{where}.{k}", m[k])   # (YAML reads 1e16 as text)
                if isinstance(m[k], dict):
                    _spec_error(f"{where}.{k}: only the thickness and the scale may vary; give a number")
        m.setdefault("table", "water")
        try:
            material(m, base_dir)
        except NbraggError as exc:
            _spec_error(f"{where}: {exc}")
        out.append(m)
    return out


def material(entry, base_dir):
    """The nbragg.Material of a spec's background entry: a table name or a file relative
    to the spec's folder; a distribution takes its lowest value (frames set their draws as
    parameters)."""
    from ..experiment import Material
    from ..io.stol import BUILTIN
    fields = dict(entry)
    table = fields.pop("table")
    if isinstance(table, str) and table not in BUILTIN:
        table = os.path.join(base_dir, table)
    for f in BACKGROUND_VARIED:
        if isinstance(fields.get(f), dict):
            fields[f] = _dist_low(fields[f])
    return Material(table=table, **fields)


def _response_spec(raw, counts):
    """The spec's ``response`` mapping, checked: known fields, distributions for the
    numbers, and a Response that builds from the lowest values."""
    if raw in (None, {}, False):
        return {}
    if not isinstance(raw, dict):
        _spec_error("response must be a mapping of nbragg.Response fields")
    if counts is None:
        _spec_error("response: the detector's pixel values are stored as outputs.counts; choose uint16 or uint32")
    for k in ("bits", "seed"):
        if k in raw:
            _spec_error(f"response.{k}: set by the dataset (bits by outputs.counts, the seed by seed and frame)")
    out = _record_fields("response", raw, RESPONSE_NUMBERS, RESPONSE_OTHERS)
    from ..errors import ParameterError
    from ..experiment import Response
    lowest = {k: (_dist_low(v) if k in RESPONSE_NUMBERS else v) for k, v in out.items()}
    try:
        Response(**lowest, bits=16 if counts == "uint16" else 32)
    except ParameterError as exc:
        _spec_error(f"response: {exc}")
    return out


def _dist_low(dist):
    """A representative (lowest) value of a number or distribution, for validation."""
    if not isinstance(dist, dict):
        return dist
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        return min(arg)
    if kind == "normal":
        return max(arg[0] - 3 * arg[1], 0.0) if arg[0] >= 0 else arg[0] - 3 * arg[1]
    return arg[0]


def _number(v):
    """A float from a number or a numeric string (YAML reads 1e28 as a string)."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return float(v)
    raise ValueError(v)


def _normalise_dist(name, dist):
    """Numbers in a distribution as floats; clear errors otherwise."""
    try:
        if not isinstance(dist, dict):
            return _number(dist)
        return {k: ([_number(x) for x in v] if isinstance(v, list) else _number(v)) for k, v in dist.items()}
    except ValueError:
        _spec_error(f"vary.{name} = {dist!r}: values must be numbers")


def _check_dist(name, dist):
    if isinstance(dist, (int, float)) and not isinstance(dist, bool):
        return
    if not isinstance(dist, dict) or len(dist) != 1:
        _spec_error(f"vary.{name} = {dist!r}: expected a number or one of "
                    + ", ".join("{%s: ...}" % k for k in DIST_KINDS))
    kind, arg = next(iter(dist.items()))
    if kind not in DIST_KINDS:
        _spec_error(f"vary.{name}: unknown distribution {kind!r} (choose from {', '.join(DIST_KINDS)})")
    if kind == "jitter":
        if not isinstance(arg, (int, float)) or arg < 0:
            _spec_error(f"vary.{name}.jitter = {arg!r} must be a non-negative number")
    elif kind == "choice":
        if not isinstance(arg, list) or not arg:
            _spec_error(f"vary.{name}.choice must be a non-empty list")
    else:
        if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)):
            _spec_error(f"vary.{name}.{kind} = {arg!r}: expected two numbers")
        if kind in ("uniform", "loguniform", "integers") and not arg[0] <= arg[1]:
            _spec_error(f"vary.{name}.{kind} = {arg!r}: the lower bound is above the upper")
        if kind == "loguniform" and arg[0] <= 0:
            _spec_error(f"vary.{name}.loguniform needs positive bounds")
        if kind == "normal" and arg[1] < 0:
            _spec_error(f"vary.{name}.normal: negative sd")
