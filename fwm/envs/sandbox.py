"""Runs model-written Python in a separate, limited process: `run_python(code, timeout_s, memory_mb)`.

Every call starts a fresh interpreter (`python -I`) in a fresh temporary directory (its cwd, removed
afterwards) with a minimal environment, resource limits (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
RLIMIT_NOFILE, no core files), a wall-clock timeout, and output capped at `max_output_bytes` per stream
(the rest is read and dropped, so a flood cannot fill the parent's memory). The child side is
fwm/envs/sandbox_child.py. Two isolation modes, reported in `SandboxResult.isolation`:

"namespace" (chosen by "auto" when running as root and util-linux `unshare` + `setpriv` work):
  kernel-enforced --
  * network: a new, empty network namespace (even 127.0.0.1 is unreachable);
  * processes: a new pid namespace; the interpreter is its pid 1, so when it exits or is killed every
    process it started dies with it (os.setsid, double forks, multiprocessing cannot outlive the call),
    and no process outside is visible or can be signalled (the parent cannot be killed);
  * files: a new mount namespace in which every mount is remounted read-only except the working
    directory and a private, size-limited tmpfs on /dev/shm (multiprocessing's semaphores live there;
    it vanishes with the call), so writes anywhere else (/tmp/x, ../x, /work/...) fail with EROFS;
  * identity: a fresh unprivileged uid/gid per call (no supplementary groups, no_new_privs, a parent
    death signal), so RLIMIT_NPROC (`max_processes`, threads included) bounds fork bombs for this call
    alone (root is exempt from RLIMIT_NPROC, which is why the uid is dropped). Where the interpreter
    lives in a directory other users cannot enter (e.g. pyenv under /root), the uid keeps only
    CAP_DAC_READ_SEARCH so it can load Python; it then can read any file, never write one.
  plus the audit hook below.
"audit" (everything else: not root, no unshare, namespaces refused):
  rlimits, a new session (the whole process group is killed at the timeout; with `setpriv` on PATH,
  also when the calling process dies) and a Python audit hook
  that refuses writes outside the working directory, sockets (AF_UNIX socketpairs excepted), starting
  programs (subprocess, exec, spawn, system), ctypes calls (bare `import ctypes` stays possible: numpy
  needs it), signalling other processes and, in this mode, forking (so no fork bombs and no
  multiprocessing). An audit hook is a guard against Python code, not a security boundary: native code
  could bypass it; network and files are then protected only by it and the user's own permissions.

Cost per call on a 2-core CPU box: about 70 ms ("namespace") or 25 ms ("audit") for a trivial snippet.
Reading files is allowed in both modes (world-readable files, or any file under CAP_DAC_READ_SEARCH as
described above): the sandbox protects the host from the code, it does not hide the host from it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_UID_BASE, _UID_SPAN = 2_000_000, 1_000_000  # per-call uids, far above any real account
ISOLATION_MODES = ("auto", "namespace", "audit")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one run produced.

    status: "ok" (exit 0), "error" (non-zero exit, e.g. an exception or MemoryError), "timeout" (wall
    clock), "killed" (a signal: CPU limit, file-size limit, ...). exit_code: the exit status, negative
    for a signal, None after a timeout. truncated: some output beyond max_output_bytes was dropped.
    """

    stdout: str
    stderr: str
    exit_code: int | None
    status: str
    timed_out: bool
    truncated: bool
    output_bytes: int
    wall_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, *, max_output_bytes: int = 16384,
               max_processes: int = 16, max_file_mb: int = 16, max_open_files: int = 64,
               isolation: str = "auto") -> SandboxResult:
    """Runs `code` as the __main__ module of a fresh sandboxed interpreter; never raises for bad code.

    timeout_s: wall-clock limit (the CPU limit is ceil(timeout_s) + 1 s); memory_mb: address-space limit
    of each process; max_processes: processes + threads ("namespace" mode); isolation: "auto",
    "namespace" (raises RuntimeError where unavailable) or "audit" (see the module docstring).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError(f"run_python: timeout_s, memory_mb and max_output_bytes must be positive, got "
                         f"{timeout_s}, {memory_mb}, {max_output_bytes}")
    mode = resolve_isolation(isolation)
    workdir = tempfile.mkdtemp(prefix="fwm_sandbox_")
    try:
        return _run_in(workdir, code, timeout_s, memory_mb, max_output_bytes, max_processes, max_file_mb,
                       max_open_files, mode)
    finally:
        shutil.rmtree(workdir, onerror=_make_removable)


def resolve_isolation(isolation: str) -> str:
    """"auto" -> "namespace" where it works here, else "audit"; explicit "namespace" must work."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"sandbox isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    if isolation == "audit":
        return "audit"
    problem = namespace_isolation_problem()
    if problem is None:
        return "namespace"
    if isolation == "namespace":
        raise RuntimeError(f"sandbox isolation 'namespace' is unavailable here: {problem}; use 'audit' or 'auto'")
    return "audit"


