"""A command process's start: what it imports before its first pixel."""

import os
import subprocess
import sys


SMALL = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 16 -pixel 0.1"


def _python(code, cwd, extra_path=None):
    env = dict(os.environ, NBRAGG_RESIDENT="off")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_command_imports_scipy_linalg_only_for_numba_blas_module(tmp_path):
    """The command runs without scipy.linalg (the BLAS module Numba checks for loaded by
    itself); afterwards Numba's BLAS and scipy.linalg work as they would have."""
    code = (
        "import sys\n"
        "from nbragg.resident import run_command\n"
        f"status = run_command('nbragg', {SMALL.split()!r} + ['-floatfile', 'f.bin', '-nonoise', '-nopgm', "
        "'-noprogress'])\n"
        "assert status == 0, status\n"
        "from nbragg._numba_start import load_blas_module\n"
        "assert load_blas_module() is False   # (already there: not loaded again)\n"
        "print('MODULES', sorted(m for m in sys.modules if m.startswith('scipy.linalg')))\n"
        "import numpy as np, numba\n"
        "@numba.njit\n"
        "def product(a, b):\n"
        "    return np.dot(a, b)\n"
        "a = np.arange(6.0).reshape(2, 3)\n"
        "assert np.array_equal(product(a, a.T), a @ a.T)\n"
        "import scipy.linalg\n"
        "from scipy.linalg import cython_blas\n"
        "assert cython_blas is sys.modules['scipy.linalg.cython_blas']\n"
        "assert np.allclose(scipy.linalg.solve(np.eye(2) * 2.0, np.ones(2)), 0.5)\n"
        "print('DONE')\n")
    out = _python(code, tmp_path).splitlines()
    assert "MODULES ['scipy.linalg.cython_blas']" in out, out[-3:]
    assert out[-1] == "DONE", out[-3:]
    assert (tmp_path / "f.bin").stat().st_size == 16 * 16 * 4


def test_the_blas_module_is_left_alone_where_it_cannot_be_loaded(tmp_path):
    """Another SciPy layout, or a module that fails to load, leaves nothing behind (Numba
    then imports it its own way)."""
    import importlib.machinery
    fake = tmp_path / "fake"
    (fake / "scipy" / "linalg").mkdir(parents=True)
    (fake / "scipy" / "__init__.py").write_text("")
    (fake / "scipy" / "linalg" / "__init__.py").write_text("")
    blas = fake / "scipy" / "linalg" / ("cython_blas" + importlib.machinery.EXTENSION_SUFFIXES[0])
    blas.write_bytes(b"not a library")
    code = ("import sys\n"
            "from nbragg._numba_start import load_blas_module\n"
            "assert load_blas_module() is False\n"
            "assert 'scipy.linalg.cython_blas' not in sys.modules\n"
            "print('ok')\n")
    assert _python(code, tmp_path, str(fake)).strip() == "ok"
    blas.unlink()
    assert _python(code, tmp_path, str(fake)).strip() == "ok"
