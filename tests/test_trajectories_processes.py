"""Worker processes of `fwm data` (collect.map_chunks): they die with a parent killed by SIGKILL, taking
multiprocessing's resource tracker with them; progress is a bar only on a terminal."""
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

from fwm.trajectories.collect import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = textwrap.dedent("""
    import os, sys, time
    from fwm.trajectories.collect import map_chunks

    def hold(directory, chunk):
        open(os.path.join(directory, f"worker-{os.getpid()}"), "w").close()
        time.sleep(120)
        return chunk

    if __name__ == "__main__":
        map_chunks(hold, sys.argv[1], list(range(4)), workers=2, chunk_size=1, desc="hold", progress=False)
""")


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (whoever adopted it may not reap it at once)


def test_workers_and_resource_tracker_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=ROOT)
    children = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("worker-*"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        children = _children(parent.pid)
        workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert set(workers) < set(children)  # the workers and (at least) the resource tracker
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "processes outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in children:  # only if the test failed: leave nothing behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_only_on_a_terminal(caplog):
    log = io.StringIO()
    with caplog.at_level(logging.INFO):
        with Progress(10, "collect sft", "episode", stream=log, every_s=0.0) as progress:
            progress.update(4)
            progress.update(6)
    assert log.getvalue() == ""  # no redraws in a log file
    lines = [r.getMessage() for r in caplog.records if "collect sft" in r.getMessage()]
    assert len(lines) == 3 and lines[-1].startswith("collect sft: 10/10 episodes (100%)")
    terminal = _Terminal()
    with Progress(10, "collect sft", "episode", stream=terminal) as progress:
        progress.update(10)
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()
    silent = io.StringIO()
    with Progress(10, "x", "y", stream=silent, enabled=False) as progress:
        progress.update(10)
    assert silent.getvalue() == ""
