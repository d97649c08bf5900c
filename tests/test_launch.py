"""launch/tpu_vm.sh: the exact commands of --dry-run, usage errors, shellcheck, and the `run` command
executed for real on a fake worker (a temporary home in its own pid namespace, a stand-in fwm.cli).

No test reaches gcloud: a `gcloud` on PATH that records any call proves --dry-run runs nothing.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_vm.sh"
TPU = ["--name", "fwm-v4", "--zone", "us-central2-b"]
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.fixture
def env(tmp_path):
    """No FWM_* defaults from the caller's environment; a gcloud that records calls on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\nexit 1\n')
    (bin_dir / "gcloud").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FWM_")}
    environ["PATH"] = f"{bin_dir}{os.pathsep}{environ['PATH']}"
    yield environ
    assert not calls.exists(), f"gcloud was called: {calls.read_text()}"


def sh(env, *args, check=True):
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(env, *args):
    """The printed commands, each split back into its argv as bash would read it."""
    out = sh(env, *args, "--dry-run").stdout
    return [shlex.split(line) for line in out.splitlines()]


def remote_command(argv):
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return command


def job_script(command):
    """The script the detached job shell runs (`setsid nohup bash -c SCRIPT fwm-job`)."""
    words = shlex.split(command)
    i = words.index("nohup")
    assert words[i - 1] == "setsid" and words[i + 1: i + 3] == ["bash", "-c"] and words[i + 4] == "fwm-job"
    return words[i + 3]


def fwm_invocations(script):
    """Each `python -m fwm.cli ...` of a job script as its argv (words between ';' separators)."""
    words = shlex.split(script)
    runs, current = [], None
    for word in words + [";"]:
        if word == "../venv/bin/python":
            current = [word]
        elif current is not None:
            if word == ";":
                runs.append(current)
                current = None
            else:
                current.append(word)
    return runs


def jax_pin():
    (pin,) = re.findall(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    return pin


def head_commit():
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"setup ships the committed tree and {REPO} is not a git checkout")
    return proc.stdout.strip()


def test_create(env):
    (argv,) = dry_run(env, "create", *TPU, "--spot", "--project", "my proj")
    assert argv == GCLOUD + ["create", "fwm-v4", "--zone=us-central2-b", "--accelerator-type=v4-32",
                             "--version=tpu-ubuntu2204-base", "--spot", "--project=my proj"]
    (argv,) = dry_run(env, "create", *TPU, "--accelerator-type=v6e-8", "--runtime-version", "custom-image")
    assert argv == GCLOUD + ["create", "fwm-v4", "--zone=us-central2-b", "--accelerator-type=v6e-8",
                             "--version=custom-image"]


def test_env_defaults(env):
    env = dict(env, FWM_TPU_NAME="from-env", FWM_ZONE="europe-west4-a", FWM_SPOT="1")
    (argv,) = dry_run(env, "create")
    assert argv[len(GCLOUD):] == ["create", "from-env", "--zone=europe-west4-a", "--accelerator-type=v4-32",
                                  "--version=tpu-ubuntu2204-base", "--spot"]


def test_setup(env):
    commit = head_commit()
    archive, scp, ssh = dry_run(env, "setup", *TPU)
    assert archive[:5] == ["git", "-C", str(REPO), "archive", "--format=tar.gz"]
    assert archive[-1] == commit
    tarball = archive[5][len("--output="):]
    assert scp == GCLOUD + ["scp", tarball, "fwm-v4:fwm-code.tar.gz", "--zone=us-central2-b", "--worker=all"]
    assert ssh[:len(GCLOUD) + 4] == GCLOUD + ["ssh", "fwm-v4", "--zone=us-central2-b", "--worker=all"]
    words = shlex.split(remote_command(ssh))
    # pip install -r requirements.txt 'jax[tpu]==<the pin>' then pip install -e .
    i = words.index("-r")
    assert words[i - 5: i + 3] == ["../venv/bin/python", "-m", "pip", "install", "--quiet", "-r", "requirements.txt",
                                   f"jax[tpu]=={jax_pin()}"]
    assert words[i + 3: i + 11] == ["&&", "../venv/bin/python", "-m", "pip", "install", "--quiet", "-e", "."]
    assert ["tar", "-xzf", "../fwm-code.tar.gz", "-C", "code.new"] == words[words.index("tar"):][:5]
    assert ["uv", "venv", "--seed", "--python", "3.11", "venv"] == words[words.index("venv") - 1:][:6]