@functools.lru_cache(maxsize=1)
def namespace_isolation_problem() -> str | None:
    """None when namespace mode works on this machine, else why not (probed once per process)."""
    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"util-linux `{tool}` not found on PATH"
    workdir = tempfile.mkdtemp(prefix="fwm_sandbox_probe_")
    try:
        result = _run_in(workdir, "print(6 * 7)", 20.0, 512, 4096, 16, 1, 64, "namespace")
    except OSError as error:
        return f"probe could not start: {error}"
    finally:
        shutil.rmtree(workdir, onerror=_make_removable)
    if result.status != "ok" or result.stdout.strip() != "42":
        return f"probe run failed ({result.status}): {result.stderr.strip()[-300:]}"
    return None


def _run_in(workdir: str, code: str, timeout_s: float, memory_mb: int, max_output_bytes: int,
            max_processes: int, max_file_mb: int, max_open_files: int, mode: str) -> SandboxResult:
    snippet = os.path.join(workdir, "snippet.py")
    with open(snippet, "w", encoding="utf-8") as f:
        f.write(code)
    os.chmod(snippet, 0o644)
    config = {"workdir": os.path.realpath(workdir), "snippet": snippet, "mode": mode,
              "cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb, "max_processes": max_processes,
              "max_file_mb": max_file_mb, "max_open_files": max_open_files}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "USER": "sandbox", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    if mode == "namespace":
        uid = _UID_BASE + random.SystemRandom().randrange(_UID_SPAN)
        os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        config.update(setpriv=shutil.which("setpriv"), uid=uid, gid=uid, python=sys.executable,
                      grant_read_search=not _python_world_readable())
        argv = [shutil.which("unshare"), "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
                sys.executable, "-I", "-S", _CHILD_SCRIPT, "jail", json.dumps(config)]
    else:
        argv = [sys.executable, "-I", _CHILD_SCRIPT, "run", json.dumps(config)]
    if shutil.which("setpriv"):  # if this process dies mid-call (SIGKILL: no finally), the child dies too
        argv = [shutil.which("setpriv"), "--pdeathsig=KILL", "--"] + argv
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    try:
        (out, err), total, timed_out = _collect(proc, start + timeout_s, max_output_bytes)
        exit_code = None if timed_out else proc.wait()
    finally:
        _kill_all(proc)
    if timed_out:
        status = "timeout"
    else:
        status = "ok" if exit_code == 0 else ("killed" if exit_code < 0 else "error")
    return SandboxResult(stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
                         exit_code=exit_code, status=status, timed_out=timed_out,
                         truncated=total > len(out) + len(err), output_bytes=total,
                         wall_s=time.monotonic() - start, isolation=mode)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[tuple[bytes, bytes], int, bool]:
    """Reads stdout and stderr until both close or the deadline passes; keeps the first `cap` bytes of each."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    total = 0
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (bytes(kept[proc.stdout]), bytes(kept[proc.stderr])), total, True
            for key, _ in selector.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fileobj.fileno(), 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                total += len(chunk)
                buffer = kept[key.fileobj]
                buffer += chunk[:max(0, cap - len(buffer))]
    try:  # pipes closed; the process itself may still be running (e.g. it closed its stdout)
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return (bytes(kept[proc.stdout]), bytes(kept[proc.stderr])), total, True
    return (bytes(kept[proc.stdout]), bytes(kept[proc.stderr])), total, False


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILLs the pid-namespace init (which takes every process inside with it), then the session.

    Only while `proc` is unreaped: its pid (and so its process group id) cannot have been reused yet.
    """
    if proc.returncode is None:
        _kill_unreaped(proc)
    for stream in (proc.stdout, proc.stderr):
        stream.close()


def _kill_unreaped(proc: subprocess.Popen) -> None:
    children = []
    for task in _listdir(f"/proc/{proc.pid}/task"):
        try:
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                children += [int(pid) for pid in f.read().split()]
        except OSError:
            pass
    for pid in children:
        _signal(os.kill, pid)
    if children:  # unshare exits once its child, the namespace init, is gone with everything inside
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            pass
    _signal(os.killpg, proc.pid)
    proc.wait()


def _signal(send, pid: int) -> None:
    try:
        send(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _make_removable(function, path: str, _exc_info) -> None:
    """rmtree error handler: the snippet may have left read-only directories behind."""
    os.chmod(os.path.dirname(path), stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IRWXU)
    function(path)


@functools.lru_cache(maxsize=1)
def _python_world_readable() -> bool:
    """Whether an unprivileged uid can load this interpreter, its libraries and this package."""
    paths = [os.path.realpath(sys.executable), sys.base_prefix, sys.prefix, os.path.dirname(_CHILD_SCRIPT),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        paths.append(sysconfig.get_config_var("LIBDIR"))
    return all(_world_accessible(path) for path in paths if path)


def _world_accessible(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # absent: nothing to load from there
    if not mode & stat.S_IROTH or (stat.S_ISDIR(mode) and not mode & stat.S_IXOTH):
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)
