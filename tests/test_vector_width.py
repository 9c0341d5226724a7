"""The vector width nbragg asks Numba for (nbragg._vector_width)."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from nbragg import _vector_width

SMALL = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 8 -lambda 1.5 -distance 60 -detpixels 24 "
         "-pixel 0.2 -mosaic 0.5 -mosaic_dom 3 -oversample 2")


def _host_has_avx512():
    from numba.core.codegen import get_host_cpu_features
    return "+avx512f" in get_host_cpu_features().split(",")


def _python(code, tmp_path, *args, **env):
    """Runs code in a fresh interpreter, with none of the width's settings but ``env``'s."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME",
                                                                _vector_width.ENV)}
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# what the process's code generator was built with (the last word printed)
_CODEGEN_FEATURES = ("from numba.core.registry import cpu_target\n"
                     "print(cpu_target.target_context.codegen().magic_tuple()[2] or 'none')\n")
_FEATURES = "import nbragg.engine\n" + _CODEGEN_FEATURES
_avx512 = pytest.mark.skipif(not _host_has_avx512(), reason="the CPU has no AVX-512: both widths are LLVM's choice")


@_avx512
def test_full_width_where_the_cpu_has_avx512_unless_asked_otherwise(tmp_path):
    wide = _python(_FEATURES, tmp_path).stdout.split()[-1]
    assert wide.endswith(",-prefer-256-bit") and "+avx512f" in wide.split(","), wide
    # LLVM's own choice (the host's features), and the user's own features, are left alone
    narrow = _python(_FEATURES, tmp_path, **{_vector_width.ENV: "256"}).stdout.split()[-1]
    assert narrow + ",-prefer-256-bit" == wide
    assert _python(_FEATURES, tmp_path, NUMBA_CPU_FEATURES="+sse2").stdout.split()[-1] == "+sse2"


@_avx512
def test_too_late_once_a_numba_function_is_defined(tmp_path):
    code = ("import numba\n"
            "@numba.njit\n"
            "def one(x):\n"
            "    return x + 1\n" + _FEATURES)
    assert "prefer-256-bit" not in _python(code, tmp_path).stdout.split()[-1]


@_avx512
def test_the_benchmark_says_which_vectors_it_ran_with(tmp_path):
    code = ("from nbragg import bench\n"
            "bench.main(['--cases', 'none', '--no-gradients'])\n")
    assert "; vectors: 512-bit (AVX-512))" in _python(code, tmp_path).stdout.splitlines()[0]
    narrow = _python(code, tmp_path, **{_vector_width.ENV: "256"}).stdout.splitlines()[0]
    assert "; vectors: LLVM's choice, 256-bit on this AVX-512 CPU (NBRAGG_VECTOR_BITS=256" in narrow


def test_a_bad_value_is_reported_and_changes_nothing():
    err = io.StringIO()
    assert _vector_width.prefer_wide_vectors({_vector_width.ENV: "1024"}, err) is None
    assert err.getvalue().count("\n") == 1
    message = err.getvalue()
    assert message.startswith("WARNING: NBRAGG_VECTOR_BITS='1024' is neither 512") and "taking 256" in message
    err = io.StringIO()
    assert _vector_width.requested_bits({_vector_width.ENV: " 256 "}, err) == "256"
    assert _vector_width.requested_bits({}, err) == "512"
    assert err.getvalue() == ""


@_avx512
def test_the_image_is_the_same_bit_for_bit_at_either_width(tmp_path):
    """The forward image at 512-bit and at 256-bit vectors (each process compiles or loads its
    own machine code; the derivative kernels' images are the forward's at either width, as
    their own tests show)."""
    code = ("import sys, numpy as np\n"
            "from nbragg.engine import build_model, render\n"
            "from nbragg.nbargs import parse_nanobragg_args\n"
            f"exp = parse_nanobragg_args({SMALL.split()!r}, warn=lambda m: None).experiment\n"
            "model = build_model(exp, warn=lambda m: None)\n"
            "np.save(sys.argv[1], render(model, threads=2)[0])\n" + _CODEGEN_FEATURES)
    images = {}
    for bits in ("512", "256"):
        path = tmp_path / f"{bits}.npy"
        features = _python(code, tmp_path, str(path), **{_vector_width.ENV: bits}).stdout.split()[-1]
        assert ("-prefer-256-bit" in features.split(",")) == (bits == "512"), features
        images[bits] = np.load(path)
    assert np.any(images["512"] != 0.0)
    assert np.array_equal(images["512"], images["256"])