def test_run(env):
    (argv,) = dry_run(env, "run", *TPU, "--project", "p", "--config", "experiments/tiny.py:sft",
                      "--workdir", "gs://bucket/runs/a", "--override", "train.num_steps=50",
                      "--override=data.note=it's two words", "--ssh-arg=--tunnel-through-iap")
    assert argv[:len(GCLOUD) + 6] == GCLOUD + ["ssh", "fwm-v4", "--zone=us-central2-b", "--project=p",
                                               "--worker=all", "--tunnel-through-iap"]
    command = remote_command(argv)
    assert "pkill -TERM -f" in command and "|| true" in command  # stale jobs stopped, none tolerated
    script = job_script(command)
    assert "export FWM_DISTRIBUTED=1" in script
    assert fwm_invocations(script) == [[
        "../venv/bin/python", "-m", "fwm.cli", "train", "--config", "experiments/tiny.py:sft",
        "--config.train.num_steps=50", "--config.data.note=it's two words", "--workdir", "gs://bucket/runs/a"]]
    assert ">>../logs/run.log 2>&1 </dev/null &" in command


def test_sweep_sequential(env, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("# name, then its own fwm arguments\nsmall --config.model.num_layers=2\n\nlarge\n")
    (argv,) = dry_run(env, "sweep", *TPU, "--config", "experiments/tiny.py", "--workdir", "gs://b/sweep/",
                      "baseline", "--rows-file", str(rows), "--override", "train.seed=3",
                      "--fwm-arg=--note={row}", "--done-path", "gs://b/sweep/DONE", "--mark-done")
    assert argv[:len(GCLOUD) + 4] == GCLOUD + ["ssh", "fwm-v4", "--zone=us-central2-b", "--worker=all"]
    script = job_script(remote_command(argv))
    base = ["../venv/bin/python", "-m", "fwm.cli", "train", "--config", "experiments/tiny.py",
            "--config.train.seed=3", "--workdir"]
    assert fwm_invocations(script) == [
        base + ["gs://b/sweep/baseline", "--note=baseline"],
        base + ["gs://b/sweep/small", "--note=small", "--config.model.num_layers=2"],
        base + ["gs://b/sweep/large", "--note=large"],
    ]
    # The marker is written once, after the last row.
    assert script.index("gcloud storage cp - gs://b/sweep/DONE") > script.index("gs://b/sweep/large")


def test_sweep_tpu_per_row(env):
    lines = dry_run(env, "sweep", *TPU, "--config", "c.py", "--workdir", "gs://b/s", "a", "B-2", "--tpu-per-row",
                    "--done-path", "gs://b/s/{row}/DONE", "--mark-done")
    assert [argv[len(GCLOUD):len(GCLOUD) + 2] for argv in lines] == [["ssh", "fwm-v4-a"], ["ssh", "fwm-v4-b-2"]]
    for argv, row in zip(lines, ["a", "B-2"]):
        script = job_script(remote_command(argv))
        assert fwm_invocations(script)[0][-2:] == ["--workdir", f"gs://b/s/{row}"]
        assert f"gcloud storage cp - gs://b/s/{row}/DONE" in script
    proc = sh(env, "sweep", *TPU, "--config", "c.py", "--workdir", "gs://b/s", "B_2", "--tpu-per-row",
              "--dry-run", check=False)
    assert proc.returncode == 2 and "'fwm-v4-b_2' for row 'B_2' is not a valid TPU name" in proc.stderr


def test_babysit_dry_run(env):
    lines = dry_run(env, "babysit", *TPU, "--config", "c.py", "--workdir", "gs://b/w",
                    "--done-path", "gs://b/w/DONE", "--max-restarts", "0")
    assert lines == [
        ["gcloud", "storage", "ls", "gs://b/w/DONE"],
        GCLOUD + ["describe", "fwm-v4", "--zone=us-central2-b", "--format=value(state)"],
    ]
    head_commit()
    lines = dry_run(env, "babysit", *TPU, "--config", "c.py", "--workdir", "gs://b/w",
                    "--done-path", "gs://b/w/DONE", "--spot")
    steps = [argv[len(GCLOUD)] if argv[0] == "gcloud" and argv[1] == "compute" else argv[1] for argv in lines]
    assert steps == ["storage", "describe", "delete", "create", "-C", "scp", "ssh", "ssh"]
    assert "--spot" in lines[3] and "--quiet" in lines[2]
    assert "fwm.cli" in remote_command(lines[-1])


def test_help(env):
    out = sh(env, "--help").stdout
    for sub in ("create", "setup", "run", "sweep", "status", "logs", "babysit", "delete"):
        assert re.search(rf"^  {sub} ", out, re.M), sub
        assert sh(env, sub, "--help").stdout.startswith(f"usage: tpu_vm.sh {sub}")


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "unknown subcommand 'frobnicate'"),
    ([], "missing subcommand"),
    (["create", "--zone", "z"], "missing required flag --name"),
    (["run", *TPU, "--workdir", "gs://b"], "missing required flag --config"),
    (["run", *TPU, "--config", "c.py", "--workdir", "gs://b", "--bogus"], "unknown flag '--bogus'"),
    (["run", *TPU, "--config", "c.py", "--workdir", "gs://b", "--override", "no_equals"], "--override wants"),
    (["sweep", *TPU, "--config", "c.py", "--workdir", "gs://b"], "no rows"),
    (["babysit", *TPU, "--config", "c.py", "--workdir", "gs://b"], "missing required flag --done-path"),
])
def test_usage_errors(env, args, message):
    proc = sh(env, *args, *(["--dry-run"] if args else []), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "usage: tpu_vm.sh" in proc.stderr
    assert not proc.stdout


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); the script's lint is unchecked")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


