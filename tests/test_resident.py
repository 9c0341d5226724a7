"""The resident server: commands run on it exactly as by themselves, and it is never stale.

Each test starts its own server in a private socket directory (NBRAGG_RESIDENT_DIR) and
runs the command line as a user would, ``python -m nbragg``, comparing with the command
run by itself (NBRAGG_RESIDENT=off, which the rest of the suite sets)."""

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the resident server needs fork and Unix sockets")

ARGS = "-cell 100 100 100 90 90 90 -misset 10 5 3 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 48 -pixel 0.2"
# long enough to be interrupted while it renders (about 8 s on a 2-core machine, as one kernel
# call: SIGINT takes effect when it returns)
SLOW = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 8 -lambda 1.5 -distance 100 -detpixels 128 "
        "-pixel 0.4 -mosaic 0.5 -mosaic_dom 400 -phi 0.1 -osc 0.5 -phisteps 100 -oversample 3")


def _env(socket_dir, **extra):
    """The environment of a test's commands and server: its socket directory, and the
    nbragg under test first on the path (whatever is installed), so that every process
    imports the same package and finds the same key."""
    import nbragg
    here = os.path.dirname(os.path.dirname(os.path.abspath(nbragg.__file__)))
    path = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, NBRAGG_RESIDENT_DIR=str(socket_dir), NBRAGG_RESIDENT="on", PYTHONPATH=os.pathsep.join(path))
    env.update(extra)
    return env


def _resident(env, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "nbragg.resident", *args], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _status(env):
    """The server's status as a dict (None when none answers), asked as a library user would."""
    code = "import json, nbragg.resident as r; print(json.dumps(r.query('status')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _nbragg(args, cwd, env, **kw):
    return subprocess.run([sys.executable, "-m", "nbragg"] + args.split(), cwd=cwd, env=env, capture_output=True,
                          text=True, **kw)


@contextlib.contextmanager
def _socket_dir(mode=0o700):
    """(env, directory) for servers of a test's own; any server there is stopped afterwards.
    The directory is short: a Unix socket's path is limited to about a hundred bytes."""
    socket_dir = tempfile.mkdtemp(prefix="nbr", dir="/tmp")
    os.chmod(socket_dir, mode)
    env = _env(socket_dir)
    try:
        yield env, socket_dir
    finally:
        if mode == 0o700:
            _resident(env, "stop", check=False)
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def server():
    """(env, socket dir) of a running server."""
    with _socket_dir() as (env, socket_dir):
        _resident(env, "start", "--idle", "300")
        yield env, socket_dir


def _until_running(env, proc):
    """Wait until the server runs a command (``proc``'s, which must not have ended)."""
    deadline = time.monotonic() + 60
    while _status(env)["running"] == 0:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def _wait_for_spare(env):
    deadline = time.monotonic() + 120
    while not _status(env)["spare_ready"]:
        assert time.monotonic() < deadline, "no spare got ready"
        time.sleep(0.05)


def test_a_command_on_the_server_writes_what_it_writes_by_itself(server, tmp_path):
    env, _ = server
    _wait_for_spare(env)
    outputs = "-floatfile f.bin -intfile i.img -noisefile n.img -pgmfile p.pgm -seed 7"
    (tmp_path / "own").mkdir()
    (tmp_path / "served").mkdir()
    own = _nbragg(ARGS + " " + outputs, tmp_path / "own", dict(env, NBRAGG_RESIDENT="off"))
    before = _status(env)
    served = _nbragg(ARGS + " " + outputs, tmp_path / "served", env)
    assert own.returncode == served.returncode == 0, own.stderr + served.stderr
    after = _status(env)
    assert after["served"] == before["served"] + 1                  # (it did go through the server,
    assert after["from_spare"] == before["from_spare"] + 1          # to the warm spare)
    assert served.stdout == own.stdout and served.stderr == own.stderr
    for name in ("f.bin", "i.img", "n.img", "p.pgm"):
        assert (tmp_path / "served" / name).read_bytes() == (tmp_path / "own" / name).read_bytes(), name


