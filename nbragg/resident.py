"""A resident nbragg: commands served by a process that has already loaded Numba.

A plain ``nbragg`` run spends most of a second before its first pixel: the interpreter,
NumPy, Numba, Numba's registries (which import parts of SciPy) and the cached kernels.
``nbragg-resident start`` starts a server that pays this once.  While it runs,
``nbragg``, ``nbragg-noisify``, ``nbragg-nonbragg`` and ``nbragg-refine`` hand their
arguments, working directory, environment, umask and terminal (the file descriptors of
stdin, stdout and stderr) to it; for each command the server forks a copy of itself --
usually a spare forked ahead, whose kernels are loaded and Numba's threads started --
that runs the command exactly as the plain command would, writing straight to the
caller's terminal and files, and the caller exits with the copy's status (which the copy
sends as it ends, without waiting to be torn down), or dies by the signal that killed it.
SIGINT, SIGTERM, SIGHUP and SIGQUIT reach the copy; a caller that dies, or a server that
dies, takes the copy with it.

The server itself never starts Numba's threads (GNU OpenMP does not survive a fork): it
imports, builds Numba's registries and loads the cached serial kernels only.

The server is found by a key (:func:`server_key`): nbragg's sources, the interpreter and
its flags, the NumPy and Numba installations, the environment read at start-up and the
process settings a copy would take from the server (CPU affinity, nice, control group,
limits).  A command whose key has no server -- after an upgrade, an edit, in another
environment or batch job -- runs by itself as before, so a server is never stale.  The
server exits after ``--idle`` seconds without a command (default 1800) or on
``nbragg-resident stop``.

``NBRAGG_RESIDENT=off`` makes a command ignore a server, ``NBRAGG_RESIDENT=auto`` makes a
command that finds none start one in the background (for the commands after it) and run
by itself; ``NBRAGG_RESIDENT_DIR`` sets the directory of the socket (default
``$XDG_RUNTIME_DIR/nbragg``, else ``nbragg-UID`` in the temporary directory; it must
belong to the user, not be a link and be closed to others).  POSIX only.  The
long-running ``nbragg-dataset`` and ``nbragg-refine-many`` always run by themselves.

This module imports only the standard library until the server starts: a command that
finds no server has paid a few milliseconds for looking.
"""

import importlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
import zlib

from ._numba_start import lighter_cache_loads, load_blas_module

# command name -> (module, function): the commands a server runs
COMMANDS = {
    "nbragg": ("nbragg.cli", "main"),
    "nbragg-noisify": ("nbragg.noisify_cli", "main"),
    "nbragg-nonbragg": ("nbragg.nonbragg_cli", "main"),
    "nbragg-refine": ("nbragg.refine_cli", "main"),
}
# what a server imports before it listens: the commands and what they load on their first run
_WARM_MODULES = ("nbragg.cli", "nbragg.noisify_cli", "nbragg.nonbragg_cli", "nbragg.refine_cli",
                 "nbragg.engine", "nbragg.nbargs", "nbragg.report", "nbragg.io.atomic", "nbragg.io.smv",
                 "nbragg.noisify", "nbragg.noise", "nbragg.response", "nbragg.gradients", "nbragg.refine",
                 "nbragg.trace")
DEFAULT_IDLE_S = 1800.0
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_HEADER = struct.Struct("!I")        # the request's length, before its JSON
_MAX_REQUEST = 16 << 20


class ResidentError(Exception):
    """The resident server cannot be started, reached or stopped (message for the user)."""


# ----------------------------------------------------------------------------- the key