FAKE_CLI = textwrap.dedent("""\
    import json, os, signal, sys, time
    out = os.environ["FAKE_OUT"]
    def record(**kw):
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\\n")
    def stop(*_):
        record(event="sigterm", pid=os.getpid())
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    record(event="start", pid=os.getpid(), argv=sys.argv[1:], distributed=os.environ.get("FWM_DISTRIBUTED"))
    if "--config.sleep=1" in sys.argv:
        time.sleep(60)
    """)

DRIVER = textwrap.dedent("""\
    set -eu
    cd "$HOME"
    wait_for() {  # wait_for N: until N start records exist
      for _ in $(seq 100); do [ "$(grep -c '"start"' "$FAKE_OUT" 2>/dev/null || true)" -ge "$1" ] && return; sleep 0.1; done
      echo "timed out waiting for $1 starts" >&2; exit 1
    }
    out=$(bash -c "$CMD1")   # returns although the job runs on: its output goes to the log
    echo "$out"
    wait_for 1
    bash -c "$CMD2"          # stops the first job, starts the sweep
    wait_for 3
    for _ in $(seq 100); do [ -f "$HOME/gcloud_args" ] && break; sleep 0.1; done
    """)


def test_run_on_fake_worker(env, tmp_path):
    """The printed `run` then `sweep` commands, executed by bash in a fake worker's home: the first
    job is detached and logged, the second stops it (SIGTERM) before starting the sweep's rows."""
    if sys.platform != "linux" or shutil.which("unshare") is None or shutil.which("setsid") is None:
        pytest.skip("needs Linux with unshare and setsid")
    # Its own pid namespace, so the stale-job pkill sees only this test's processes.
    if subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a pid namespace here (unshare -p needs root or user namespaces)")
    home = tmp_path / "home"
    (home / "fwm" / "code" / "fwm").mkdir(parents=True)
    (home / "fwm" / "venv" / "bin").mkdir(parents=True)
    (home / "fwm" / "venv" / "bin" / "python").symlink_to(sys.executable)
    (home / "fwm" / "code" / "fwm" / "__init__.py").write_text("")
    (home / "fwm" / "code" / "fwm" / "cli.py").write_text(FAKE_CLI)
    worker_bin = tmp_path / "worker_bin"
    worker_bin.mkdir()
    (worker_bin / "gcloud").write_text('#!/bin/sh\necho "$@" > "$HOME/gcloud_args"\ncat > "$HOME/gcloud_stdin"\n')
    (worker_bin / "gcloud").chmod(0o755)

    (run,) = dry_run(env, "run", *TPU, "--config", "experiments/tiny.py", "--workdir", "gs://b/w",
                     "--override", "sleep=1", "--override", "note=a b")
    (sweep,) = dry_run(env, "sweep", *TPU, "--config", "experiments/tiny.py", "--workdir", "gs://b/s",
                       "r1", "r2", "--done-path", "gs://b/s/DONE", "--mark-done")
    out = tmp_path / "fake_out.jsonl"
    worker_env = dict(os.environ, HOME=str(home), FAKE_OUT=str(out), CMD1=remote_command(run),
                      CMD2=remote_command(sweep), PATH=f"{worker_bin}{os.pathsep}{os.environ['PATH']}")
    worker_env.pop("PYTHONPATH", None)
    proc = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "bash", "-c", DRIVER], env=worker_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fwm job started on" in proc.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()]
    starts = [r for r in records if r["event"] == "start"]
    assert [r["argv"] for r in starts] == [
        ["train", "--config", "experiments/tiny.py", "--config.sleep=1", "--config.note=a b", "--workdir", "gs://b/w"],
        ["train", "--config", "experiments/tiny.py", "--workdir", "gs://b/s/r1"],
        ["train", "--config", "experiments/tiny.py", "--workdir", "gs://b/s/r2"],
    ]
    assert {r["distributed"] for r in starts} == {"1"}
    # The first job got SIGTERM (its checkpoint save) before the sweep's first row started.
    assert [r["event"] for r in records[:3]] == ["start", "sigterm", "start"]
    assert records[1]["pid"] == starts[0]["pid"]
    assert (home / "gcloud_args").read_text().split() == ["storage", "cp", "-", "gs://b/s/DONE"]
    log = (home / "fwm" / "logs" / "run.log").read_text()
    assert log.count("=== fwm job start") == 1 and "=== fwm sweep row r2 start" in log


