"""The python sandbox: limits hold, escapes fail, both isolation modes (namespace where this machine allows)."""
import ast
import os
import time

import pytest

from fwm.envs import sandbox
from fwm.envs.sandbox import run_python

NAMESPACE_PROBLEM = sandbox.namespace_isolation_problem()
MODES = ["audit", pytest.param("namespace", marks=pytest.mark.skipif(
    NAMESPACE_PROBLEM is not None, reason=f"namespace isolation unavailable: {NAMESPACE_PROBLEM}"))]


def _uid_and_parent(pid: int) -> tuple[int, int] | None:
    """(real uid, parent pid) of a process from /proc/PID/status; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("Uid:", "PPid:")))
        return int(fields["Uid"].split()[0]), int(fields["PPid"])
    except (OSError, KeyError, ValueError):
        return None


def _is_sandbox_uid(uid: int) -> bool:
    return sandbox._UID_BASE <= uid < sandbox._UID_BASE + sandbox._UID_SPAN


def _outlived_its_call(pid: int) -> bool:
    """Whether `pid` runs under a per-call sandbox uid outside any live run_python call of another process.

    A namespace call is caller -> `unshare` (root) -> interpreter under the per-call uid, so a peer pytest
    worker's call in flight has an `unshare` with a live parent other than this process above its sandbox-uid
    processes; a process that escaped its call is reparented away from that `unshare` (to init). A process or
    ancestor that vanishes during the walk belonged to a call that just ended (an escaped one would persist).
    """
    status = _uid_and_parent(pid)
    if status is None or not _is_sandbox_uid(status[0]):
        return False
    while status is not None and _is_sandbox_uid(status[0]):
        pid = status[1]
        status = _uid_and_parent(pid)
    if status is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            program = os.path.basename(f.read().split(b"\0")[0])
    except OSError:
        return False
    return not (program == b"unshare" and status[1] not in (0, 1, os.getpid()))


def _sandbox_uid_processes() -> list[int]:
    """Processes under a per-call sandbox uid (namespace mode) that outlived their run_python call.

    Peer workers' calls in flight (pytest-xdist runs other files' sandbox calls beside this one) are not leaks.
    """
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _outlived_its_call(int(name))]


def test_auto_mode_matches_probe():
    result = run_python("print(6 * 7)")
    assert result.ok and result.stdout == "42\n"
    assert result.isolation == ("namespace" if NAMESPACE_PROBLEM is None else "audit")


@pytest.mark.parametrize("mode", MODES)
def test_runs_code_in_a_fresh_directory_and_reports_errors(mode):
    result = run_python("import os\nopen('note.txt', 'w').write('hi')\nprint(open('note.txt').read(), os.listdir('.'))",
                        isolation=mode)
    assert result.status == "ok", result.stderr
    assert result.stdout.startswith("hi [")
    listing = ast.literal_eval(result.stdout[len("hi "):])  # the sandbox's own directory, not ours
    assert "note.txt" in listing and not set(listing) & set(os.listdir("."))
    error = run_python("def f():\n    return 1 / 0\nf()", isolation=mode)
    assert error.status == "error" and error.exit_code == 1
    assert 'File "snippet.py", line 2, in f' in error.stderr and "ZeroDivisionError" in error.stderr
    assert "sandbox_child" not in error.stderr  # the runner's own frames are hidden
    assert run_python("import sys; sys.exit(3)", isolation=mode).exit_code == 3


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_and_sleep_are_stopped_by_the_wall_clock(mode):
    for code in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        start = time.monotonic()
        result = run_python(code, timeout_s=0.5, isolation=mode)
        assert result.timed_out and result.status == "timeout" and result.exit_code is None
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb_hits_the_memory_limit(mode):
    start = time.monotonic()
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", timeout_s=5.0,
                        memory_mb=256, isolation=mode)
    assert result.status == "error" and "MemoryError" in result.stderr
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_contained(mode):
    counted = run_python(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(5)\n"
        "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('forks', n, type(e).__name__)",
        timeout_s=3.0, max_processes=8, isolation=mode)
    assert counted.status == "ok", counted.stderr
    if mode == "audit":  # forking is refused outright
        assert counted.stdout == "forks 0 PermissionError\n"
    else:  # RLIMIT_NPROC for the per-call uid: 8 tasks, the interpreter included
        assert counted.stdout == "forks 7 BlockingIOError\n"
    start = time.monotonic()
    bomb = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                      timeout_s=1.0, max_processes=8, isolation=mode)
    assert bomb.status in ("timeout", "error")
    assert time.monotonic() - start < 6
    assert _sandbox_uid_processes() == []


@pytest.mark.parametrize("mode", MODES)
def test_no_network(mode):
    import socket

    server = socket.create_server(("127.0.0.1", 0))  # the kernel completes connections even without accept()
    port = server.getsockname()[1]
    for code in (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('CONNECTED')",
                 f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('CONNECTED')"):
        result = run_python(code, timeout_s=3.0, isolation=mode)
        assert result.status == "error" and "CONNECTED" not in result.stdout
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever connected
    server.close()


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_the_directory_fail(mode, tmp_path):
    target = tmp_path / "x"
    attempts = [f"open({str(target)!r}, 'w').write('escaped')", "open('../fwm_sandbox_escape', 'w').write('x')",
                f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                f"import shutil\nopen('a', 'w').write('x')\nshutil.copy('a', {str(tmp_path)!r})",
                f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
                "os.open('y', os.O_WRONLY | os.O_CREAT, dir_fd=d)",
                "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > " + str(target) + "'])"]
    for code in attempts:
        result = run_python(code, isolation=mode)
        assert result.status == "error", (code, result)
    assert os.listdir(tmp_path) == []
    assert not os.path.exists(os.path.join(os.path.dirname(os.getcwd()), "fwm_sandbox_escape"))


@pytest.mark.parametrize("mode", MODES)
def test_other_escapes(mode):
    parent_pid = os.getpid()
    killed = run_python("import os\nos.kill(os.getppid(), 9)", isolation=mode)
    assert os.getpid() == parent_pid  # still alive to assert it
    assert killed.status in ("ok", "error")
    ctypes_call = run_python("import ctypes\nctypes.CDLL(None).getpid()", isolation=mode)
    assert ctypes_call.status == "error" and "ctypes" in ctypes_call.stderr
    # A detached grandchild must not outlive the call (namespace) or cannot be made (audit).
    escaped = run_python("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
                         "print('parent done')", isolation=mode)
    assert escaped.status == ("ok" if mode == "namespace" else "error")
    assert _sandbox_uid_processes() == []
    # Reading is allowed (documented): world-readable files such as /etc/passwd.
    assert "root" in run_python("print(open('/etc/passwd').read())", isolation=mode).stdout


@pytest.mark.parametrize("mode", MODES)
def test_output_is_truncated(mode):
    result = run_python("print('x' * 10**7)", max_output_bytes=1000, isolation=mode)
    assert result.ok and result.truncated and len(result.stdout) == 1000 and result.output_bytes == 10**7 + 1
    flood = run_python("while True:\n    print('y' * 1000)", timeout_s=1.0, max_output_bytes=1000, isolation=mode)
    assert flood.timed_out and flood.truncated and len(flood.stdout) == 1000


def test_namespace_mode_multiprocessing_and_numpy():
    if NAMESPACE_PROBLEM is not None:
        pytest.skip(f"namespace isolation unavailable: {NAMESPACE_PROBLEM}")
    result = run_python("import multiprocessing as mp\nimport numpy as np\nif __name__ == '__main__':\n"
                        "    with mp.Pool(2) as pool:\n        print(pool.map(abs, [-1, -2]), int(np.arange(4).sum()))",
                        timeout_s=10.0, isolation="namespace")
    assert result.ok, result.stderr
    assert result.stdout == "[1, 2] 6\n"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="isolation"):
        run_python("print(1)", isolation="docker")
    with pytest.raises(ValueError, match="positive"):
        run_python("print(1)", timeout_s=0)
