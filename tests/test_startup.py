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


OUTPUTS = ["-floatfile", "f.bin", "-nonoise", "-nopgm", "-noprogress"]


def test_a_command_loads_its_kernels_without_numbas_registries(tmp_path):
    """A command run in its process loads its cached kernels without Numba's registries
    (nor scipy.linalg, nor SciPy's BLAS module) and writes the image a process loading
    them Numba's own way writes; afterwards another cached function (a ufunc, which needs
    the registries) loads, Numba compiles, BLAS included, and scipy.linalg works, as they
    would have."""
    argv = SMALL.split() + OUTPUTS
    (tmp_path / "cached_ufunc.py").write_text(
        "from numba import vectorize\n\n\n"
        "@vectorize(['float64(float64)'], cache=True)\n"
        "def twice(x):\n"
        "    return 2.0 * x\n")
    plain = ("from nbragg.cli import main\n" f"assert main({argv!r}) == 0\n"
             "import cached_ufunc\n")        # (the ufunc cached here for the second process)
    _python(plain, tmp_path)                  # (the kernels compiled here if the cache is cold)
    (tmp_path / "f.bin").rename(tmp_path / "plain.bin")
    code = (
        "import sys\n"
        "from nbragg.resident import run_command\n"
        f"status = run_command('nbragg', {argv!r})\n"
        "assert status == 0, status\n"
        "print('MODULES', sorted(m for m in sys.modules if m.startswith(('scipy.linalg', 'numba.np.arraymath'))))\n"
        "import numpy as np, numba\n"
        "import cached_ufunc\n"             # (another's cached function: loaded Numba's own way)
        "assert np.array_equal(cached_ufunc.twice(np.arange(3.0)), [0.0, 2.0, 4.0])\n"
        "@numba.njit\n"
        "def product(a, b):\n"
        "    c = np.empty((a.shape[0], b.shape[1]))\n"
        "    c[:] = np.dot(a, b)\n"
        "    return c\n"
        "a = np.arange(6.0).reshape(2, 3)\n"
        "assert np.array_equal(product(a, a.T), a @ a.T)\n"
        "import scipy.linalg\n"
        "from scipy.linalg import cython_blas\n"
        "assert cython_blas is sys.modules['scipy.linalg.cython_blas']\n"
        "assert np.allclose(scipy.linalg.solve(np.eye(2) * 2.0, np.ones(2)), 0.5)\n"
        "print('DONE')\n")
    out = _python(code, tmp_path).splitlines()
    assert "MODULES []" in out, out[-3:]
    assert out[-1] == "DONE", out[-3:]
    image = (tmp_path / "f.bin").read_bytes()
    assert len(image) == 16 * 16 * 4
    assert image == (tmp_path / "plain.bin").read_bytes()


def test_the_lighter_loads_take_nbraggs_cpu_caches_only_and_are_idempotent(tmp_path):
    """Only loads of nbragg's own caches into a CPU target skip the refresh (others, and
    other targets, refresh first); installing twice wraps once."""
    code = ("from numba.core import caching\n"
            "from numba.core.registry import cpu_target\n"
            "from nbragg._numba_start import lighter_cache_loads\n"
            "full = caching.Cache.load_overload\n"
            "assert lighter_cache_loads() and lighter_cache_loads()\n"
            "light = caching.Cache.load_overload\n"
            "assert light is not full and light._nbragg_light\n"
            "calls = []\n"
            "class Other:\n"
            "    def refresh(self):\n"
            "        calls.append('refresh')\n"
            "cpu = cpu_target.target_context\n"
            "cpu.refresh = lambda: calls.append('refresh')\n"
            "class Locator:\n"
            "    _nbragg = True\n"
            "class Impl:\n"
            "    locator = None\n"
            "class Probe(caching.Cache):\n"
            "    def __init__(self, ours):\n"
            "        self._impl = Impl()\n"
            "        self._impl.locator = Locator() if ours else object()\n"
            "    def _load_overload(self, sig, target_context):\n"
            "        calls.append('load')\n"
            "        return None\n"
            "for ours, context, expected in ((True, Other(), ['refresh', 'load']), (False, cpu, ['refresh', 'load']),\n"
            "                                (True, cpu, ['load'])):\n"
            "    calls.clear()\n"
            "    assert Probe(ours).load_overload((), context) is None\n"
            "    assert calls == expected, (ours, context, calls)\n"
            "print('ok')\n")
    assert _python(code, tmp_path).strip() == "ok"


