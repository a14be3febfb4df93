#!/usr/bin/env bash
# Starts `kvrelay serve` on a Ray head node (deploy/ray-cluster.aws.yaml runs it after `ray start`):
# waits until the cluster has the GPUs the config asks for, then execs the server. Waiting here
# rather than in kvrelay: GPU nodes can take longer to boot and set up than the pool's start-up
# timeout (10 min).
#
#   kvrelay-head.sh CONFIG [WAIT_S]   # WAIT_S: how long to wait for the GPUs (default 1800)
#   kvrelay-head.sh --stop            # drain the kvrelay this script started, if it still runs
#                                     # (before `ray stop`, so its streams can finish)
set -euo pipefail
pidfile="$HOME/kvrelay.pid"

if [[ "${1:-}" == "--stop" ]]; then
  pid=$(cat "$pidfile" 2>/dev/null || true)
  # The pid must still be a kvrelay: after a reboot it may belong to anything. (A process that
  # has exited has an empty cmdline, even before its parent reaps it.)
  is_kvrelay() { grep -qa kvrelay "/proc/$pid/cmdline" 2>/dev/null; }
  if [[ -n "$pid" ]] && is_kvrelay; then
    kill -TERM "$pid"
    while is_kvrelay; do sleep 0.2; done
  fi
  rm -f "$pidfile"
  exit 0
fi

config=${1:?usage: kvrelay-head.sh CONFIG [WAIT_S] | --stop}
wait_s=${2:-1800}
export RAY_AUTH_MODE=token   # the head was started with it; every client of the cluster needs it

python3 - "$config" "$wait_s" <<'PY'
import sys
import time

import ray

from kvrelay.cluster.config import load_config

config = load_config(sys.argv[1])
want = config.workers or (config.prefill_workers or 0) + (config.decode_workers or 0) or 1
deadline = time.monotonic() + float(sys.argv[2])
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
while (have := ray.cluster_resources().get("GPU", 0)) < want:
    if time.monotonic() > deadline:
        sys.exit(f"kvrelay-head: the cluster has {have:g} GPUs after {sys.argv[2]} s, the config wants {want}")
    time.sleep(10)
PY

echo $$ >"$pidfile"
exec kvrelay serve --ray-address auto --config "$config"
