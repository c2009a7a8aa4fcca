#!/usr/bin/env bash
# adm_jax on a Cloud TPU pod slice, left to run by itself (docs/tpu.md is the user's page).
#
#   export ZONE=us-central2-b BUCKET=gs://my-bucket TPU_NAME=adm-jax TPU_TYPE=v4-32 [SPOT=1]
#   launch/tpu_pod.sh up CONFIG [adm_jax.main flags]   create if needed, install, start
#   launch/tpu_pod.sh status | logs [LINES] | stop | delete
#   launch/tpu_pod.sh create | install | start CONFIG [flags]   the steps of `up`, one by one
#
# `up` again after a preemption deletes and recreates the slice, installs and starts the same
# command; training resumes from the workdir's last checkpoint. The run is detached from the
# ssh session (setsid nohup): closing the laptop does not stop it.
#
# Settings (environment): ZONE (required); BUCKET=gs://NAME (up, start); TPU_NAME (adm-jax);
# TPU_TYPE (v4-32); RUNTIME (tpu-ubuntu2204-base); SPOT=1 (spot slice, ~1/3 of the price, can
# be preempted); QUEUED=1 (ask through queued resources: waits for capacity instead of failing);
# WORKDIR (default $BUCKET/adm_jax/<config name>); SHIP_UNCOMMITTED=1 (ship the working tree
# with its uncommitted changes instead of refusing); STOP_TIMEOUT (seconds `stop` waits for
# the checkpoint, 600); POLL_SECONDS (between queued-resource checks, 60).
#
# Every worker runs the same `python -m adm_jax.main --config=CONFIG --workdir=WORKDIR ...`
# from ~/adm_jax (this checkout, as shipped) in the venv ~/adm_jax_venv that
# `bash launch/install.sh tpu` makes from requirements.txt; jax.distributed.initialize() finds
# the other workers by itself. Logs: ~/adm_jax_run/ on each worker (`logs`), copied to
# WORKDIR/logs/ when the run ends.
set -euo pipefail

PROG=tpu_pod.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU_NAME=${TPU_NAME:-adm-jax}
TPU_TYPE=${TPU_TYPE:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
STOP_TIMEOUT=${STOP_TIMEOUT:-600}
POLL_SECONDS=${POLL_SECONDS:-60}
# On each worker (paths under its HOME).
W_CODE=adm_jax
W_VENV=adm_jax_venv
W_RUN=adm_jax_run
W_ARCHIVE=adm_jax.tar.gz

# Approximate public list prices, USD per chip-hour (on-demand, spot), us-central regions,
# as of 2025-06; check https://cloud.google.com/tpu/pricing for your region and date.
PRICES_DATE=2025-06
price_per_chip_hour() { # GENERATION on-demand|spot
  case "$1:$2" in
    v4:on-demand) echo 3.22 ;; v4:spot) echo 0.97 ;;
    v5litepod:on-demand) echo 1.20 ;; v5litepod:spot) echo 0.48 ;;
    v5p:on-demand) echo 4.20 ;; v5p:spot) echo 1.68 ;;
    v6e:on-demand) echo 2.70 ;; v6e:spot) echo 1.08 ;;
    *) echo "" ;;
  esac
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}
say() { echo "[$PROG] $*"; }

# ------------------------------------------------------------------------------------------
# Worker side: `bash launch/tpu_pod.sh _worker VERB ...`, run by ssh in each worker's ~/adm_jax.

w_alive() { [ -s "$HOME/$W_RUN/pid" ] && kill -0 "$(cat "$HOME/$W_RUN/pid")" 2>/dev/null; }

w_last_line() {
  local log="$HOME/$W_RUN/latest.log"
  [ -f "$log" ] && tail -n 1 "$log" | cut -c1-200 || true
}