def _console(code, cwd, argv):
    env = dict(os.environ, NBRAGG_RESIDENT="off")
    env.pop("PYTHONUNBUFFERED", None)         # (what the end's flush is for: buffered output)
    return subprocess.run([sys.executable, "-c", code] + argv, capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


_CONSOLE_PREFIX = ("import atexit, sys\n"
                   "atexit.register(lambda: (open('handler-ran', 'w').write('yes'), print('HANDLER')))\n"
                   "sys.argv[0] = 'nbragg'\n"
                   "from nbragg.resident import nbragg\n")


def test_the_console_command_ends_its_process_after_the_exit_handlers(tmp_path):
    """The console command ends its process once the image is written: exit handlers run,
    output flushed, the status kept (0; 2 for a bad flag; 0 for -h)."""
    code = _CONSOLE_PREFIX + "status = nbragg()\nprint('RETURNED', status)\n"
    done = _console(code, tmp_path, SMALL.split() + OUTPUTS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RETURNED" not in done.stdout
    assert "writing f.bin as 256 4-byte floats" in done.stdout
    assert done.stdout.rstrip().endswith("HANDLER")          # (the handler's output flushed at the end)
    assert (tmp_path / "handler-ran").read_text() == "yes"
    assert (tmp_path / "f.bin").stat().st_size == 16 * 16 * 4
    (tmp_path / "handler-ran").unlink()
    bad = _console(code, tmp_path, SMALL.replace("-detpixels 16", "-detpixels x").split() + OUTPUTS)
    assert bad.returncode == 2 and "-detpixels" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert "RETURNED" not in bad.stdout and (tmp_path / "handler-ran").exists()
    usage = _console(code, tmp_path, ["-h"])
    assert usage.returncode == 0 and "usage: nbragg" in usage.stdout and "RETURNED" not in usage.stdout


def test_the_console_command_leaves_the_exit_to_the_interpreter_while_a_thread_runs(tmp_path):
    """A thread the interpreter would wait for keeps the ordinary exit: the command
    returns its status and the thread finishes."""
    code = (_CONSOLE_PREFIX
            + "import threading, time\n"
              "threading.Thread(target=lambda: (time.sleep(0.5), open('thread-done', 'w').write('yes'))).start()\n"
              "status = nbragg()\nprint('RETURNED', status)\nsys.exit(status)\n")
    done = _console(code, tmp_path, SMALL.split() + OUTPUTS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RETURNED 0" in done.stdout
    assert (tmp_path / "thread-done").read_text() == "yes"
    assert (tmp_path / "handler-ran").read_text() == "yes"


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


def test_the_console_command_keeps_sys_exit_and_the_ordinary_exit_where_it_does_more(tmp_path):
    """A command's SystemExit keeps its status (a number: the quick end; a message: the
    interpreter's exit, which prints it); a profiler keeps the ordinary exit, so it
    writes its file."""
    (tmp_path / "fake_command.py").write_text(
        "def main(argv):\n"
        "    print('FAKE RAN')\n"
        "    raise SystemExit(int(argv[0]) if argv[0].isdigit() else argv[0])\n")
    code = (_CONSOLE_PREFIX
            + "import nbragg.resident as resident\n"
              "resident.COMMANDS['nbragg'] = ('fake_command', 'main')\n"
              "status = nbragg()\nprint('RETURNED', status)\nsys.exit(status)\n")
    number = _console(code, tmp_path, ["3"])
    assert number.returncode == 3, number.stderr[-3000:]
    assert "FAKE RAN" in number.stdout and "RETURNED" not in number.stdout and "HANDLER" in number.stdout
    message = _console(code, tmp_path, ["stopped here"])
    assert message.returncode == 1 and message.stderr.strip().endswith("stopped here"), message.stderr[-3000:]
    assert "RETURNED stopped here" in message.stdout and "HANDLER" in message.stdout
    env = dict(os.environ, NBRAGG_RESIDENT="off")
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", "run.prof", "-m", "nbragg"] + SMALL.split()
                              + OUTPUTS, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    assert (tmp_path / "run.prof").stat().st_size > 0