def _install_stamp(module):
    """Where ``module`` is installed and when that was last changed, without importing it."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return "absent"
    origin = getattr(spec, "origin", None) if spec else None
    if not origin:
        return "absent"
    try:
        return f"{origin}:{os.stat(origin).st_mtime_ns}"
    except OSError:
        return origin


# environment variables a process reads at start-up (Python, Numba, OpenMP, the locale,
# nbragg's vector width): a command whose values differ from the server's runs by itself
_KEYED_ENV_PREFIXES = ("NUMBA_", "PYTHON", "OMP_", "GOMP_", "KMP_", "LC_")
_KEYED_ENV = ("LANG", "NBRAGG_VECTOR_BITS")


def _process_settings():
    """What a forked copy would inherit from the server rather than the caller: the CPU
    affinity, the nice value, the control group and the resource limits."""
    parts = []
    if hasattr(os, "sched_getaffinity"):
        parts.append(sorted(os.sched_getaffinity(0)))
    try:
        parts.append(os.getpriority(os.PRIO_PROCESS, 0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/cgroup") as fh:
            parts.append(fh.read())
    except OSError:
        pass
    try:
        import resource
        parts.append([resource.getrlimit(getattr(resource, n)) for n in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_DATA",
                      "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_STACK", "RLIMIT_CORE") if hasattr(resource, n)])
    except ImportError:
        pass
    return repr(parts)


def server_key(environ=None):
    """The hex key a command and a server must share: nbragg's sources (every .py file,
    path and bytes), the interpreter and its flags, NumPy's and Numba's installations, the
    environment Python, Numba, OpenMP, the locale and nbragg's vector width read at
    start-up, and the process's CPU affinity, nice value, control group and resource
    limits."""
    environ = os.environ if environ is None else environ
    key = _Checksum()
    for part in (os.path.realpath(sys.executable), sys.version, repr(tuple(sys.flags)), _PKG_DIR,
                 _install_stamp("numpy"), _install_stamp("numba"), _process_settings()):
        key.update(part.encode() + b"\0")
    for name in sorted(environ):
        if name.startswith(_KEYED_ENV_PREFIXES) or name in _KEYED_ENV:
            key.update(f"{name}={environ[name]}".encode() + b"\0")
    for root, dirs, files in os.walk(_PKG_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                key.update(os.path.relpath(path, _PKG_DIR).encode() + b"\0")
                with open(path, "rb") as fh:
                    key.update(fh.read())
    return key.hexdigest()


class _Checksum:
    """Two 32-bit checksums (CRC-32 and Adler-32) and the length of what was fed: an
    accidental change to any source, setting or path leaves the key unchanged with odds of
    about 2**-32 or less.
    (zlib, not hashlib: hashlib loads OpenSSL, a few milliseconds of every command, and
    the key guards against staleness, not against an adversary: the socket's directory
    is the user's own.)"""

    def __init__(self):
        self.crc, self.adler, self.length = 0, 1, 0

    def update(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.adler = zlib.adler32(data, self.adler)
        self.length += len(data)

    def hexdigest(self):
        return f"{self.crc:08x}{self.adler:08x}{self.length & 0xffff:04x}"


def socket_dir(create=False):
    """The directory of the servers' sockets: ``NBRAGG_RESIDENT_DIR``, else
    ``$XDG_RUNTIME_DIR/nbragg``, else ``nbragg-UID`` in the temporary directory.  With
    ``create``, made (mode 0700) when missing.  Raises ResidentError when it is not the
    user's own or others may enter it."""
    path = os.environ.get("NBRAGG_RESIDENT_DIR")
    if not path:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isdir(runtime):
            path = os.path.join(runtime, "nbragg")
        else:
            import tempfile
            path = os.path.join(tempfile.gettempdir(), f"nbragg-{os.getuid()}")
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ResidentError(f"cannot create the socket directory {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)        # (a symbolic link is refused: it could be pointed elsewhere later)
    except OSError:
        return path            # (no directory: no server)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
        raise ResidentError(f"socket directory {path} must be a directory (not a link) of user {os.getuid()} "
                            f"closed to others (found owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
                            f"{', a link' if stat.S_ISLNK(st.st_mode) else ''}); set NBRAGG_RESIDENT_DIR to another")
    return path


_MAX_SOCKET_PATH = 100          # (sun_path holds 104-108 bytes; the server binds a longer name first)


def socket_path(create=False, key=None):
    """The socket of the server for ``key`` (default: this process's :func:`server_key`)."""
    path = os.path.join(socket_dir(create), f"resident-{key or server_key()}.sock")
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH - 8:
        raise ResidentError(f"socket path {path} is too long for a Unix socket; set NBRAGG_RESIDENT_DIR to a "
                            "shorter directory")
    return path


def _peer_is_me(s):
    """Whether the process at the other end of Unix socket ``s`` runs as this user (where
    the system says; elsewhere the directory's permissions are the guard)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


# ----------------------------------------------------------------------------- the command's side

def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if _peer_is_me(s):
            return s
    except OSError:
        pass
    s.close()
    return None


def _send_request(s, request, fds=()):
    body = json.dumps(request).encode()
    header = _HEADER.pack(len(body))
    if fds:
        socket.send_fds(s, [header], list(fds))
    else:
        s.sendall(header)
    s.sendall(body)


def _read_line(s, buffer):
    """The next line from the server (without its newline), or None at its end."""
    while b"\n" not in buffer:
        chunk = s.recv(4096)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def forward(command, argv):
    """Run ``command argv`` on a resident server: its exit status, or None when there is
    no server for this installation and environment (or it did not take the command),
    and the caller should run the command itself.  The command's own stdin, stdout and
    stderr are the file descriptors 0, 1 and 2 (a console script's); a command the server
    runs that dies by a signal makes this process die by the same signal."""
    mode = os.environ.get("NBRAGG_RESIDENT", "").lower()
    if os.name != "posix" or mode in ("0", "off", "no", "false"):
        return None
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:        # (a closed one: the socket would take its number)
            return None
    try:
        path = socket_path()
    except ResidentError:
        return None
    s = _connect(path) if os.path.exists(path) else None
    if s is None:
        if mode == "auto":
            _start_in_background()
        return None
    with s:
        try:
            umask = os.umask(0o022)
            os.umask(umask)
            streams = [getattr(sys, n) for n in ("stdin", "stdout", "stderr")]
            ignored = [int(sig) for sig in _FORWARDED if signal.getsignal(sig) == signal.SIG_IGN]   # (nohup)
            request = {"command": command, "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ),
                       "umask": umask, "streams": [_stream_settings(st) for st in streams], "ignored": ignored}
            for st in streams[1:]:
                if st is not None:
                    st.flush()
            _send_request(s, request, fds=(0, 1, 2))
            buffer = bytearray()
            first = _read_line(s, buffer)
        except (OSError, ValueError):   # (an environment JSON cannot carry, a server gone)
            return None
        if first is not None and first.startswith(("exit ", "signal ")):
            line = first                     # (the command ended before the server said its pid)
        elif first is None or not first.startswith("pid "):
            return None
        else:
            pid = int(first[4:])
            line = _await_end(s, buffer, pid, ignored)
    if line is None or not line.startswith(("exit ", "signal ")):
        _kill(pid, signal.SIGTERM)
        print(f"{command}: error: the resident server (socket {path}) went away while running the command; "
              "stopped it", file=sys.stderr)
        return 1
    if line.startswith("signal "):            # die as the command did (a shell loop stops on Ctrl-C)
        signum = int(line[7:])
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        try:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        except (OSError, ValueError):
            pass
        return 128 + signum
    return int(line[5:])


def _await_end(s, buffer, pid, ignored):
    """The server's last line for command ``pid`` ("exit N" or "signal N"; None if the
    connection broke), the caller's signals passed on to the command meanwhile."""
    previous = {}
    try:
        for sig in _FORWARDED:
            if int(sig) not in ignored:
                previous[sig] = signal.signal(sig, lambda signum, frame: _kill(pid, signum))
    except ValueError:         # (not the main thread: no forwarding; a dying caller still ends it)
        pass
    try:
        line = _read_line(s, buffer)
    except OSError:
        line = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return line


def _start_in_background():
    """NBRAGG_RESIDENT=auto: start a server for the commands after this one, without
    waiting for it (two at once make one; see :func:`start`)."""
    import subprocess
    try:
        _launch(["start"], subprocess.DEVNULL)
    except OSError:
        pass


def _launch(args, output):
    """``nbragg-resident ARGS`` of this very package in a session of its own: run from the
    directory above the package, so that it imports this nbragg (a server then drops the
    working directory from its import path)."""
    import subprocess
    code = f"import sys; from nbragg.resident import main; sys.exit(main({args!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(_PKG_DIR), stdin=subprocess.DEVNULL,
                            stdout=output, stderr=output, start_new_session=True, close_fds=True)


def _stream_settings(stream):
    """What the caller's interpreter set up for a standard stream (encoding, buffering)."""
    if stream is None:
        return {}
    import io
    return {"encoding": getattr(stream, "encoding", None), "errors": getattr(stream, "errors", None),
            "line_buffering": getattr(stream, "line_buffering", False),
            "write_through": getattr(stream, "write_through", False),
            "unbuffered": isinstance(getattr(stream, "buffer", None), io.RawIOBase)}   # (python -u)


# the signals a caller passes on to its command (those it ignores, the command ignores)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT) if os.name == "posix" else ()


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except OSError:
        pass


def run_command(command, argv=None, exit_when_served=False):
    """A console entry point: ``command`` on a resident server when one is up for this
    installation, else in this process (its cached kernels loaded the lighter way,
    :mod:`nbragg._numba_start`).  With ``exit_when_served`` (the console scripts), a
    command a server ran ends this process at once (standard streams flushed, then
    ``os._exit``): it holds nothing to clean up, and the interpreter's finalisation took
    a tenth of a cheap image's run.  A command run here ends its process the same way,
    after the exit handlers, when no other thread is left to wait for
    (:func:`_end_process`)."""
    argv = sys.argv[1:] if argv is None else argv
    status = forward(command, argv)
    if status is None:
        if not lighter_cache_loads():       # (with them, only a compilation looks for the BLAS module)
            load_blas_module()
        if not exit_when_served:
            return _entry_point(command)(argv)
        try:
            status = _entry_point(command)(argv)
        except SystemExit as done:          # (a command that ends with sys.exit)
            status = done.code
        _end_process(status)
        return status
    if exit_when_served:
        _flush_standard_streams()
        os._exit(status & 0xFF)
    return status


def _flush_standard_streams():
    """Flush stdout and stderr (where they are open); False where stdout could not take
    what was left (it is reported, as the interpreter would at exit)."""
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "closed", False):
            continue
        try:
            stream.flush()
        except OSError as exc:
            if stream is sys.stdout:
                flushed = False
                try:
                    print(f"Exception ignored in: {stream!r}\n{type(exc).__name__}: {exc}", file=sys.stderr,
                          flush=True)
                except (OSError, ValueError, AttributeError):
                    pass
        except (ValueError, AttributeError):
            pass
    return flushed


def _end_process(status):
    """End this process with ``status`` as the interpreter would, less its finalisation
    (tearing down every module and Numba's compiled code: a fifth of a cheap command's
    run): the exit handlers run (logging's files flushed, temporary directories removed,
    child processes reaped), the standard streams are flushed, then ``os._exit``.

    Returns instead, for the interpreter's ordinary exit, where that exit would do more:
    a status other than None or a number 0-255 (``sys.exit("message")``), a thread other
    than a daemon still running (the interpreter would wait for it) or a call from one,
    the interpreter asked to stay (``python -i``, PYTHONINSPECT), a tracer or profiler
    set (a debugger, coverage, cProfile, which write or report at exit), or no way to run
    the exit handlers from here.  (A host that runs ``nbragg``'s ``__main__`` itself with
    runpy and catches its SystemExit is not told apart: it ends with the command.)"""
    import atexit
    import threading
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    main = threading.main_thread()
    if (run_exit_handlers is None
            or not (status is None or (isinstance(status, int) and 0 <= status <= 255))
            or threading.current_thread() is not main
            or any(t is not main and not t.daemon for t in threading.enumerate())
            or sys.flags.inspect or os.environ.get("PYTHONINSPECT")
            or sys.gettrace() is not None or sys.getprofile() is not None):
        return
    code = 0 if status is None else int(status)
    run_exit_handlers()
    if not _flush_standard_streams():
        code = 120                          # (the interpreter's status when stdout cannot be flushed at exit)
    os._exit(code)


def _entry_point(command):
    module, function = COMMANDS[command]
    return getattr(importlib.import_module(module), function)


def nbragg():
    return run_command("nbragg", exit_when_served=True)


def nbragg_noisify():
    return run_command("nbragg-noisify", exit_when_served=True)


def nbragg_nonbragg():
    return run_command("nbragg-nonbragg", exit_when_served=True)


def nbragg_refine():
    return run_command("nbragg-refine", exit_when_served=True)


# ----------------------------------------------------------------------------- the server

def warm():
    """Import what the commands use, initialise Numba's registries and load the cached
    serial kernels (never compiling; never a parallel one, whose loading starts Numba's
    thread layer, which a fork would break).
    Returns the number of kernel signatures loaded."""
    load_blas_module()
    for name in _WARM_MODULES:
        importlib.import_module(name)
    from numba.core.registry import cpu_target
    cpu_target.target_context.refresh()
    cpu_target.typing_context.refresh()
    loaded = _load_cached_kernels(cpu_target.target_context)
    from numba.np.ufunc import parallel
    if getattr(parallel, "_is_initialized", False):     # (every copy would die on its first image)
        raise ResidentError("Numba's threads were started while warming up; a forking server cannot run")
    return loaded


def _load_cached_kernels(target_context):
    """Load every cached signature of nbragg's jitted functions whose cache entry is
    current (same bytecode, same machine): compile() then reads it from disk."""
    from numba.core.dispatcher import Dispatcher
    codegen = target_context.codegen()
    loaded = 0
    seen = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("nbragg") or module is None:
            continue
        for value in list(vars(module).values()):
            if not isinstance(value, Dispatcher) or id(value) in seen:
                continue
            if value.targetoptions.get("parallel"):
                continue               # (loading one starts Numba's thread layer, which a fork breaks)
            seen.add(id(value))
            cache = getattr(value, "_cache", None)
            try:
                index = cache._cache_file._load_index()
            except Exception:          # (no cache, or a Numba whose cache is laid out otherwise)
                continue
            for key in index:
                try:
                    if cache._index_key(key[0], codegen) != key or key[0] in value.overloads:
                        continue
                    value.compile(key[0])
                    loaded += 1
                except Exception:      # a stale or unreadable entry: the command compiles it
                    continue
    return loaded


def _recv_request(conn, maxfds=3):
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, maxfds)
    try:
        while len(header) < _HEADER.size:
            more = conn.recv(_HEADER.size - len(header))
            if not more:
                raise ConnectionError("request cut short")
            header += more
        (size,) = _HEADER.unpack(header)
        if size > _MAX_REQUEST:
            raise ConnectionError("request too large")
        body = bytearray()
        while len(body) < size:
            more = conn.recv(min(1 << 16, size - len(body)))
            if not more:
                raise ConnectionError("request cut short")
            body += more
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _rebuild_stream(fd, mode, settings):
    """A standard stream on ``fd`` as the caller's interpreter had it."""
    import io
    raw = io.FileIO(fd, mode, closefd=False)
    if mode == "r":
        buffered = io.BufferedReader(raw)
    else:
        buffered = raw if settings.get("unbuffered") else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding=settings.get("encoding"), errors=settings.get("errors"),
                            newline="\n", line_buffering=bool(settings.get("line_buffering")),
                            write_through=bool(settings.get("write_through")))


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)      # sys.exit("message"): printed, status 1
    return 1