FAKE_GCLOUD = textwrap.dedent("""\
    #!/bin/bash
    # describe answers the lines of $FAKE/states in turn (MISSING: gcloud's NOT_FOUND error), then
    # READY and the run counts as done; storage ls succeeds once it is done.
    echo "$*" >> "$FAKE/calls"
    case "$*" in
      "compute tpus tpu-vm describe "*)
        n=$(( $(cat "$FAKE/n" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE/n"
        state=$(sed -n "${n}p" "$FAKE/states")
        if [ -z "$state" ]; then touch "$FAKE/done"; echo READY
        elif [ "$state" = MISSING ]; then echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: x" >&2; exit 1
        else echo "$state"; fi ;;
      "storage ls "*) [ -f "$FAKE/done" ] ;;
      *) exit 0 ;;
    esac
    """)


def babysit_with_fake_gcloud(env, tmp_path, states, *flags):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "states").write_text("".join(s + "\n" for s in states))
    gcloud = tmp_path / "fake_bin" / "gcloud"
    gcloud.parent.mkdir()
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    env = dict(env, FAKE=str(fake), TMPDIR=str(tmp_path), PATH=f"{gcloud.parent}{os.pathsep}{env['PATH']}")
    proc = sh(env, "babysit", *TPU, "--config", "experiments/tiny.py", "--workdir", "gs://b/w",
              "--done-path", "gs://b/w/DONE", "--poll-seconds", "0", *flags, check=False)
    calls = (fake / "calls").read_text().splitlines()
    # "storage ls" or the tpu-vm verb; every tpu-vm call is about fwm-v4.
    steps = [c.split()[3] if c.startswith("compute tpus tpu-vm ") else " ".join(c.split()[:2]) for c in calls]
    assert all(re.search(r"(^| )fwm-v4(:| |$)", c) for c in calls if c.startswith("compute"))
    return proc, steps, calls


