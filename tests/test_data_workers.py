"""Grain worker processes of a training pipeline die with their parent, even when it is SIGKILLed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fwm.tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENT = '''
import sys, time
from fwm.data import pipelines
from fwm.tokenizer import load_tokenizer

if __name__ == "__main__":  # Grain workers re-import the main module
    tokenizer = load_tokenizer(sys.argv[1])
    dataset = pipelines.lm_pipeline(sys.argv[2], tokenizer, seq_len=32, batch_size=2, worker_count=2,
                                    process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(8):  # Grain starts its workers one by one as batches are asked for
        next(iterator)
    print("ready", flush=True)
    time.sleep(300)
'''


def _children(pid):
    """Live (non-zombie) descendants of pid, from /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_when_the_parent_is_sigkilled(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    texts = [f"document {i} about the river city and its bridge number {i % 7}" for i in range(200)]
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    train_sentencepiece(texts, str(tmp_path / "tok.model"), 320)
    (tmp_path / "parent.py").write_text(PARENT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "tok.model"), str(corpus)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    workers = []
    try:
        assert proc.stdout.readline().strip() == "ready" or pytest.fail(proc.stdout.read()[-3000:])
        workers = _children(proc.pid)
        assert len(workers) >= 3, workers  # the two Grain workers and multiprocessing's resource tracker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their SIGKILLed parent"
    finally:
        for pid in [proc.pid] + _children(proc.pid) + [pid for pid in workers if _alive(pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
