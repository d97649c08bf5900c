#!/usr/bin/env bash
# fwm on Cloud TPU VMs: create, set up, run, sweep, watch and delete a TPU VM (a single host or a pod
# slice) with gcloud. Every remote step runs on all workers (`--worker=all`); the job runs with
# FWM_DISTRIBUTED=1 so each worker calls jax.distributed.initialize() and joins the same program.
#
# `tpu_vm.sh --help` and `tpu_vm.sh SUBCOMMAND --help` describe the commands and their flags.
# `--dry-run` prints every command, one per line, quoted with printf %q, exactly as it would run,
# and runs nothing (reading the local git repository is not a side effect and still happens).
#
# Layout on every worker (paths relative to the login user's home):
#   fwm/code           the committed tree shipped by `setup` (replaced on every setup)
#   fwm/venv           the virtual environment (Python from uv; jax[tpu] at requirements.txt's pin)
#   fwm/logs/run.log   the job's output (appended; each start writes a header line)
#   fwm/logs/job.pgid  the process group of the running job, so a rerun stops it first
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
SUBCOMMANDS="create setup run sweep status logs babysit delete"

# Matches the python process of an fwm job (`python -m fwm.cli ...` as started here, or the `fwm`
# console script) by its command line from the start, so it never matches the shells that carry
# this pattern in their own command line (ssh's `bash -c ...`, the job's `bash -c ...`).
STALE_PATTERN='^[^ ]*python[^ ]* (-m fwm[.]cli|[^ ]*/bin/fwm) '
# The uv installer, used when the worker has no uv: TPU VM images ship Python 3.10, the pinned
# requirements need 3.11, and uv brings a standalone interpreter without touching the system one.
UV_INSTALLER=https://astral.sh/uv/install.sh