def test_babysit_recovers_until_done(env, tmp_path):
    head_commit()
    proc, steps, calls = babysit_with_fake_gcloud(env, tmp_path, ["READY", "PREEMPTED", "MISSING", "CREATING"],
                                                  "--delete-when-done")
    assert proc.returncode == 0, proc.stderr
    recreate = ["delete", "create", "scp", "ssh", "ssh"]
    poll = ["storage ls", "describe"]
    assert steps == [
        *poll,                     # READY: nothing to do
        *poll, *recreate,          # PREEMPTED: delete, create, setup (scp + ssh), run (ssh)
        *poll, *recreate[1:],      # MISSING: no delete
        *poll,                     # CREATING: wait
        *poll,                     # READY (and now done)
        "storage ls", "delete",    # done: --delete-when-done
    ]
    assert "recovery 2/10" in proc.stderr and "the run is complete" in proc.stderr
    assert (tmp_path / f"fwm-code-{head_commit()}.tar.gz").is_file()  # one archive, reused
    assert sum("--command=" in c and "fwm.cli" in c for c in calls) == 2


def test_babysit_gives_up_after_max_restarts(env, tmp_path):
    head_commit()
    proc, steps, _ = babysit_with_fake_gcloud(env, tmp_path, ["PREEMPTED", "PREEMPTED"], "--max-restarts", "1")
    assert proc.returncode == 1
    assert "--max-restarts 1 is used up" in proc.stderr
    assert steps.count("create") == 1


def test_setup_on_fake_worker(env, tmp_path):
    """The printed setup commands, executed: the archive unpacks into ~/fwm/code (replacing an old
    tree, keeping the venv), uv makes the venv once, pip installs with the jax[tpu] pin."""
    head_commit()
    archive, _, ssh = dry_run(env, "setup", *TPU)
    home = tmp_path / "home"
    (home / "fwm" / "code").mkdir(parents=True)
    (home / "fwm" / "code" / "stale.py").write_text("")
    archive[archive.index(next(a for a in archive if a.startswith("--output=")))] = \
        f"--output={home / 'fwm-code.tar.gz'}"
    subprocess.run(archive, check=True, timeout=60)  # the scp, done locally
    worker_bin = tmp_path / "worker_bin"
    worker_bin.mkdir()
    calls = tmp_path / "calls"
    python = textwrap.dedent(f"""\
        #!/bin/sh
        echo "python $PWD $*" >> {calls}
        """)
    uv = textwrap.dedent(f"""\
        #!/bin/sh
        echo "uv $*" >> {calls}
        mkdir -p venv/bin && printf '%s' {shlex.quote(python)} > venv/bin/python && chmod +x venv/bin/python
        """)
    (worker_bin / "uv").write_text(uv)
    (worker_bin / "uv").chmod(0o755)
    worker_env = dict(env, HOME=str(home), PATH=f"{worker_bin}{os.pathsep}{env['PATH']}")
    for _ in range(2):  # a second setup reuses the venv
        proc = subprocess.run(["bash", "-c", remote_command(ssh)], cwd=home, env=worker_env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    code = home / "fwm" / "code"
    assert not (code / "stale.py").exists() and (code / "launch" / "tpu_vm.sh").is_file()
    assert (code / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
    lines = calls.read_text().splitlines()
    assert lines[0] == "uv venv --seed --python 3.11 venv"
    assert lines[1:4] == [
        f"python {code} -m pip install --quiet -r requirements.txt jax[tpu]=={jax_pin()}",
        f"python {code} -m pip install --quiet -e .",
        f"python {code} -c import fwm, jax; print(\"fwm ready, jax\", jax.__version__)",
    ]
    assert lines[4:] == lines[1:4]