worker_side() {
  local verb=${1:-}
  shift || true
  local run_dir="$HOME/$W_RUN"
  case "$verb" in
    install)
      bash launch/install.sh tpu "$HOME/$W_VENV"
      ;;
    start) # INDEX STAMP WORKDIR MAIN_ARGS...
      local index=$1 stamp=$2 workdir=$3
      shift 3
      if w_alive; then
        echo "already running (pid $(cat "$run_dir/pid")); stop it first: launch/tpu_pod.sh stop"
        exit 3
      fi
      mkdir -p "$run_dir"
      local log="$run_dir/run-$stamp.log"
      rm -f "$run_dir/pid" "$run_dir/runner.pid" "$run_dir/exit_code"
      ln -sfn "$log" "$run_dir/latest.log"
      # A new session (setsid) with no terminal and no tie to this ssh connection (nohup,
      # stdin/stdout/stderr redirected): the run outlives the ssh session.
      setsid nohup bash launch/tpu_pod.sh _worker run "$index" "$stamp" "$workdir" "$@" \
        >"$log" 2>&1 </dev/null &
      for _ in $(seq 100); do
        [ -s "$run_dir/pid" ] && break
        sleep 0.1
      done
      echo "started pid $(cat "$run_dir/pid" 2>/dev/null || echo '?'), log ~/$W_RUN/run-$stamp.log"
      ;;
    run) # INDEX STAMP WORKDIR MAIN_ARGS... (inside the detached session)
      local index=$1 stamp=$2 workdir=$3
      shift 3
      echo $$ >"$run_dir/runner.pid"
      echo "[$PROG] $(date -u +%FT%TZ) worker $index: python -m adm_jax.main $*"
      PYTHONUNBUFFERED=1 "$HOME/$W_VENV/bin/python" -m adm_jax.main "$@" &
      echo $! >"$run_dir/pid"
      local code=0
      wait $! || code=$?
      echo "$code" >"$run_dir/exit_code"
      echo "[$PROG] $(date -u +%FT%TZ) worker $index: adm_jax.main exited with code $code"
      # The worker's disk goes with the slice: keep its log beside the checkpoints.
      "$HOME/$W_VENV/bin/python" - "$run_dir/run-$stamp.log" \
        "$workdir/logs/$stamp/worker-$index.log" <<'EOF' || echo "[$PROG] could not copy the log"
import sys
from etils import epath
target = epath.Path(sys.argv[2])
target.parent.mkdir(parents=True, exist_ok=True)
target.write_text(open(sys.argv[1], errors="replace").read())
EOF
      ;;
    alive)
      if w_alive; then echo alive; else echo idle; fi
      ;;
    status)
      if w_alive; then
        echo "running (pid $(cat "$run_dir/pid")): $(w_last_line)"
      elif [ -f "$run_dir/exit_code" ]; then
        echo "exited with code $(cat "$run_dir/exit_code"): $(w_last_line)"
      elif [ -f "$run_dir/latest.log" ]; then
        echo "not running (killed, no exit code): $(w_last_line)"
      else
        echo "no run started on this worker"
      fi
      ;;
    logs) # LINES
      if [ -f "$run_dir/latest.log" ]; then
        echo "== ~/$W_RUN/$(basename "$(readlink "$run_dir/latest.log")")"
        tail -n "$1" "$run_dir/latest.log"
      else
        echo "no log: no run started on this worker"
      fi
      ;;
    stop) # TIMEOUT
      if ! w_alive; then
        echo "not running"
        exit 0
      fi
      local pid
      pid=$(cat "$run_dir/pid")
      # SIGTERM: adm_jax saves a checkpoint at a step all processes agree on, then exits.
      kill -TERM "$pid"
      for _ in $(seq "$1"); do
        w_alive || break
        sleep 1
      done
      if w_alive; then
        echo "still running $1 s after SIGTERM (pid $pid): rerun stop to wait longer"
        exit 1
      fi
      # The runner then writes the exit code and copies the log to the bucket.
      for _ in $(seq 120); do
        kill -0 "$(cat "$run_dir/runner.pid")" 2>/dev/null || break
        sleep 0.5
      done
      echo "stopped (exit code $(cat "$run_dir/exit_code" 2>/dev/null || echo '?')): $(w_last_line)"
      ;;
    *)
      echo "$PROG _worker: unknown verb '$verb'" >&2
      exit 2
      ;;
  esac
}

