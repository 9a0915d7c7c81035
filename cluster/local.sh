#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, for trying `ray job submit` and multi-node placement.
#
#   cluster/local.sh up   [STATE_DIR]   start a head and TSKD_WORKER_NODES worker nodes (token auth on)
#   cluster/local.sh down [STATE_DIR]   stop every process `up` started (nothing else), also
#                                       what is left of a node stop-node killed
#   cluster/local.sh stop-node STATE_DIR NAME
#                                       lose one worker node as a machine loss looks to Ray:
#                                       SIGKILL to its whole process group (raylet, workers), no
#                                       draining; the GCS marks it dead once its health checks fail
#   source STATE_DIR/env                the client settings: RAY_API_SERVER_ADDRESS (for
#                                       `ray job submit`), RAY_ADDRESS (for `tskd run`),
#                                       RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
#
# STATE_DIR (default $TSKD_LOCAL_CLUSTER or /tmp/tskd-local; keep it short: Ray's socket paths
# live under it) holds the cluster's own token, the nodes' Ray temp dirs, logs and pids.
# Each node is its own `ray start --block` in a new session; `down` sends SIGTERM to that
# process (Ray drains the node and stops its processes), then kills what is left of the
# session's process group and any process still naming STATE_DIR, by pid.
# Nodes: head {"head_node": 1}; worker nodes `worker`, `worker2`, ... (TSKD_WORKER_NODES, default
# 1) each {"worker_node": 1} and its own temp dir, log and pid under STATE_DIR; TSKD_NODE_CPUS
# (default 2) CPUs each; place training on the worker nodes with
# `--set 'ray.resources_per_worker={worker_node: 0.01}'`. Every node carries the label
# tskd-node=<name> (`ray list nodes` shows it), so tests know which node is which.
# The dashboard binds to 127.0.0.1; Ray's GCS and raylets listen on all interfaces (Ray ignores
# --node-ip-address for them), which the cluster's token protects.
# Environment: RAY (the ray executable; default: the one on PATH), TSKD_WORKER_NODES, TSKD_NODE_CPUS,
# TSKD_OBJECT_STORE_BYTES (default 200 MB per node), PYTHONPATH (passed to every Ray process).
set -euo pipefail

cmd=${1:-}
gcs=0 dash=0  # the head's GCS and dashboard ports, chosen by `up`
STATE=${2:-${TSKD_LOCAL_CLUSTER:-/tmp/tskd-local}}
STATE=$(realpath -m -- "$STATE")
RAY=${RAY:-$(command -v ray || true)}
CPUS=${TSKD_NODE_CPUS:-2}
WORKERS=${TSKD_WORKER_NODES:-1}
STORE_BYTES=${TSKD_OBJECT_STORE_BYTES:-200000000}

die() { echo "local.sh: $*" >&2; exit 1; }
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "TSKD_WORKER_NODES=$WORKERS: a whole number >= 1"
[[ -n "$RAY" && -x "$RAY" ]] || die "no ray executable (set RAY=/path/to/venv/bin/ray)"
BIN=$(dirname "$RAY")
PY="$BIN/python"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Everything Ray runs (nodes, job drivers, workers) sees the same auth settings and Python, and
# RAY_ADDRESS: Ray processes that look their cluster up (Ray Train's PlacementGroupCleaner) would
# otherwise find every Ray instance on this machine and give up. RAY_raylet_start_wait_time_s
# (Ray's default 10): how long a raylet waits for its dashboard agent's port file before it
# aborts ("Timed out waiting for file .../dashboard_agent_listen_port_..."), which a loaded
# machine missed.
node_env() {  # [--exec] command...: run it (or exec it: the caller's pid becomes its pid)
  local run=()
  if [[ $1 == --exec ]]; then run=(exec); shift; fi
  "${run[@]}" env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" \
      RAY_USAGE_STATS_ENABLED=0 RAY_ADDRESS="127.0.0.1:$gcs" PATH="$BIN:$PATH" \
      RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}" "$@"
}

start_node() {  # name, then ray start arguments
  local name=$1; shift
  local ports=(--dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)"
               --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)")
  # exec: the recorded pid is `ray start` itself, the leader of its own session (setsid)
  (node_env --exec setsid "$RAY" start --block --node-ip-address 127.0.0.1 --num-cpus "$CPUS" \
      --num-gpus 0 --object-store-memory "$STORE_BYTES" --temp-dir "$STATE/$name" \
      --disable-usage-stats --labels "tskd-node=$name" "${ports[@]}" "$@" \
      >"$STATE/$name.log" 2>&1 </dev/null) &
  echo $! >"$STATE/$name.pid"
}

