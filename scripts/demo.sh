#!/usr/bin/env bash
# The README's run command: serve the built-in tiny model (a local Ray cluster, one CPU worker,
# or one worker per GPU), send one sample request over gRPC, then drain the server with SIGTERM.
# `python3 -m kvrelay.cli` is the `kvrelay` console script, without relying on a rehashed PATH.
set -euo pipefail
port="${KVRELAY_DEMO_PORT:-50051}"
ready=$(mktemp)
python3 -m kvrelay.cli serve --port "$port" >"$ready" 2>"$ready.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$ready" "$ready.log"' EXIT
for _ in $(seq 1 180); do
  grep -q "kvrelay serving on" "$ready" && break
  if ! kill -0 "$pid" 2>/dev/null; then echo "kvrelay serve exited early:" >&2; tail -n 20 "$ready.log" >&2; exit 1; fi
  sleep 0.5
done
cat "$ready"
echo "> kvrelay generate --server 127.0.0.1:$port --prompt 'Hello, kvrelay' --max-tokens 24 --json"
python3 -m kvrelay.cli generate --server "127.0.0.1:$port" --prompt "Hello, kvrelay" --max-tokens 24 --json
