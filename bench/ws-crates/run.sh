#!/usr/bin/env bash
# Runs every candidate, one server process each, interleaved, ROUNDS times (default 2).
# Usage: [IMPLS="fws tws"] [MODES="idle warm bcast"] bench/ws-crates/run.sh [ROUNDS] [IDLE_CONNS] [BCAST_CONNS] [BCAST_SECS]
# Summary: bench/ws-crates/summarize.py bench/ws-crates/results/*.txt
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${1:-2}; IDLE=${2:-10000}; SUBS=${3:-1000}; SECS=${4:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/ws-target}
cargo build --release -q
B=$CARGO_TARGET_DIR/release
# Each process holds ~IDLE descriptors; raise the soft limit as far as the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
PORT=9170
IMPLS=${IMPLS:-"bare axum axum-small axum-w0 axum-w1k fws fws-buf tws"}
run() { # impl mode conns secs
  "$B/server" "$1" "$PORT" 2>/dev/null & local pid=$!
  sleep 0.3
  local out; out=$("$B/client" "$2" "$PORT" "$3" "$4" 2>&1 | tail -1) || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "round=$r impl=$1 load1=$(cut -d' ' -f1 /proc/loadavg) $out"
  sleep 1 # let TIME_WAIT sockets and the kernel settle a little
}
MODES=${MODES:-"idle warm bcast"}
for r in $(seq 1 "$ROUNDS"); do
  for m in $MODES; do
    if [ "$m" = bcast ]; then
      # bare writes 2 unbatched syscalls per frame: a memory floor only, not a throughput candidate.
      for i in ${IMPLS//bare/}; do run "$i" bcast "$SUBS" "$SECS"; done
    else
      for i in $IMPLS; do run "$i" "$m" "$IDLE" 2; done
    fi
  done
done