def _die_with(parent):
    """Linux: this process gets SIGTERM when ``parent`` (the server) dies, so that a
    command whose server was killed does not run on with nobody waiting for it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                           # (it died before that)
        os.kill(os.getpid(), signal.SIGTERM)


def _leave_server(inherited, parent):
    """In a forked copy: the server's signal handling undone, its descriptors closed."""
    _die_with(parent)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass


# memory a spare maps and touches ahead of its command (kept in its heap), so that the
# command's images do not pay a page fault per 4 kB: a 1024x1024 image and its files
SPARE_HEAP = 64 << 20


def _keep_heap(size):
    """GNU C library: keep freed memory in the heap instead of returning it to the system
    (arrays up to 32 MB come from the heap, which grows by ``size`` and keeps up to twice
    that free before it is trimmed: the command this spare runs inherits these settings),
    then touch ``size`` bytes of it, so that the arrays a command allocates next land on
    pages already mapped.  Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 2 * size)
            and mallopt(m_top_pad, size)):
        return
    import numpy as np
    blocks = [np.ones(1 << 20) for _ in range(size >> 23)]     # (8 MB each: below the mmap threshold)
    del blocks


# the spare's warm-up: a small still through the engine, as a command's first image
_SPARE_ARGS = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -detpixels 16 -pixel 0.1"


def _spare(sock, inherited, parent):
    """In a forked spare: load the common path's parallel kernels and start Numba's threads
    (a small image rendered), say "ready", then wait for the one request the server hands
    over and run it as :func:`_child` does; never returns.  A server with a ready spare
    starts a command without loading anything."""
    try:
        _leave_server(inherited, parent)
        try:
            from .engine import simulate
            from .experiment import Experiment
            simulate(Experiment.from_nanobragg_args(_SPARE_ARGS), warn=lambda m: None)
        except Exception:          # (the command will say what is wrong, if anything is)
            pass
        _keep_heap(SPARE_HEAP)
        sock.sendall(b"r")
        request, fds = _recv_request(sock, maxfds=4)
        sock.close()
    except BaseException:
        os._exit(0)
    _child(request, fds, [], None)


def _child(request, fds, inherited, parent):
    """In the forked copy: become the caller's process and run its command; never returns.
    ``fds``: the caller's stdin, stdout and stderr, then the caller's connection, on which
    the copy says "exit N" itself as it ends (the caller need not wait for this process to
    be torn down and reaped; the server says it again, or says the signal that killed it)."""
    status = 1
    report = fds[3] if len(fds) > 3 and fds[3] > 2 else None
    fds = fds[:3]
    try:
        if parent is not None:
            _leave_server(inherited, parent)
        if report is not None:
            os.set_inheritable(report, False)
        for sig in request.get("ignored", ()):
            signal.signal(sig, signal.SIG_IGN)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        settings = request.get("streams") or [{}] * 3
        sys.stdin = _rebuild_stream(0, "r", settings[0])
        sys.stdout = _rebuild_stream(1, "w", settings[1])
        sys.stderr = _rebuild_stream(2, "w", settings[2])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile
        tempfile.tempdir = None                 # (the caller's TMPDIR)
        os.umask(request["umask"])
        os.chdir(request["cwd"])
        command = request["command"]
        sys.argv = [command] + request["argv"]
        try:
            status = _exit_status(_entry_point(command)(request["argv"]))
        except SystemExit as exc:
            status = _exit_status(exc.code)
    except KeyboardInterrupt:           # as Python does: the traceback, then death by SIGINT
        import traceback
        traceback.print_exc()
        status = -signal.SIGINT
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for name in ("stdout", "stderr"):       # a failed last write is an error, as in Python (120)
            try:
                getattr(sys, name).flush()
            except Exception as exc:
                try:
                    os.write(2, f"Exception ignored on flushing sys.{name}:\n{exc!r}\n".encode())
                except OSError:
                    pass
                if status == 0:
                    status = 120
        if status < 0:
            signal.signal(-status, signal.SIG_DFL)
            os.kill(os.getpid(), -status)
        if report is not None:
            try:
                os.write(report, f"exit {status}\n".encode())
            except OSError:
                pass
        os._exit(status)


def serve(idle_s=DEFAULT_IDLE_S, log=None, expect_key=None):
    """Warm up, listen on this installation's socket and run commands until ``idle_s``
    seconds pass without one or a stop request comes (then running commands finish).
    Returns the number of commands served."""
    return _Server(idle_s, log, expect_key).run()


class _Server:
    """The listening process: one thread, a selector over the listening socket, a
    wake-up socket for SIGCHLD, the callers' connections and the spare's socket."""

    def __init__(self, idle_s, log, expect_key):
        self.idle_s, self.log = idle_s, log
        # the import path without the working directory (or anything relative to it): the
        # copies run in the callers' directories, whose files must not shadow modules
        sys.path[:] = [p for p in sys.path if p and os.path.isabs(p)]
        self.key = server_key()
        if expect_key is not None and self.key != expect_key:
            raise ResidentError(f"this server's key {self.key} is not its starter's {expect_key}: the two "
                                "processes differ in interpreter, flags, environment or process settings")
        self.pid = os.getpid()
        self.path = socket_path(create=True, key=self.key)
        if query("status", self.path) is not None:
            raise ResidentError(f"a server already listens on {self.path}")
        t0 = time.perf_counter()
        loaded = warm()
        self.say(f"warm in {time.perf_counter() - t0:.2f} s ({loaded} cached kernel signatures loaded)")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            temporary = f"{self.path}.{self.pid}"
            self.listener.bind(temporary)
            os.replace(temporary, self.path)
        except OSError as exc:
            self.listener.close()
            raise ResidentError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        self.inode = os.stat(self.path).st_ino
        self.listener.listen(64)
        self.listener.setblocking(False)
        os.chdir("/")
        self.wake_r, self.wake_w = socket.socketpair()
        for end in (self.wake_r, self.wake_w):
            end.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        self.stopping = False
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._stop)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.running = {}                     # pid -> the caller's connection
        self.listening = True
        self.served = self.from_spare = 0
        self.last = time.monotonic()
        self.started = time.time()
        self.spare_pid = self.spare_sock = None
        self.spare_ready, self.spares = False, True
        self.say(f"listening on {self.path} (pid {self.pid}, idle exit after {idle_s:g} s)")

    def say(self, msg):
        if self.log:
            print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, file=self.log, flush=True)

    def _stop(self, *args):
        self.stopping = True

    def run(self):
        try:
            while True:
                if self.stopping:
                    self.stop_listening()
                    self.drop_spare(kill=True)
                    if not self.running:
                        break
                timeout = None
                if self.listening and not self.running:
                    timeout = self.idle_s - (time.monotonic() - self.last)
                    if timeout <= 0:
                        self.say("idle; exiting")
                        break
                    if self.spares and self.spare_pid is None:
                        self.make_spare()
                for key, _ in self.selector.select(timeout):
                    if key.data == "wake":
                        self.drain_wake_ups()
                    elif key.data == "spare":
                        self.hear_spare()
                    elif key.data == "accept":
                        self.accept()
                    else:
                        self.hear_caller(key.fileobj, key.data)
                self.reap()
        finally:
            self.stop_listening()
            self.drop_spare(kill=True)
            self.say(f"exited after {self.served} command(s)")
        return self.served

    def stop_listening(self):
        if self.listening:
            self.listening = False
            self.selector.unregister(self.listener)
            try:
                if os.stat(self.path).st_ino == self.inode:    # (still ours)
                    os.unlink(self.path)
            except OSError:
                pass
            self.listener.close()

    def inherited(self, *more):
        """The server's descriptors, which a forked copy closes."""
        fds = [self.wake_r.fileno(), self.wake_w.fileno(), self.selector.fileno()]
        fds += [c.fileno() for c in self.running.values()] + list(more)
        if self.listening:
            fds.append(self.listener.fileno())
        if self.log:
            fds.append(self.log.fileno())
        if self.spare_sock is not None:
            fds.append(self.spare_sock.fileno())
        return fds

    def flush(self):
        for stream in (sys.stdout, sys.stderr, self.log):
            if stream is not None:
                stream.flush()

    def make_spare(self):
        self.flush()
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            _spare(theirs, self.inherited(mine.fileno()), self.pid)
        theirs.close()
        self.spare_pid, self.spare_sock, self.spare_ready = pid, mine, False
        self.selector.register(mine, selectors.EVENT_READ, "spare")

    def drop_spare(self, kill):
        if self.spare_sock is not None:
            try:
                self.selector.unregister(self.spare_sock)
            except (KeyError, ValueError):
                pass
            self.spare_sock.close()
            if kill:
                _kill(self.spare_pid, signal.SIGTERM)
        self.spare_pid = self.spare_sock = None
        self.spare_ready = False

    def hear_spare(self):
        try:
            said = self.spare_sock.recv(1)
        except OSError:
            said = b""
        if said == b"r":
            self.spare_ready = True
        else:                           # (gone; reap() says so)
            self.selector.unregister(self.spare_sock)

    def drain_wake_ups(self):
        try:
            while self.wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def reap(self):
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.spare_pid:        # a spare died before it was used: no more of them
                self.drop_spare(kill=False)
                self.spares = False
                self.say(f"the spare exited ({os.waitstatus_to_exitcode(wait_status)}); commands fork afresh")
                continue
            conn = self.running.pop(pid, None)
            if conn is None:
                continue
            self.last = time.monotonic()
            code = os.waitstatus_to_exitcode(wait_status)
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            try:
                conn.sendall((f"exit {code}" if code >= 0 else f"signal {-code}").encode() + b"\n")
            except OSError:
                pass
            conn.close()

    def accept(self):
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        conn.settimeout(2.0)           # (a request comes at once; a stalled caller holds the rest up)
        try:
            if not _peer_is_me(conn):
                raise ConnectionError("a caller of another user")
            request, fds = _recv_request(conn)
            conn.settimeout(None)
            self.answer(conn, request, fds)
        except (OSError, ValueError, ConnectionError) as exc:
            self.say(f"bad request: {exc}")
            conn.close()
        except Exception:              # a bug here must not take the server down with it
            import traceback
            self.say("error answering a request:\n" + traceback.format_exc())
            conn.close()

    def hear_caller(self, conn, pid):
        """A caller's connection is readable: it closed, so its command goes too."""
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(conn)
            _kill(pid, signal.SIGTERM)

    def status(self):
        return {"pid": self.pid, "key": self.key, "socket": self.path, "running": len(self.running),
                "served": self.served, "from_spare": self.from_spare, "spare_ready": self.spare_ready,
                "uptime_s": round(time.time() - self.started, 1), "idle_s": self.idle_s}

    @staticmethod
    def report_fd(conn):
        """[the caller's connection] for a copy to say its exit on, where a copy dies with
        its server (Linux: see :func:`_die_with`); elsewhere [] -- a copy holding the
        connection would keep the caller from seeing a dead server's end of it."""
        return [conn.fileno()] if sys.platform.startswith("linux") else []

    def answer(self, conn, request, fds):
        """Run the request's command in a forked copy, or answer a status/stop query."""
        op = request.get("op", "run")
        if op != "run" or request.get("command") not in COMMANDS or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            if op in ("status", "stop"):
                if op == "stop":
                    self.stopping = True
                conn.sendall((json.dumps(self.status()) + "\n").encode())
            else:
                conn.sendall(b"refused\n")
            conn.close()
            return
        self.last = time.monotonic()
        pid = None
        report = self.report_fd(conn)
        if self.spare_ready:                # hand it to the warm spare
            try:
                _send_request(self.spare_sock, request, list(fds) + report)
                pid = self.spare_pid
                self.from_spare += 1
            except OSError:
                pass
            self.drop_spare(kill=pid is None)
        if pid is None:
            self.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, list(fds) + report, self.inherited(*([] if report else [conn.fileno()])), self.pid)
        for fd in fds:
            os.close(fd)
        self.served += 1
        self.running[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:
            _kill(pid, signal.SIGTERM)


# ----------------------------------------------------------------------------- nbragg-resident

def query(op="status", path=None):
    """The server's reply to ``op`` (status or stop) as a dict, or None when none answers."""
    path = path or socket_path()
    s = _connect(path) if os.path.exists(path) else None
    if s is None:
        return None
    with s:
        try:
            s.settimeout(10.0)
            _send_request(s, {"op": op})
            line = _read_line(s, bytearray())
        except OSError:
            return None
    return json.loads(line) if line else None


def start(idle_s=DEFAULT_IDLE_S, wait_s=600.0):
    """Start a server for this installation in the background (if none answers) and wait
    until it listens; returns its status.  Two starts at once make one server."""
    import fcntl
    key = server_key()
    path = socket_path(create=True, key=key)
    stem = path[:-len(".sock")]
    with open(stem + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # (released when the file closes)
        status = query("status", path)
        if status is not None:
            return status
        log_path = stem + ".log"
        with open(log_path, "a") as log:
            proc = _launch(["serve", "--idle", repr(idle_s), "--log", log_path, "--key", key], log)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = query("status", path)
            if status is not None:
                return status
            if proc.poll() is not None:
                raise ResidentError(f"the server exited with status {proc.returncode} before listening; "
                                    f"see {log_path}")
            time.sleep(0.05)
        raise ResidentError(f"the server did not listen within {wait_s:g} s; see {log_path}")


USAGE = """\
usage: nbragg-resident start [--idle SECONDS] | stop | status

start   start a server in the background; nbragg, nbragg-noisify, nbragg-nonbragg and
        nbragg-refine then run on it, skipping the second of start-up.  It serves the
        commands started like it: the same installation, interpreter and flags, start-up
        environment (NUMBA_*, PYTHON*, OMP_*, locale), CPU affinity, nice value, control
        group and limits; others run by themselves.  It exits after --idle seconds without
        a command (default 1800).
stop    stop it (commands still running finish first)
status  print its process id, socket, uptime and commands served (exit 1 if none runs)
NBRAGG_RESIDENT=off makes commands ignore it; NBRAGG_RESIDENT=auto makes a command that
finds none start one in the background for the commands after it.
"""


def main(argv=None):
    from .errors import report, help_or_version
    argv = sys.argv[1:] if argv is None else list(argv)
    early = help_or_version("nbragg-resident", USAGE, argv, sys.stdout)
    if early is not None:
        return early
    if os.name != "posix":
        return report("nbragg-resident", ResidentError("a resident server needs a POSIX system (fork, Unix sockets)"))
    if not argv or argv[0] not in ("start", "stop", "status", "serve"):
        return report("nbragg-resident", ResidentError(
            f"expected start, stop or status (see --help), got {argv[0] if argv else 'nothing'!r}"))
    op, rest = argv[0], argv[1:]
    idle_s, log_path, expect_key = DEFAULT_IDLE_S, None, None
    while rest:
        flag = rest.pop(0)
        if flag in ("--idle", "--log", "--key"):
            if not rest:
                return report("nbragg-resident", ResidentError(f"{flag} needs a value"))
            value = rest.pop(0)
            if flag == "--log":
                log_path = value
                continue
            if flag == "--key":
                expect_key = value
                continue
            try:
                idle_s = float(value)
            except ValueError:
                idle_s = -1.0
            if not idle_s > 0:
                return report("nbragg-resident",
                              ResidentError(f"--idle: value {value!r} must be a positive number of seconds"))
        else:
            return report("nbragg-resident", ResidentError(f"unexpected argument {flag!r}"))
    try:
        if op == "serve":
            with open(log_path, "a") if log_path else open(os.devnull, "w") as log:
                serve(idle_s, log, expect_key)
            return 0
        if op == "start":
            status = start(idle_s)
            print(f"nbragg-resident: running, pid {status['pid']}, socket {status['socket']}")
            return 0
        status = query(op)
        if status is None:
            print("nbragg-resident: no server runs for this installation")
            return 1 if op == "status" else 0
        if op == "stop":
            print(f"nbragg-resident: stopping pid {status['pid']} after {status['served']} command(s)"
                  + (f"; the {status['running']} command(s) running finish first" if status["running"] else ""))
        else:
            print(f"nbragg-resident: running, pid {status['pid']}, socket {status['socket']}, "
                  f"up {status['uptime_s']:g} s, {status['served']} command(s) served, {status['running']} running")
        return 0
    except ResidentError as exc:
        return report("nbragg-resident", exc)


if __name__ == "__main__":
    sys.exit(main())