# ---- flags (environment variables give the defaults) ----------------------------------------
NAME=${FWM_TPU_NAME:-}
ZONE=${FWM_ZONE:-}
PROJECT=${FWM_PROJECT:-}
ACCELERATOR_TYPE=${FWM_ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${FWM_RUNTIME_VERSION:-}
SPOT=${FWM_SPOT:-0}
CONFIG=${FWM_CONFIG:-}
WORKDIR=${FWM_WORKDIR:-}
FWM_CMD=${FWM_COMMAND:-train}
DONE_PATH=${FWM_DONE_PATH:-}
MARK_DONE=0
MAX_RESTARTS=${FWM_MAX_RESTARTS:-10}
POLL_SECONDS=${FWM_POLL_SECONDS:-120}
PYTHON_VERSION=${FWM_PYTHON_VERSION:-3.11}
REF=${FWM_REF:-HEAD}
ROWS_FILE=""
TPU_PER_ROW=0
CREATE_ROWS=0
DELETE_WHEN_DONE=0
LOG_LINES=100
WORKER=0
FOLLOW=0
DRY_RUN=0
OVERRIDES=()
FWM_ARGS=()
SSH_ARGS=()
CREATE_ARGS=()
ROWS=()
ROW_EXTRA=()   # per row: whitespace-separated extra fwm arguments from the rows file

# ---- help ------------------------------------------------------------------------------------
usage() {
  cat <<EOF
usage: $PROG SUBCOMMAND [FLAGS]    ($PROG SUBCOMMAND --help for its flags)

Runs fwm on a Cloud TPU VM (single host or pod slice) with gcloud; every remote step runs on
all workers, and jobs run with FWM_DISTRIBUTED=1 (jax.distributed.initialize() on each worker).

subcommands:
  create    create the TPU VM (gcloud compute tpus tpu-vm create)
  setup     ship the committed tree (git archive) to every worker, install requirements with jax[tpu]
  run       start one fwm job on every worker (stale fwm processes stopped first; nohup; logged)
  sweep     one job per row of a sweep, each in WORKDIR/ROW (sequential on one TPU, or one TPU per row)
  status    the TPU's state and, on every worker, the fwm process and the log's last lines
  logs      tail the job's log on worker 0 (or --worker all)
  babysit   watch the TPU; when it is preempted or gone, recreate, set up and rerun (resumes from the
            workdir's latest checkpoint) until the completion marker --done-path exists
  delete    delete the TPU VM (--quiet, no prompt)

common flags (environment defaults in brackets):
  --name NAME               TPU name [FWM_TPU_NAME]                     (required)
  --zone ZONE               e.g. us-central2-b [FWM_ZONE]               (required)
  --project PROJECT         GCP project; gcloud's default if unset [FWM_PROJECT]
  --dry-run                 print the commands (printf %q quoted), run nothing
  -h, --help                this help; after a subcommand, that subcommand's help
EOF
}

usage_create() {
  cat <<EOF
usage: $PROG create --name NAME --zone ZONE [--project P] [--accelerator-type T] [--runtime-version V]
                    [--spot] [--create-arg ARG]... [--dry-run]

  --accelerator-type T      [FWM_ACCELERATOR_TYPE, default v4-32]
  --runtime-version V       TPU VM image [FWM_RUNTIME_VERSION]; default from the accelerator type:
                            v4*/v5p* tpu-ubuntu2204-base, v5litepod*/v5e* v2-alpha-tpuv5-lite,
                            v6e* v2-alpha-tpuv6e
  --spot                    a spot (preemptible) TPU [FWM_SPOT=1]
  --create-arg ARG          passed to gcloud create as is (repeatable), e.g. --create-arg=--network=N
EOF
}

usage_setup() {
  cat <<EOF
usage: $PROG setup --name NAME --zone ZONE [--project P] [--ref REF] [--python-version V]
                   [--ssh-arg ARG]... [--dry-run]

Ships the committed tree at REF (git archive; uncommitted changes are not shipped) to every worker
as ~/fwm/code, creates ~/fwm/venv with Python V (uv) if missing, installs
  pip install -r requirements.txt 'jax[tpu]==<requirements.txt's jax pin>'
  pip install -e .
  --ref REF                 git revision to ship [FWM_REF, default HEAD]
  --python-version V        [FWM_PYTHON_VERSION, default 3.11]
  --ssh-arg ARG             passed to gcloud scp/ssh as is (repeatable), e.g. --ssh-arg=--tunnel-through-iap
EOF
}

run_flags_help() {
  cat <<EOF
  --config FILE[:ARG]       experiments/NAME.py[:variant], relative to the repo root [FWM_CONFIG] (required)
  --workdir DIR             where checkpoints go, e.g. gs://BUCKET/DIR; must be shared by all
                            workers and outlive the VM for resumption [FWM_WORKDIR] (required)
  --override a.b=v          passed as --config.a.b=v (repeatable)
  --fwm-command CMD         fwm subcommand [FWM_COMMAND, default train], e.g. pipeline
  --fwm-arg ARG             extra fwm argument, as is (repeatable); {row} is replaced by the row name in sweeps
  --done-path gs://...      the run's completion marker [FWM_DONE_PATH]
  --mark-done               after the job exits 0, every worker writes --done-path (for commands that
                            write no marker of their own; a job stopped by SIGTERM dies with its
                            shell, so preemption never writes it)
  --ssh-arg ARG             passed to gcloud ssh as is (repeatable)
EOF
}

usage_run() {
  cat <<EOF
usage: $PROG run --name NAME --zone ZONE --config FILE[:ARG] --workdir DIR [--override a.b=v]...
                 [--fwm-command CMD] [--fwm-arg ARG]... [--done-path gs://... --mark-done] [--dry-run]

On every worker: stops a running fwm job (SIGTERM to its process group and to any stray fwm
process, waits up to 5 minutes for the checkpoint save, then SIGKILL), then starts, with nohup
in its own session so the ssh can drop,
  FWM_DISTRIBUTED=1 python -m fwm.cli CMD --config FILE --config.a.b=v ... --workdir DIR
appending its output to ~/fwm/logs/run.log. The job resumes from DIR's latest checkpoint.
$(run_flags_help)
EOF
}

usage_sweep() {
  cat <<EOF
usage: $PROG sweep --name NAME --zone ZONE --config FILE --workdir DIR [ROW...] [--rows-file FILE]
                   [--tpu-per-row [--create]] [run flags] [--dry-run]

One fwm job per row, row ROW writing to DIR/ROW. Rows come as arguments and/or from --rows-file,
a plain text file with one row per line: the row name, then optional extra fwm arguments for that
row separated by whitespace (no quoting), e.g.
  lr_small  --config.optimizer.lr=1e-4
  lr_large  --config.optimizer.lr=1e-3
Blank lines and lines starting with # are skipped. Row names: letters, digits, '_', '.', '-'.
  (default)                 sequential on the one TPU NAME: a single job runs the rows one after
                            another and stops at the first failing row; rerunning the sweep resumes
                            each row from its checkpoint (finished rows end at once)
  --tpu-per-row             row ROW runs on its own TPU NAME-row (the row name lower-cased; TPU
                            names allow only a-z, 0-9 and '-'), all rows at once
  --create                  with --tpu-per-row: create and set up each TPU first (one after another)
  --rows-file FILE          rows as above
$(run_flags_help)
  {row} in --fwm-arg is replaced by the row name. A sequential sweep has one --done-path, written
  (with --mark-done) after the last row; with --tpu-per-row each row writes its own, so --done-path
  must contain {row}, e.g. gs://BUCKET/DIR/{row}/DONE.
EOF
}

usage_status() {
  cat <<EOF
usage: $PROG status --name NAME --zone ZONE [--project P] [--ssh-arg ARG]... [--dry-run]

Prints the TPU's state and accelerator type, then on every worker the running fwm process (if
any) and the last 3 lines of ~/fwm/logs/run.log.
EOF
}

usage_logs() {
  cat <<EOF
usage: $PROG logs --name NAME --zone ZONE [--worker N|all] [--lines N] [--follow] [--dry-run]

Tails ~/fwm/logs/run.log on worker 0 (--worker N, or all).
  --lines N                 default 100
  --follow                  keep following (tail -F)
EOF
}

usage_babysit() {
  cat <<EOF
usage: $PROG babysit --name NAME --zone ZONE --config FILE --workdir DIR --done-path gs://...
                     [run or sweep flags and rows] [--max-restarts N] [--poll-seconds S]
                     [--delete-when-done] [--dry-run]

Every S seconds: if --done-path exists (gcloud storage ls), exit 0. Otherwise read the TPU's
state (gcloud ... describe --format='value(state)'); if it is PREEMPTED, TERMINATED or the TPU is
gone, delete it, create it again (create's flags), set it up (setup's flags; the commit is fixed
when babysit starts) and rerun the same job (run's flags; with rows, the sequential sweep), which
resumes from the latest checkpoint in the workdir. A failed create/setup/run is retried on the
next poll. Each recovery attempt counts against --max-restarts; past it, babysit exits 1.
Start it after "run" (or "sweep"), e.g. under nohup or tmux on a machine that stays up. It does
not notice a job that crashed on a healthy TPU (see "status"). For sweep --tpu-per-row, babysit
each TPU NAME-row with --workdir DIR/ROW and that row's --done-path.
  --done-path gs://...      the completion marker (required), e.g. the pipeline's, or DIR/DONE with --mark-done
  --max-restarts N          [FWM_MAX_RESTARTS, default 10]
  --poll-seconds S          [FWM_POLL_SECONDS, default 120]
  --delete-when-done        delete the TPU once the marker exists
In --dry-run it prints one poll (marker check, describe) and the recovery it would run.
EOF
}

usage_delete() {
  cat <<EOF
usage: $PROG delete --name NAME --zone ZONE [--project P] [--dry-run]

Deletes the TPU VM without a prompt (gcloud ... delete --quiet).
EOF
}

# ---- helpers ---------------------------------------------------------------------------------
die() { echo "$PROG: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

# A usage error: the message, the (sub)command's usage, exit 2.
die_usage() {
  echo "$PROG: $1" >&2
  if [[ -n "${SUBCMD:-}" ]]; then "usage_$SUBCMD" >&2; else usage >&2; fi
  exit 2
}

# The command line as bash would read it back: printf %q for every word.
quote_words() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(printf '%q' "$word")"; done
  printf '%s' "$out"
}

# One word in single quotes (for the commands that run on the workers: readable when %q-quoted again).
squote() {
  local quote="'" escaped="'\\''"
  printf "'%s'" "${1//$quote/$escaped}"
}

# Runs a command, or in --dry-run prints it (one line, %q quoted).
run_cmd() {
  if (( DRY_RUN )); then
    printf '%s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

require() {  # require FLAG VALUE
  [[ -n "$2" ]] || die_usage "$SUBCMD: missing required flag $1"
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# gcloud flags shared by every tpu-vm command.
tpu_flags() {
  TPU_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then TPU_FLAGS+=("--project=$PROJECT"); fi
}

project_flags() {
  PROJECT_FLAGS=()
  if [[ -n "$PROJECT" ]]; then PROJECT_FLAGS+=("--project=$PROJECT"); fi
}

# ssh NAME --worker=W --command=CMD
tpu_ssh() {
  local name=$1 worker=$2 command=$3
  tpu_flags
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" "--worker=$worker" \
    "${SSH_ARGS[@]}" "--command=$command"
}

# ---- argument parsing ------------------------------------------------------------------------
parse_flags() {
  local flag value has_value
  while (( $# )); do
    flag=$1; shift
    has_value=0
    if [[ "$flag" == --*=* ]]; then value=${flag#*=}; flag=${flag%%=*}; has_value=1; fi
    case "$flag" in
      --name|--zone|--project|--accelerator-type|--runtime-version|--config|--workdir|--override|\
      --fwm-command|--fwm-arg|--done-path|--max-restarts|--poll-seconds|--python-version|--ref|\
      --rows-file|--ssh-arg|--create-arg|--lines|--worker)
        if (( ! has_value )); then
          (( $# )) || die_usage "$SUBCMD: flag $flag needs a value"
          value=$1; shift
        fi ;;
      --spot|--dry-run|--mark-done|--tpu-per-row|--create|--delete-when-done|--follow|-h|--help)
        (( ! has_value )) || die_usage "$SUBCMD: flag $flag takes no value" ;;
      --) ROWS+=("$@"); break ;;
      -*) die_usage "$SUBCMD: unknown flag '$flag'" ;;
      *)
        [[ "$SUBCMD" == sweep || "$SUBCMD" == babysit ]] || die_usage "$SUBCMD: unexpected argument '$flag'"
        ROWS+=("$flag"); continue ;;
    esac
    case "$flag" in
      --name) NAME=$value ;;
      --zone) ZONE=$value ;;
      --project) PROJECT=$value ;;
      --accelerator-type) ACCELERATOR_TYPE=$value ;;
      --runtime-version) RUNTIME_VERSION=$value ;;
      --config) CONFIG=$value ;;
      --workdir) WORKDIR=$value ;;
      --override)
        [[ "$value" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*= ]] \
          || die_usage "$SUBCMD: --override wants KEY.PATH=VALUE (passed as --config.KEY.PATH=VALUE), got '$value'"
        OVERRIDES+=("$value") ;;
      --fwm-command) FWM_CMD=$value ;;
      --fwm-arg) FWM_ARGS+=("$value") ;;
      --done-path) DONE_PATH=$value ;;
      --max-restarts) MAX_RESTARTS=$value ;;
      --poll-seconds) POLL_SECONDS=$value ;;
      --python-version) PYTHON_VERSION=$value ;;
      --ref) REF=$value ;;
      --rows-file) ROWS_FILE=$value ;;
      --ssh-arg) SSH_ARGS+=("$value") ;;
      --create-arg) CREATE_ARGS+=("$value") ;;
      --lines) LOG_LINES=$value ;;
      --worker) WORKER=$value ;;
      --spot) SPOT=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --mark-done) MARK_DONE=1 ;;
      --tpu-per-row) TPU_PER_ROW=1 ;;
      --create) CREATE_ROWS=1 ;;
      --delete-when-done) DELETE_WHEN_DONE=1 ;;
      --follow) FOLLOW=1 ;;
      -h|--help) "usage_$SUBCMD"; exit 0 ;;
    esac
  done
  case "$SPOT" in 1|true|yes) SPOT=1 ;; 0|false|no|"") SPOT=0 ;; *) die_usage "FWM_SPOT must be 0 or 1, got '$SPOT'" ;; esac
  is_uint "$MAX_RESTARTS" || die_usage "$SUBCMD: --max-restarts wants a whole number, got '$MAX_RESTARTS'"
  is_uint "$POLL_SECONDS" || die_usage "$SUBCMD: --poll-seconds wants a whole number, got '$POLL_SECONDS'"
  is_uint "$LOG_LINES" || die_usage "$SUBCMD: --lines wants a whole number, got '$LOG_LINES'"
  [[ "$WORKER" == all ]] || is_uint "$WORKER" || die_usage "$SUBCMD: --worker wants a number or 'all', got '$WORKER'"
  [[ "$FWM_CMD" =~ ^[a-z_]+$ ]] || die_usage "$SUBCMD: --fwm-command wants an fwm subcommand name, got '$FWM_CMD'"
  [[ "$PYTHON_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]] || die_usage "$SUBCMD: --python-version wants e.g. 3.11, got '$PYTHON_VERSION'"
  if (( TPU_PER_ROW )) && [[ "$SUBCMD" != sweep ]]; then die_usage "$SUBCMD: --tpu-per-row is a sweep flag"; fi
  if (( CREATE_ROWS && ! TPU_PER_ROW )); then die_usage "$SUBCMD: --create only goes with sweep --tpu-per-row"; fi
  if (( MARK_DONE )) && [[ -z "$DONE_PATH" ]]; then die_usage "$SUBCMD: --mark-done needs --done-path"; fi
  if (( ${#ROWS[@]} )) && [[ "$SUBCMD" != sweep && "$SUBCMD" != babysit ]]; then
    die_usage "$SUBCMD: unexpected argument '${ROWS[0]}'"
  fi
  if [[ -n "$DONE_PATH" && "$DONE_PATH" != gs://* ]]; then
    die_usage "$SUBCMD: --done-path must be a gs:// path (checked from this machine), got '$DONE_PATH'"
  fi
}

require_tpu() {
  require --name "$NAME"
  require --zone "$ZONE"
}

require_job() {
  require --config "$CONFIG"
  require --workdir "$WORKDIR"
  if [[ "$WORKDIR" != gs://* ]]; then
    note "warning: --workdir '$WORKDIR' is not a gs:// path: workers will not share it and it does not survive a preemption"
  fi
  # The config is read on the workers from the shipped tree: check it is there (FILE[:ARG]).
  if [[ "$CONFIG" != /* && ! -f "$REPO_ROOT/${CONFIG%%:*}" ]]; then
    note "warning: --config file '${CONFIG%%:*}' is not in $REPO_ROOT; it is resolved in ~/fwm/code on the workers"
  fi
}

read_rows() {
  local line name rest i
  # Rows given as arguments carry no extra arguments.
  for (( i = 0; i < ${#ROWS[@]}; i++ )); do ROW_EXTRA+=(""); done
  if [[ -n "$ROWS_FILE" ]]; then
    [[ -f "$ROWS_FILE" ]] || die_usage "$SUBCMD: --rows-file '$ROWS_FILE' does not exist"
    while IFS= read -r line || [[ -n "$line" ]]; do
      [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
      read -r name rest <<<"$line"
      ROWS+=("$name"); ROW_EXTRA+=("${rest:-}")
    done <"$ROWS_FILE"
  fi
  for name in "${ROWS[@]}"; do
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] \
      || die_usage "$SUBCMD: row name '$name' must be letters, digits, '_', '.', '-'"
  done
}

# ---- the remote commands ---------------------------------------------------------------------
# The command line of one fwm job (run in ~/fwm/code with FWM_DISTRIBUTED=1 exported), for
# workdir $1, row name $2 ('' outside sweeps) and extra arguments $3 (whitespace-separated).
job_words() {
  local workdir=$1 row=$2 extra=$3 override arg
  local -a extra_words=()
  JOB_WORDS=(../venv/bin/python -m fwm.cli "$FWM_CMD" --config "$CONFIG")
  for override in "${OVERRIDES[@]}"; do JOB_WORDS+=("--config.$override"); done
  JOB_WORDS+=(--workdir "$workdir")
  for arg in "${FWM_ARGS[@]}"; do JOB_WORDS+=("${arg//\{row\}/$row}"); done
  if [[ -n "$extra" ]]; then read -ra extra_words <<<"$extra"; JOB_WORDS+=("${extra_words[@]}"); fi
}

# The script the job's shell runs: $1 = 'single' or 'rows'; for 'single' $2 = the workdir.
job_script() {
  local mode=$1 script i row done_path
  script="set -euo pipefail ; export FWM_DISTRIBUTED=1"
  if [[ "$mode" == single ]]; then
    job_words "$2" "${JOB_ROW:-}" "${JOB_EXTRA:-}"
    script+=" ; echo \"=== fwm job start \$(date -u +%FT%TZ) on \$(hostname)\" ; $(quote_words "${JOB_WORDS[@]}")"
    done_path=${DONE_PATH//\{row\}/${JOB_ROW:-}}
  else
    for (( i = 0; i < ${#ROWS[@]}; i++ )); do
      row=${ROWS[i]}
      job_words "${WORKDIR%/}/$row" "$row" "${ROW_EXTRA[i]}"
      script+=" ; echo \"=== fwm sweep row $row start \$(date -u +%FT%TZ) on \$(hostname)\""
      script+=" ; $(quote_words "${JOB_WORDS[@]}")"
    done
    done_path=$DONE_PATH
  fi
  if (( MARK_DONE )); then
    script+=" ; date -u +%FT%TZ | gcloud storage cp - $(printf '%q' "$done_path")"
  fi
  script+=" ; echo \"=== fwm job finished \$(date -u +%FT%TZ)\""
  printf '%s' "$script"
}

# Stops the job started by a previous run (its process group) and any stray fwm python process,
# waits up to 5 minutes for them to save and exit, then kills what is left. Tolerates none running.
stop_stale_script() {
  local pat
  pat=$(squote "$STALE_PATTERN")
  printf '%s' "if [ -f ../logs/job.pgid ] ; then kill -TERM -- \"-\$(cat ../logs/job.pgid)\" 2>/dev/null || true ; fi ;"
  printf '%s' " pkill -TERM -f $pat || true ;"
  printf '%s' " for _ in \$(seq 300) ; do pgrep -f $pat >/dev/null || break ; sleep 1 ; done ;"
  printf '%s' " pkill -KILL -f $pat || true"
}

# The whole `run` command for the workers: stop stale, start the job detached, log, remember it.
run_remote_command() {
  local script
  script=$(job_script "$@")
  printf '%s' "{ cd fwm/code || { echo \"fwm is not set up on \$(hostname): run $PROG setup\" >&2 ; exit 1 ; } ; } &&"
  printf '%s' " mkdir -p ../logs && { $(stop_stale_script) ; } &&"
  printf '%s' " { setsid nohup bash -c $(squote "$script") fwm-job >>../logs/run.log 2>&1 </dev/null &"
  printf '%s' " echo \$! >../logs/job.pgid ; } && echo \"fwm job started on \$(hostname), log ~/fwm/logs/run.log\""
}

setup_remote_command() {
  local jax_spec="jax[tpu]==$JAX_PIN"
  printf '%s' "set -euo pipefail ; mkdir -p fwm && cd fwm && rm -rf code.new && mkdir code.new"
  printf '%s' " && tar -xzf ../fwm-code.tar.gz -C code.new && rm -rf code && mv code.new code"
  printf '%s' " && export PATH=\"\$HOME/.local/bin:\$PATH\""
  printf '%s' " && { command -v uv >/dev/null || curl -LsSf $UV_INSTALLER | sh ; }"
  printf '%s' " && { [ -x venv/bin/python ] || uv venv --seed --python $(printf '%q' "$PYTHON_VERSION") venv ; }"
  printf '%s' " && cd code && ../venv/bin/python -m pip install --quiet -r requirements.txt $(printf '%q' "$jax_spec")"
  printf '%s' " && ../venv/bin/python -m pip install --quiet -e ."
  printf '%s' " && ../venv/bin/python -c 'import fwm, jax; print(\"fwm ready, jax\", jax.__version__)'"
}

# ---- subcommands -----------------------------------------------------------------------------
resolve_commit() {
  SHIP_COMMIT=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}") \
    || die "$REF is not a commit of the git repository $REPO_ROOT (setup ships the committed tree)"
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    note "warning: uncommitted changes in $REPO_ROOT are not shipped (setup ships $REF = ${SHIP_COMMIT:0:12})"
  fi
  # The TPU build of the very jax version requirements.txt pins (in the shipped commit).
  JAX_PIN=$(git -C "$REPO_ROOT" show "$SHIP_COMMIT:requirements.txt" \
            | sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' | head -n 1)
  [[ -n "$JAX_PIN" ]] || die "no 'jax==VERSION' line in requirements.txt at $REF (${SHIP_COMMIT:0:12})"
}

# The runtime version: the flag, or the default image for the accelerator type.
resolve_runtime() {
  if [[ -n "$RUNTIME_VERSION" ]]; then return; fi
  case "$ACCELERATOR_TYPE" in
    v4-*|v5p-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    *) die_usage "$SUBCMD: no default --runtime-version for accelerator type '$ACCELERATOR_TYPE'; pass --runtime-version" ;;
  esac
}

# These return the failing command's status, so babysit can retry (errexit is off inside `||`).
do_create() {  # do_create NAME (needs resolve_runtime)
  local -a args=(gcloud compute tpus tpu-vm create "$1" "--zone=$ZONE" "--accelerator-type=$ACCELERATOR_TYPE"
                 "--version=$RUNTIME_VERSION")
  if (( SPOT )); then args+=(--spot); fi
  if [[ -n "$PROJECT" ]]; then args+=("--project=$PROJECT"); fi
  run_cmd "${args[@]}" "${CREATE_ARGS[@]}"
}

do_setup() {  # do_setup NAME (needs resolve_commit)
  local tarball="${TMPDIR:-/tmp}/fwm-code-$SHIP_COMMIT.tar.gz" remote
  remote=$(setup_remote_command) || return
  tpu_flags
  # Archive once per commit (sweep --tpu-per-row --create, babysit), again if the file went away.
  if [[ "${ARCHIVED:-}" != "$tarball" ]] || { (( ! DRY_RUN )) && [[ ! -f "$tarball" ]]; }; then
    run_cmd git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$SHIP_COMMIT" || return
    ARCHIVED=$tarball
  fi
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$1:fwm-code.tar.gz" "${TPU_FLAGS[@]}" --worker=all \
    "${SSH_ARGS[@]}" || return
  tpu_ssh "$1" all "$remote"
}

do_delete() {  # do_delete NAME
  tpu_flags
  run_cmd gcloud compute tpus tpu-vm delete "$1" "${TPU_FLAGS[@]}" --quiet
}

# Starts the job on NAME: the sequential sweep when rows are given, else the single run.
do_launch() {  # do_launch NAME
  local remote
  if (( ${#ROWS[@]} )); then
    remote=$(run_remote_command rows) || return
  else
    remote=$(run_remote_command single "$WORKDIR") || return
  fi
  tpu_ssh "$1" all "$remote"
}

cmd_create() { require_tpu; resolve_runtime; do_create "$NAME"; }
cmd_setup() { require_tpu; resolve_commit; do_setup "$NAME"; }
cmd_delete() { require_tpu; do_delete "$NAME"; }

cmd_run() {
  require_tpu; require_job
  do_launch "$NAME"
}

cmd_sweep() {
  local i row tpu remote
  require_tpu; require_job; read_rows
  (( ${#ROWS[@]} )) || die_usage "sweep: no rows; give row names as arguments or --rows-file FILE"
  if (( ! TPU_PER_ROW )); then
    if [[ "$DONE_PATH" == *'{row}'* ]]; then
      die_usage "sweep: a sequential sweep has one --done-path, written after the last row; drop {row}"
    fi
    do_launch "$NAME"
    return
  fi
  if (( CREATE_ROWS )); then resolve_runtime; resolve_commit; fi
  if (( MARK_DONE )) && [[ "$DONE_PATH" != *'{row}'* ]]; then
    die_usage "sweep: with --tpu-per-row, --done-path must contain {row} (one marker per row)"
  fi
  for (( i = 0; i < ${#ROWS[@]}; i++ )); do
    row=${ROWS[i]}
    tpu="$NAME-${row,,}"
    [[ "$tpu" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
      || die_usage "sweep: TPU name '$tpu' for row '$row' is not a valid TPU name (lower case letters, digits, '-')"
    if (( CREATE_ROWS )); then do_create "$tpu"; do_setup "$tpu"; fi
    JOB_ROW=$row JOB_EXTRA=${ROW_EXTRA[i]}
    remote=$(run_remote_command single "${WORKDIR%/}/$row")
    tpu_ssh "$tpu" all "$remote"
  done
}

cmd_status() {
  require_tpu
  tpu_flags
  run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${TPU_FLAGS[@]}" '--format=value(state,acceleratorType)'
  local pat
  pat=$(squote "$STALE_PATTERN")
  tpu_ssh "$NAME" all "echo \"== \$(hostname)\" ; pgrep -af $pat || echo 'no fwm process' ; tail -n 3 fwm/logs/run.log 2>/dev/null || echo 'no log yet'"
}

cmd_logs() {
  require_tpu
  local follow=""
  if (( FOLLOW )); then follow=" -F"; fi
  tpu_ssh "$NAME" "$WORKER" "tail -n $LOG_LINES$follow fwm/logs/run.log"
}

# Whether the completion marker exists (in --dry-run: prints the check and answers no).
done_exists() {
  project_flags
  if (( DRY_RUN )); then run_cmd gcloud storage ls "${PROJECT_FLAGS[@]}" "$DONE_PATH"; return 1; fi
  gcloud storage ls "${PROJECT_FLAGS[@]}" "$DONE_PATH" >/dev/null 2>&1
}

# Sets TPU_STATE to the TPU's state, MISSING when gcloud says NOT_FOUND, UNKNOWN on other errors.
read_state() {
  local err
  tpu_flags
  if (( DRY_RUN )); then
    run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${TPU_FLAGS[@]}" '--format=value(state)'
    TPU_STATE=DRY_RUN; return
  fi
  err=$(mktemp)
  if TPU_STATE=$(gcloud compute tpus tpu-vm describe "$NAME" "${TPU_FLAGS[@]}" '--format=value(state)' 2>"$err"); then
    TPU_STATE=${TPU_STATE:-UNKNOWN}
  elif grep -q -e NOT_FOUND -e 'not found' "$err"; then
    TPU_STATE=MISSING
  else
    note "describe failed: $(tr '\n' ' ' <"$err")"
    TPU_STATE=UNKNOWN
  fi
  rm -f "$err"
}

# One recovery attempt from step $1 (recreate | setup | launch); sets PENDING to the step that
# failed, or '' when the job was started again.
recover() {
  local step=$1
  if [[ "$step" == recreate ]]; then
    if [[ "$TPU_STATE" != MISSING ]]; then do_delete "$NAME" || { PENDING=recreate; return 1; }; fi
    do_create "$NAME" || { PENDING=recreate; return 1; }
    step=setup
  fi
  if [[ "$step" == setup ]]; then do_setup "$NAME" || { PENDING=setup; return 1; }; fi
  do_launch "$NAME" || { PENDING=launch; return 1; }
  PENDING=""
}

cmd_babysit() {
  require_tpu; require_job; read_rows
  require --done-path "$DONE_PATH"
  resolve_runtime; resolve_commit
  local restarts=0
  PENDING=""
  while true; do
    if done_exists; then
      note "$DONE_PATH exists: the run is complete"
      if (( DELETE_WHEN_DONE )); then do_delete "$NAME"; fi
      return 0
    fi
    read_state
    if (( DRY_RUN )); then
      if (( MAX_RESTARTS == 0 )); then
        note "dry run: with --max-restarts 0 a preempted or missing TPU ends babysit with exit 1"
      else
        note "dry run: if the state is PREEMPTED or TERMINATED (or the TPU is missing), babysit runs:"
        TPU_STATE=PREEMPTED
        recover recreate
      fi
      note "dry run: then polls again in ${POLL_SECONDS}s"
      return 0
    fi
    local step=""
    case "$TPU_STATE" in
      PREEMPTED|TERMINATED|MISSING) step=recreate ;;
      READY) step=$PENDING ;;
      *) ;;  # CREATING, STARTING, RESTARTING, REPAIRING, UNKNOWN, ...: wait
    esac
    if [[ -n "$step" ]]; then
      if (( restarts >= MAX_RESTARTS )); then
        die "TPU $NAME is $TPU_STATE and --max-restarts $MAX_RESTARTS is used up"
      fi
      restarts=$(( restarts + 1 ))
      note "$(date -u +%FT%TZ) TPU $NAME is $TPU_STATE: recovery $restarts/$MAX_RESTARTS from step '$step'"
      if recover "$step"; then
        note "job started again on $NAME"
      else
        note "recovery failed at step '$PENDING'; retrying at the next poll"
      fi
    else
      note "$(date -u +%FT%TZ) TPU $NAME is $TPU_STATE"
    fi
    sleep "$POLL_SECONDS"
  done
}

main() {
  SUBCMD=""
  (( $# )) || die_usage "missing subcommand (one of: $SUBCOMMANDS)"
  case "$1" in
    -h|--help|help) usage; exit 0 ;;
    create|setup|run|sweep|status|logs|babysit|delete) SUBCMD=$1; shift ;;
    *) die_usage "unknown subcommand '$1' (one of: $SUBCOMMANDS)" ;;
  esac
  parse_flags "$@"
  "cmd_$SUBCMD"
}

main "$@"