# ------------------------------------------------------------------------------------------
# Local side: checks, the slice, the workers.

check_gcloud() {
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found: install the Google Cloud CLI (cloud.google.com/sdk/docs/install), then gcloud auth login"
}

check_zone() {
  [ -n "${ZONE:-}" ] || die "ZONE is not set: export ZONE=us-central2-b (a zone where your project has TPU quota for $TPU_TYPE)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "ZONE=$ZONE: expected a Compute Engine zone such as us-central2-b or europe-west4-a"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "TPU_NAME=$TPU_NAME: expected lower-case letters, digits and '-', starting with a letter"
  [[ $TPU_TYPE =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] ||
    die "TPU_TYPE=$TPU_TYPE: expected an accelerator type such as v4-32, v5p-16, v5litepod-16 or v6e-16"
  check_gcloud
}

check_project() {
  local project
  project=$(gcloud config get-value project 2>/dev/null || true)
  [ -n "$project" ] || die "no gcloud project set: gcloud config set project PROJECT_ID"
}

check_bucket() {
  [ -n "${BUCKET:-}" ] ||
    die "BUCKET is not set: export BUCKET=gs://NAME (checkpoints and logs live there; make one with: gcloud storage buckets create gs://NAME --location=REGION)"
  [[ $BUCKET =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/?$ ]] ||
    die "BUCKET=$BUCKET: expected gs://NAME, a bucket name of lower-case letters, digits, '.', '_', '-' (no path)"
  BUCKET=${BUCKET%/}
  local err
  if ! err=$(gcloud storage buckets describe "$BUCKET" --format='value(name)' 2>&1 >/dev/null); then
    die "BUCKET=$BUCKET: not found or not readable ($(echo "$err" | grep -v '^\s*$' | tail -n 1))"
  fi
}

# The run's config and flags: CONFIG must be a file of this checkout (the workers run from a
# copy of it), the workdir comes from WORKDIR.
RUN_ARGS=()
check_run_args() {
  [ $# -ge 1 ] || die "usage: $PROG up|start CONFIG [adm_jax.main flags], e.g. configs/imagenet64.py"
  local config=$1 file
  shift
  file=${config%%:*}
  case "$file" in "$REPO"/*) config=${config#"$REPO"/} file=${file#"$REPO"/} ;; esac
  [[ $file != /* && $file != *..* && -f "$REPO/$file" ]] ||
    die "CONFIG=$config: expected a config file of this checkout, e.g. configs/imagenet64.py"
  local arg
  for arg in "$@"; do
    case "$arg" in
      --workdir | --workdir=*) die "$arg: set WORKDIR instead (default \$BUCKET/adm_jax/<config name>)" ;;
      --config | --config=*) die "$arg: give the config as the first argument" ;;
      --*) ;;
      *) die "$arg: expected adm_jax.main flags (--name=value) after CONFIG" ;;
    esac
  done
  local name
  name=$(basename "$file" .py)
  [[ $config == *:* ]] && name="${name}_${config#*:}"
  WORKDIR=${WORKDIR:-$BUCKET/adm_jax/$name}
  [[ $WORKDIR == gs://* ]] ||
    die "WORKDIR=$WORKDIR: expected a gs:// path (the workers share no disk, and the slice's disks go with it)"
  RUN_ARGS=("--config=$config" "--workdir=$WORKDIR" "$@")
}

# The code to ship: this checkout, refused with uncommitted changes unless SHIP_UNCOMMITTED=1.
ARCHIVE=""
make_archive() {
  git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO is not a git checkout: the code shipped to the workers is the checkout's files"
  local dirty
  dirty=$(git -C "$REPO" status --porcelain --untracked-files=normal | cut -c4-)
  if [ -n "$dirty" ] && [ "${SHIP_UNCOMMITTED:-0}" != 1 ]; then
    local count list
    count=$(echo "$dirty" | wc -l)
    list=$(echo "$dirty" | head -n 8 | paste -sd ' ' -)
    [ "$count" -gt 8 ] && list="$list and $((count - 8)) more"
    die "uncommitted changes ($count): $list; commit them (the workers run what is committed), or set SHIP_UNCOMMITTED=1 to ship the working tree as it is"
  fi
  ARCHIVE=$SCRATCH/adm_jax.tar.gz
  # Tracked and untracked-but-not-ignored files as they are on disk (with a clean tree: HEAD).
  (
    cd "$REPO"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
      tar --null -T - -czf "$ARCHIVE"
  )
  say "shipping $(git -C "$REPO" rev-parse --short HEAD)${dirty:+ with uncommitted changes} ($(du -h "$ARCHIVE" | cut -f1))"
}

describe() { # FIELDS -> value(FIELDS) of the slice; on failure, gcloud's error in $GCLOUD_ERR
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format="value($1)" 2>"$GCLOUD_ERR"
}

slice_state() { # "" when the slice does not exist
  local out
  if out=$(describe state); then
    echo "$out"
  elif grep -q NOT_FOUND "$GCLOUD_ERR"; then
    echo ""
  else
    die "gcloud compute tpus tpu-vm describe $TPU_NAME failed: $(tail -n 1 "$GCLOUD_ERR")"
  fi
}

queued_state() { # "" when there is no queued resource named TPU_NAME
  local out
  if out=$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
    --format='value(state.state)' 2>&1); then
    echo "$out"
  elif [[ $out == *NOT_FOUND* ]]; then
    echo ""
  else
    die "gcloud compute tpus queued-resources describe $TPU_NAME failed: $(echo "$out" | tail -n 1)"
  fi
}

# "N chips x $P/chip-hour (spot) = about $X per hour, $Y per day"
cost_line() { # ACCELERATOR_TYPE on-demand|spot
  local generation=${1%-*} count=${1##*-} chips price
  case "$generation" in v2 | v3 | v4 | v5p) chips=$((count / 2)) ;; *) chips=$count ;; esac
  price=$(price_per_chip_hour "$generation" "$2")
  if [ -z "$price" ]; then
    echo "$chips chips; no price on file for $generation (see cloud.google.com/tpu/pricing)"
    return
  fi
  awk -v c="$chips" -v p="$price" -v kind="$2" -v d="$PRICES_DATE" 'BEGIN {
    printf "%d chips x $%.2f/chip-hour (%s) = about $%.2f per hour, $%.0f per day", c, p, kind, c * p, 24 * c * p
    printf " (approximate list prices of %s)\n", d }'
}

capacity() { [ "${SPOT:-0}" = 1 ] && echo spot || echo on-demand; }

create_slice() {
  check_project
  say "creating $TPU_TYPE slice $TPU_NAME in $ZONE ($(capacity)$([ "${QUEUED:-0}" = 1 ] && echo ', queued'))"
  say "cost while it exists: $(cost_line "$TPU_TYPE" "$(capacity)")"
  local spot=()
  [ "${SPOT:-0}" = 1 ] && spot=(--spot)
  if [ "${QUEUED:-0}" = 1 ]; then
    gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$TPU_TYPE" --runtime-version="$RUNTIME" "${spot[@]}"
    wait_queued
  else
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$TPU_TYPE" \
      --version="$RUNTIME" "${spot[@]}"
  fi
  wait_ready
}

wait_queued() {
  local state last=""
  while true; do
    state=$(queued_state)
    [ "$state" != "$last" ] && say "queued resource $TPU_NAME: $state"
    last=$state
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING | "")
        die "queued resource $TPU_NAME is ${state:-gone}: launch/tpu_pod.sh delete, then up again (or another ZONE/TPU_TYPE)"
        ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

wait_ready() {
  local state
  for _ in $(seq 360); do
    state=$(slice_state)
    case "$state" in
      READY) return ;;
      CREATING | STARTING | RESTARTING | REPAIRING | "") sleep 10 ;;
      *) die "slice $TPU_NAME is $state, expected READY: launch/tpu_pod.sh delete, then up again" ;;
    esac
  done
  die "slice $TPU_NAME not READY after an hour (state $state)"
}

delete_slice() {
  if [ -n "$(queued_state)" ]; then
    say "deleting queued resource $TPU_NAME and its slice"
    gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet
  elif [ -n "$(slice_state)" ]; then
    say "deleting slice $TPU_NAME"
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
  else
    say "no slice $TPU_NAME in $ZONE: nothing to delete"
  fi
}

# Makes sure a READY slice exists; RECREATED=1 when it replaced a preempted (or failed) one.
RECREATED=0
ensure_slice() {
  local state
  state=$(slice_state)
  if [ -z "$state" ] && [ "${QUEUED:-0}" = 1 ] && [ -n "$(queued_state)" ]; then
    case "$(queued_state)" in
      ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING) wait_queued ;;
    esac
    state=$(slice_state)
  fi
  case "$state" in
    "") create_slice ;;
    READY) say "slice $TPU_NAME in $ZONE is READY" ;;
    CREATING | STARTING | RESTARTING | REPAIRING) wait_ready ;;
    *)
      say "slice $TPU_NAME is $state: deleting it and creating it again (the run resumes from its last checkpoint)"
      delete_slice
      create_slice
      RECREATED=1
      ;;
  esac
}

worker_count() {
  local ips
  ips=$(describe 'networkEndpoints[].ipAddress') || die "describe $TPU_NAME failed: $(tail -n 1 "$GCLOUD_ERR")"
  [ -n "$ips" ] || die "slice $TPU_NAME has no workers yet (state $(slice_state))"
  echo "$ips" | tr ';' '\n' | grep -c .
}

ssh_all() { # COMMAND: on every worker at once (gcloud's --worker=all), output as it comes
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

# COMMAND_PREFIX [ARGS]: runs `cd ~/adm_jax && bash launch/tpu_pod.sh _worker PREFIX i ARGS`
# on every worker in parallel, one ssh each (so each output line is labelled with its worker);
# exit 1 if any failed.
on_each_worker() {
  local verb=$1
  shift
  local n tmp i failed=0 pids=()
  n=$(worker_count)
  # gcloud makes this user's ssh key at the first connection (and may ask for a passphrase):
  # once, in the foreground, before connections run side by side.
  [ -f "$HOME/.ssh/google_compute_engine" ] || ssh_all true
  tmp=$(mktemp -d "$SCRATCH/workers.XXXXXX")
  for ((i = 0; i < n; i++)); do
    local command
    command="cd ~/$W_CODE 2>/dev/null && [ -f launch/tpu_pod.sh ] || { echo 'not installed (launch/tpu_pod.sh install)'; exit 0; }; bash launch/tpu_pod.sh _worker $verb$(worker_args "$verb" "$i" "$@")"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$i" --command="$command" \
      >"$tmp/$i.out" 2>"$tmp/$i.err" &
    pids+=($!)
  done
  for ((i = 0; i < n; i++)); do
    if ! wait "${pids[$i]}"; then
      failed=1
      cat "$tmp/$i.err" >&2
    fi
    sed "s/^/worker $i: /" "$tmp/$i.out"
  done
  rm -rf "$tmp"
  return $failed
}

worker_args() { # VERB INDEX ARGS...: the _worker arguments, quoted for the remote shell
  local verb=$1 index=$2
  shift 2
  case "$verb" in
    start) set -- "$index" "$@" ;;
  esac
  [ $# -eq 0 ] || printf ' %q' "$@"
}

# ------------------------------------------------------------------------------------------
# Subcommands.

cmd_create() {
  check_zone
  ensure_slice
}

cmd_install() {
  check_zone
  [ -n "$ARCHIVE" ] || make_archive
  [ "$(slice_state)" = READY ] || die "slice $TPU_NAME in $ZONE is not READY ($(slice_state)): launch/tpu_pod.sh create"
  if on_each_worker alive | grep -q ': alive$'; then
    die "a run is alive on $TPU_NAME: launch/tpu_pod.sh stop first (install replaces its code)"
  fi
  say "copying the code to every worker"
  gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:$W_ARCHIVE" --zone="$ZONE" --worker=all
  say "installing on every worker (bash launch/install.sh tpu ~/$W_VENV)"
  ssh_all "set -e; rm -rf ~/$W_CODE.new && mkdir ~/$W_CODE.new && tar -xzf ~/$W_ARCHIVE -C ~/$W_CODE.new && rm -rf ~/$W_CODE && mv ~/$W_CODE.new ~/$W_CODE && rm ~/$W_ARCHIVE && cd ~/$W_CODE && bash launch/tpu_pod.sh _worker install"
}

cmd_start() {
  check_zone
  check_bucket
  check_run_args "$@"
  [ "$(slice_state)" = READY ] || die "slice $TPU_NAME in $ZONE is not READY ($(slice_state)): launch/tpu_pod.sh up"
  local stamp
  stamp=$(date -u +%Y%m%d-%H%M%S)
  say "starting on every worker: python -m adm_jax.main ${RUN_ARGS[*]}"
  on_each_worker start "$stamp" "$WORKDIR" "${RUN_ARGS[@]}"
  say "running detached; checkpoints and metrics in $WORKDIR; see: launch/tpu_pod.sh status | logs"
}

cmd_up() {
  check_zone
  check_bucket
  check_run_args "$@"
  make_archive
  ensure_slice
  if on_each_worker alive | grep -q ': alive$'; then
    say "a run is already alive on $TPU_NAME: nothing to do (launch/tpu_pod.sh status | logs | stop)"
    return 0
  fi
  cmd_install
  local extra=()
  # The preempted slice's run is gone with it, but its lock is still in the workdir, held by a
  # machine that no longer exists: break it.
  [ "$RECREATED" = 1 ] && extra=(--break_lock)
  cmd_start "$@" "${extra[@]}"
}

cmd_status() {
  check_zone
  local state type spot
  state=$(slice_state)
  if [ -z "$state" ]; then
    local queued
    queued=$( [ "${QUEUED:-0}" = 1 ] && queued_state || true)
    say "slice $TPU_NAME in $ZONE: not found${queued:+ (queued resource: $queued)}; nothing billed"
    return 0
  fi
  type=$(describe acceleratorType)
  spot=$(describe 'schedulingConfig.spot,schedulingConfig.preemptible')
  [[ $spot == *True* ]] && spot=spot || spot=on-demand
  say "slice $TPU_NAME ($type, $spot) in $ZONE: $state"
  if [ "$state" = READY ]; then
    say "cost while it exists, running or not: $(cost_line "$type" "$spot")"
    on_each_worker status
  else
    say "not billed while $state; launch/tpu_pod.sh up recreates it and resumes the run"
  fi
}

cmd_logs() {
  check_zone
  local lines=${1:-30}
  [[ $lines =~ ^[0-9]+$ ]] || die "logs $lines: expected a number of lines"
  [ "$(slice_state)" = READY ] || die "slice $TPU_NAME in $ZONE is not READY ($(slice_state)): its logs went with it; the logs of ended runs are in WORKDIR/logs/"
  on_each_worker logs "$lines"
}

cmd_stop() {
  check_zone
  [ "$(slice_state)" = READY ] || die "slice $TPU_NAME in $ZONE is not READY ($(slice_state)): no run to stop"
  say "stopping the run (SIGTERM: it saves a checkpoint, then exits; waiting up to $STOP_TIMEOUT s)"
  on_each_worker stop "$STOP_TIMEOUT"
  say "stopped; the slice is still billed: launch/tpu_pod.sh delete"
}

cmd_delete() {
  check_zone
  delete_slice
}

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
  local command=${1:-}
  shift || true
  case "$command" in
    _worker)
      worker_side "$@"
      return
      ;;
  esac
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
  trap 'rm -rf "$SCRATCH"' EXIT
  GCLOUD_ERR=$SCRATCH/gcloud.err
  case "$command" in
    up | run) cmd_up "$@" ;;
    create) cmd_create "$@" ;;
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    delete) cmd_delete "$@" ;;
    -h | --help | help) usage ;;
    *) die "unknown command '${command}': expected up, create, install, start, status, logs, stop or delete (help: $PROG help)" ;;
  esac
}

main "$@"