alive_nodes() {  # number of alive nodes the GCS knows (0 while it is not up)
  node_env "$PY" - "$1" <<'EOF' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
nodes = list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
print(len(nodes))
EOF
}

wait_for() {  # dashboard address, node count, node name; fails if that node's process exits
  local i pid
  pid=$(cat "$STATE/$3.pid")
  for i in $(seq 1 180); do
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(alive_nodes "$1")" -ge "$2" ]] && return 0
    sleep 1
  done
  die "timed out waiting for the $3 node (logs: $STATE/*.log)"
}

stop_node() {  # name: SIGTERM to its `ray start --block` (Ray drains and stops the node), then
  local pid i  # SIGKILL to what is left of its session's process group
  [[ -f "$STATE/$1.pid" ]] || return 0
  pid=$(cat "$STATE/$1.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/$1.pid"
}

worker_name() {  # 1 -> worker, 2 -> worker2, ...
  if [[ $1 == 1 ]]; then echo worker; else echo "worker$1"; fi
}

start_and_wait() {  # name, node count, then ray start arguments. Ray gives a node 30 s to
  local name=$1 count=$2 attempt  # register with the GCS; on a loaded machine it may miss that,
  shift 2                         # so try again (up to 3 times)
  for attempt in 1 2 3; do
    start_node "$name" "$@"
    wait_for "http://127.0.0.1:$dash" "$count" "$name" && return 0
    echo "local.sh: the $name node exited while starting (attempt $attempt):" >&2
    tail -n 3 "$STATE/$name.log" >&2 || true
    stop_node "$name"
  done
  die "the $name node did not start (log: $STATE/$name.log)"
}

up() {
  [[ -f "$STATE/env" ]] && die "$STATE/env exists: a cluster may be running; run '$0 down $STATE' first"
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  trap 'if [[ $? != 0 ]]; then echo "local.sh: start-up failed; stopping what was started" >&2; down; fi' EXIT
  # A token of this cluster's own (never ~/.ray/auth_token, which other clusters may use).
  (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
  local client
  gcs=$(free_port); dash=$(free_port); client=$(free_port)
  start_and_wait head 1 --head --port "$gcs" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
      --ray-client-server-port "$client" --resources '{"head_node": 1}'
  local i
  for i in $(seq 1 "$WORKERS"); do
    start_and_wait "$(worker_name "$i")" $((i + 1)) --address "127.0.0.1:$gcs" \
        --resources '{"worker_node": 1}'
  done
  cat >"$STATE/env" <<EOF
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash
export RAY_ADDRESS=127.0.0.1:$gcs
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
EOF
  trap - EXIT
  echo "local.sh: $((WORKERS + 1)) nodes up (head {head_node: 1}, $WORKERS worker node(s)" \
       "{worker_node: 1}, $CPUS CPUs each);" \
       "dashboard http://127.0.0.1:$dash; client settings: source $STATE/env"
}

state_pids() {  # processes still naming STATE_DIR/[NAME/] on their command line (ours: unique)
  local p prefix="$STATE/${1:+$1/}"
  for p in /proc/[0-9]*; do
    [[ "${p#/proc/}" == "$$" ]] && continue
    { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$prefix" && echo "${p#/proc/}"
  done
  return 0
}

kill_node() {  # name: a machine loss. SIGKILL to the node's process group (its `ray start
  local name=$1 pid p  # --block`, raylet, agents, workers) and to every process of its temp dir
  [[ $name == head ]] && die "stop-node: the head stays (the job's driver runs there)"
  [[ -f "$STATE/$name.pid" ]] || die "stop-node: no node '$name' running in $STATE ($STATE/$name.pid)"
  pid=$(cat "$STATE/$name.pid")
  kill -KILL -- "-$pid" 2>/dev/null || true
  for p in $(state_pids "$name"); do kill -KILL "$p" 2>/dev/null || true; done
  mv -f "$STATE/$name.pid" "$STATE/$name.killed"
  echo "local.sh: node $name killed (SIGKILL to process group $pid)"
}

down() {
  local pid f
  for f in "$STATE"/worker*.pid; do
    [[ -f $f ]] && stop_node "$(basename "$f" .pid)"
  done
  stop_node head
  for pid in $(state_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$STATE/env"
  echo "local.sh: stopped (logs kept in $STATE)"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  stop-node) [[ -n ${3:-} ]] || die "usage: $0 stop-node STATE_DIR NAME"; kill_node "$3" ;;
  *) die "usage: $0 up|down [STATE_DIR] | stop-node STATE_DIR NAME" ;;
esac