def test_a_command_while_another_runs_forks_afresh(server, tmp_path):
    env, _ = server
    _wait_for_spare(env)
    slow = subprocess.Popen([sys.executable, "-m", "nbragg"] + (SLOW + " -floatfile slow.bin -noprogress").split(),
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _until_running(env, slow)
        before = _status(env)
        assert not before["spare_ready"]             # (the spare took the slow one; none is made meanwhile)
        outputs = "-floatfile f.bin -intfile i.img -nonoise -nopgm"
        served = _nbragg(ARGS + " " + outputs, tmp_path, env)
        after = _status(env)
        assert served.returncode == 0, served.stderr
        assert after["served"] == before["served"] + 1 and after["from_spare"] == before["from_spare"]
        (tmp_path / "own").mkdir()
        own = _nbragg(ARGS + " " + outputs, tmp_path / "own", dict(env, NBRAGG_RESIDENT="off"))
        assert served.stdout == own.stdout
        for name in ("f.bin", "i.img"):
            assert (tmp_path / name).read_bytes() == (tmp_path / "own" / name).read_bytes()
    finally:
        slow.kill()
        slow.wait()


def test_the_callers_directory_and_umask_are_the_commands(server, tmp_path):
    env, _ = server
    (tmp_path / "F.hkl").write_text("0 0 0 100\n1 0 0 50\n")
    code = ("import os, sys; os.umask(0o027); from nbragg.resident import run_command; "
            "sys.exit(run_command('nbragg', sys.argv[1:]))")
    before = _status(env)["served"]
    cmd = [sys.executable, "-c", code] + (ARGS + " -hkl F.hkl -floatfile out/f.bin").split()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "-floatfile" in proc.stderr      # (no such directory: out/)
    (tmp_path / "out").mkdir()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _status(env)["served"] == before + 2
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "f.bin").st_mode) == 0o640


# The copy's side (_child) on its own, in a process of its own: forking the test process,
# which has Numba's and JAX's threads, could deadlock the copy.
_COPY_SCRIPT = r"""
import json, os, sys, tempfile
from nbragg import resident

def _probe(argv):
    print(json.dumps({"argv": argv, "sys_argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("PROBE"),
                      "tmp": tempfile.gettempdir(), "umask": os.umask(0), "stdin": sys.stdin.read(),
                      "line_buffering": sys.stdout.line_buffering, "write_through": sys.stdout.write_through}))
    return int(argv[0])

resident.COMMANDS["probe"] = ("__main__", "_probe")
tempfile.gettempdir()                          # (as a server has: its own, cached)
request = json.loads(sys.argv[1])
stdin_r, stdin_w = os.pipe()
out_r, out_w = os.pipe()
os.write(stdin_w, b"from the caller")
os.close(stdin_w)
pid = os.fork()
if pid == 0:
    resident._child(request, [stdin_r, out_w, os.dup(2)], [out_r], None)
os.close(stdin_r)
os.close(out_w)
with os.fdopen(out_r) as fh:
    seen = json.loads(fh.read())
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
request["argv"][0] = "0"                      # (a success whose last write fails)
pid = os.fork()
if pid == 0:
    resident._child(request, [os.open(os.devnull, os.O_RDONLY), os.open("/dev/full", os.O_WRONLY),
                              os.open(os.devnull, os.O_WRONLY)], [], None)
full = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps({"seen": seen, "status": status, "full": full}))
"""


