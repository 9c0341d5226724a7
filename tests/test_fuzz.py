"""Fuzzing the file readers: any bytes give a parsed result or an NbraggError, nothing else."""

import os
import tempfile
import warnings

import pytest

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nbragg.errors import NbraggError  # noqa: E402
from nbragg.io.hkl import read_fdump, read_hkl  # noqa: E402
from nbragg.io.mat import read_mat  # noqa: E402
from nbragg.io.smv import read_smv  # noqa: E402
from nbragg.io.sourcefile import read_sourcefile  # noqa: E402

EXAMPLES = int(os.environ.get("NBRAGG_FUZZ_EXAMPLES", "2000"))
_DIR = tempfile.mkdtemp(prefix="nbragg-fuzz-")

number = st.one_of(st.integers(-50, 50).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", "x", "-", "1e999", "nan", "1.5.2", "+", "1e", "0x10", ",", ";", "#"]))
line = st.lists(number, min_size=0, max_size=7).map(" ".join)
text_file = st.lists(line, max_size=12).map(lambda ls: "\n".join(ls).encode())
raw = st.binary(max_size=1500)
smv_like = st.tuples(
    st.lists(st.tuples(st.sampled_from(["HEADER_BYTES", "SIZE1", "SIZE2", "BYTE_ORDER", "PIXEL_SIZE", "DISTANCE",
                                        "DETECTOR_DIMENSIONS", "BEAM_CENTER_Y", "X"]), number), max_size=8),
    st.binary(max_size=700),
).map(lambda t: ("{\nHEADER_BYTES=512;\n" + "".join(f"{k}={v};\n" for k, v in t[0]) + "}\f")
      .encode().ljust(512, b" ")[:600] + t[1])


def _check(reader, data):
    path = os.path.join(_DIR, "input")
    with open(path, "wb") as fh:
        fh.write(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reader(path)
        except NbraggError:
            pass


def fuzz(test):
    """Hypothesis settings for the readers; long, so in the full suite only."""
    return pytest.mark.slow(settings(max_examples=EXAMPLES, deadline=None,
                                     suppress_health_check=list(HealthCheck))(test))


@fuzz
@given(st.one_of(raw, text_file))
def test_hkl_reader(data):
    _check(lambda p: read_hkl(p, warn=lambda m: None), data)


@fuzz
@given(st.one_of(raw, text_file))
def test_mat_reader(data):
    _check(read_mat, data)


@fuzz
@given(st.one_of(raw, text_file))
def test_sourcefile_reader(data):
    _check(read_sourcefile, data)


@fuzz
@given(st.one_of(raw, smv_like))
def test_smv_reader(data):
    _check(read_smv, data)


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(raw, st.tuples(line, st.binary(max_size=400)).map(lambda t: t[0].encode() + b"\n\f" + t[1])))
def test_fdump_reader(data):
    _check(read_fdump, data)