@pytest.mark.parametrize("write_through", [False, True])      # (True: python -u, PYTHONUNBUFFERED)
def test_the_copy_takes_the_callers_process(tmp_path, write_through):
    """argv, directory, environment (TMPDIR too), umask, stdin, stdout's buffering and the
    exit status are the request's; a failed last write makes a success 120, as in Python."""
    (tmp_path / "tmp").mkdir()
    request = {"command": "probe", "argv": ["7", "x y"], "cwd": str(tmp_path), "umask": 0o027,
               "env": {"PROBE": "here", "TMPDIR": str(tmp_path / "tmp")},
               "streams": [{}, {"encoding": "utf-8", "line_buffering": False, "write_through": write_through,
                                "unbuffered": write_through}, {}]}
    proc = subprocess.run([sys.executable, "-c", _COPY_SCRIPT, json.dumps(request)], env=_env(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["status"] == 7
    assert got["full"] == (1 if write_through else 120)
    assert got["seen"] == {"argv": ["7", "x y"], "sys_argv": ["probe", "7", "x y"], "cwd": str(tmp_path),
                           "env": "here", "tmp": str(tmp_path / "tmp"), "umask": 0o027, "stdin": "from the caller",
                           "line_buffering": False, "write_through": write_through}


def test_a_user_error_on_the_server_is_one_line_and_status_2(server, tmp_path):
    env, _ = server
    proc = _nbragg(ARGS + " -N banana -floatfile f.bin", tmp_path, env)
    own = _nbragg(ARGS + " -N banana -floatfile f.bin", tmp_path, dict(env, NBRAGG_RESIDENT="off"))
    assert proc.returncode == own.returncode == 2
    assert proc.stderr == own.stderr and proc.stderr.startswith("nbragg: error:") and "banana" in proc.stderr
    assert not (tmp_path / "f.bin").exists()


def test_other_commands_run_on_the_server(server, tmp_path):
    env, _ = server
    assert _nbragg(ARGS + " -floatfile f.bin -nonoise -nopgm", tmp_path, env).returncode == 0
    before = _status(env)["served"]
    args = ["-floatfile", "f.bin", "-detpixels", "48", "-noisefile", "n.img", "-nopgm", "-seed", "3"]
    runs = []
    code = "import sys; from nbragg.resident import run_command; sys.exit(run_command('nbragg-noisify'))"
    for mode in ("on", "off"):
        runs.append(subprocess.run([sys.executable, "-c", code] + args, cwd=tmp_path, env=dict(env, NBRAGG_RESIDENT=mode),
                                   capture_output=True, text=True))
        shutil.move(tmp_path / "n.img", tmp_path / f"n_{mode}.img")
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout == runs[1].stdout
    assert (tmp_path / "n_on.img").read_bytes() == (tmp_path / "n_off.img").read_bytes()
    assert _status(env)["served"] == before + 1


def test_another_start_up_environment_or_off_runs_by_itself(server, tmp_path):
    env, _ = server
    before = _status(env)["served"]
    for extra in ({"NUMBA_BOUNDSCHECK": "0"}, {"PYTHONHASHSEED": "123"}, {"OMP_PROC_BIND": "true"},
                  {"NBRAGG_RESIDENT": "off"}):
        proc = _nbragg(ARGS + " -floatfile f.bin -nonoise -nopgm", tmp_path, dict(env, **extra))
        assert proc.returncode == 0, proc.stderr
    assert _status(env)["served"] == before


def _interrupted(env, cwd, served):
    """(returncode, stderr) of a slow command sent SIGINT while it renders."""
    before = _status(env)["served"]
    proc = subprocess.Popen([sys.executable, "-m", "nbragg"] + (SLOW + " -floatfile f.bin -noprogress").split(),
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if served:
        _until_running(env, proc)
    time.sleep(3.0)                    # (well into the image, by itself too)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert _status(env)["served"] == before + served
    return proc.returncode, err


def test_ctrl_c_reaches_the_command_which_dies_as_it_would_by_itself(server, tmp_path):
    env, _ = server
    (tmp_path / "own").mkdir()
    own = _interrupted(dict(env, NBRAGG_RESIDENT="off"), tmp_path / "own", 0)
    served = _interrupted(env, tmp_path, 1)
    assert own[0] == served[0] == -signal.SIGINT              # (a shell loop stops on Ctrl-C)
    assert own[1].rstrip().endswith("KeyboardInterrupt") and served[1].rstrip().endswith("KeyboardInterrupt")
    assert not (tmp_path / "f.bin").exists()
    assert _status(env)["running"] == 0


def test_a_command_whose_server_dies_is_stopped(server, tmp_path):
    env, _ = server
    proc = subprocess.Popen([sys.executable, "-m", "nbragg"] + (SLOW + " -floatfile f.bin -noprogress").split(),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _until_running(env, proc)
    os.kill(_status(env)["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "went away" in err
    time.sleep(2.0)
    assert not (tmp_path / "f.bin").exists()          # (the command did not run on without its caller)


def test_a_write_error_on_stdout_fails_as_by_itself(server, tmp_path):
    env, _ = server
    codes = []
    for mode in ("off", "on"):
        with open("/dev/full", "w") as full:
            codes.append(subprocess.run([sys.executable, "-m", "nbragg"] + (ARGS + " -floatfile f.bin").split(),
                                        cwd=tmp_path, env=dict(env, NBRAGG_RESIDENT=mode), stdout=full,
                                        stderr=subprocess.PIPE).returncode)
    assert codes[0] == codes[1] != 0       # (120 when stdout is buffered, 1 under PYTHONUNBUFFERED)


def test_a_reader_that_left_ends_the_command_quietly_as_by_itself(server, tmp_path):
    env, _ = server
    results = []
    for mode in ("off", "on"):
        read_end, write_end = os.pipe()
        os.close(read_end)                       # (nbragg ... | head, head gone)
        proc = subprocess.run([sys.executable, "-m", "nbragg"] + (ARGS + " -floatfile f.bin").split(), cwd=tmp_path,
                              env=dict(env, NBRAGG_RESIDENT=mode), stdout=write_end, stderr=subprocess.PIPE,
                              text=True)
        os.close(write_end)
        results.append((proc.returncode, proc.stderr))
    assert results[0] == results[1] == (1, "")


def test_a_signal_the_caller_ignores_the_command_ignores(server, tmp_path):
    env, _ = server
    # nohup's way: SIGHUP ignored before the command starts
    code = ("import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
            "from nbragg.resident import run_command; sys.exit(run_command('nbragg', sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code] + (SLOW + " -floatfile f.bin -noprogress").split(),
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _until_running(env, proc)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None and _status(env)["running"] == 1
    finally:
        proc.kill()
        proc.wait()


def test_a_closed_stdin_runs_by_itself(server, tmp_path):
    env, _ = server
    before = _status(env)["served"]
    code = ("import os, sys; os.close(0); from nbragg.resident import run_command; "
            "sys.exit(run_command('nbragg', sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code] + (ARGS + " -floatfile f.bin").split(), cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _status(env)["served"] == before


def test_a_caller_that_dies_takes_its_command_with_it(server, tmp_path):
    env, _ = server
    proc = subprocess.Popen([sys.executable, "-m", "nbragg"] + (SLOW + " -floatfile f.bin -noprogress").split(),
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _until_running(env, proc)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while _status(env)["running"]:
        assert time.monotonic() < deadline, "the orphaned command still runs"
        time.sleep(0.05)
    assert not (tmp_path / "f.bin").exists()


def test_a_dead_server_is_passed_over_and_replaced(tmp_path):
    with _socket_dir() as (env, _):
        _resident(env, "start", "--idle", "300")
        pid = _status(env)["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert _status(env) is None                                       # (its socket is left behind)
        proc = _nbragg(ARGS + " -floatfile f.bin -nonoise -nopgm", tmp_path, env)
        assert proc.returncode == 0, proc.stderr
        assert _resident(env, "status", check=False).returncode == 1
        _resident(env, "start", "--idle", "300")
        assert _status(env)["pid"] != pid


def test_two_starts_at_once_make_one_server():
    with _socket_dir() as (env, socket_dir):
        starts = [subprocess.Popen([sys.executable, "-m", "nbragg.resident", "start", "--idle", "300"], env=env,
                                   stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in starts]
        assert [p.returncode for p in starts] == [0, 0]
        pid = _status(env)["pid"]
        assert all(f"pid {pid}," in out for out in outs), outs
        (log,) = [n for n in os.listdir(socket_dir) if n.endswith(".log")]
        with open(os.path.join(socket_dir, log)) as fh:
            assert fh.read().count("listening on") == 1          # (one server was ever started)


def test_auto_starts_a_server_for_the_commands_after(tmp_path):
    with _socket_dir() as (env, _):
        env = dict(env, NBRAGG_RESIDENT="auto")
        first = _nbragg(ARGS + " -floatfile f1.bin -nonoise -nopgm", tmp_path, env)
        assert first.returncode == 0, first.stderr          # (by itself, starting one meanwhile)
        deadline = time.monotonic() + 120
        while _status(env) is None:
            assert time.monotonic() < deadline, "no server came up"
            time.sleep(0.1)
        second = _nbragg(ARGS + " -floatfile f2.bin -nonoise -nopgm", tmp_path, env)
        assert second.returncode == 0, second.stderr
        assert _status(env)["served"] == 1
        assert second.stdout == first.stdout.replace("f1.bin", "f2.bin")
        assert (tmp_path / "f1.bin").read_bytes() == (tmp_path / "f2.bin").read_bytes()


def test_an_idle_server_exits_and_takes_its_socket(tmp_path):
    with _socket_dir() as (env, socket_dir):
        _resident(env, "start", "--idle", "1")
        deadline = time.monotonic() + 30
        while [n for n in os.listdir(socket_dir) if n.endswith(".sock")]:
            assert time.monotonic() < deadline, "the idle server is still there"
            time.sleep(0.1)
        assert _status(env) is None


def test_a_directory_others_may_enter_is_refused(tmp_path):
    with _socket_dir(0o777) as (env, socket_dir):
        proc = _resident(env, "start", check=False)
        assert proc.returncode == 2
        assert proc.stderr.startswith("nbragg-resident: error:") and socket_dir in proc.stderr and "777" in proc.stderr
        proc = _nbragg(ARGS + " -floatfile f.bin -nonoise -nopgm", tmp_path, env)    # (runs by itself)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, needle", [([], "nothing"), (["launch"], "'launch'"),
                                          (["start", "--idle", "-5"], "--idle"), (["start", "--idle", "x"], "'x'"),
                                          (["stop", "--now"], "'--now'")])
def test_bad_arguments_are_one_line_and_status_2(args, needle, tmp_path):
    proc = _resident(_env(tmp_path / "none"), *args, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("nbragg-resident: error:") and needle in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_the_key_follows_the_sources_and_numba_environment(tmp_path, monkeypatch):
    from nbragg import resident
    base = resident.server_key({})
    assert resident.server_key({"NUMBA_NUM_THREADS": "1"}) != base
    assert resident.server_key({"NBRAGG_VECTOR_BITS": "256"}) != base
    assert resident.server_key({"NBRAGG_SOMETHING": "1", "HOME": "/x"}) == base
    # a copy of the package with one source changed has another key
    copy = tmp_path / "nbragg"
    shutil.copytree(resident._PKG_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    monkeypatch.setattr(resident, "_PKG_DIR", str(copy))
    copied = resident.server_key({})
    with open(copy / "cli.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert resident.server_key({}) != copied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a copy holds the connection only where it dies "
                    "with its server")
def test_the_copy_says_its_exit_itself(tmp_path):
    """A forked copy writes "exit N" on the caller's connection as it ends (so the caller
    need not wait for the copy's teardown); the server's own word comes after.  (The fork
    happens in a fresh interpreter: this process may hold other libraries' threads.)"""
    code = """
import json, os, socket, sys
from nbragg import resident
mine, theirs = socket.socketpair()
null = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
request = {"command": "nbragg", "argv": ["-cell", "100"], "cwd": sys.argv[1], "env": dict(os.environ),
           "umask": 0o022, "streams": [{}, {}, {}], "ignored": []}
pid = os.fork()
if pid == 0:                                   # (never returns: _child ends in os._exit)
    mine.close()
    resident._child(request, null + [theirs.fileno()], [], None)
theirs.close()
mine.settimeout(120)
said = mine.recv(64)
_, wait_status = os.waitpid(pid, 0)
print(json.dumps([said.decode(), os.waitstatus_to_exitcode(wait_status)]))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=_env(str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    said, code = json.loads(proc.stdout.strip().splitlines()[-1])
    assert said == f"exit {code}\n" and code != 0           # (an error: the cell is not complete)


def test_a_caller_told_the_exit_before_the_pid_returns_it(tmp_path, monkeypatch):
    """The copy may end before the server has said its pid: the first line is the exit."""
    import socket as socketlib
    import threading
    from nbragg import resident
    folder = tempfile.mkdtemp(prefix="nbr", dir="/tmp")
    os.chmod(folder, 0o700)
    monkeypatch.setenv("NBRAGG_RESIDENT_DIR", folder)
    monkeypatch.setenv("NBRAGG_RESIDENT", "on")
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    listener.bind(resident.socket_path())
    listener.listen(1)

    def fake_server():
        conn, _ = listener.accept()
        _, fds = resident._recv_request(conn)
        for fd in fds:
            os.close(fd)
        conn.sendall(b"exit 3\npid 12345\n")
        conn.close()
    t = threading.Thread(target=fake_server)
    t.start()
    try:
        assert resident.forward("nbragg", ["-h"]) == 3
    finally:
        t.join(10)
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
