#!/usr/bin/env bash
# Every GPU test and benchmark of kvrelay in one call, for the lent GPU machines (device tool).
# Full logs and JSON go to $OUT (or ./out); a short table is printed last.
#   scripts/gpu_check.sh            # GPU tests + engine bench + memory_model (litmus, handoff bench)
#   scripts/gpu_check.sh tests      # GPU tests only
#   scripts/gpu_check.sh bench      # engine bench only
#   scripts/gpu_check.sh memory     # litmus + handoff bench only (on 2 GPUs: also across them)
#   scripts/gpu_check.sh serve      # serving sweeps (1B, 8B; ShareGPT-like, shared-prefix) and
#                                   # disaggregated vs colocated (bench disagg): not in "all"
#   scripts/gpu_check.sh gemv       # the narrow GEMV's GPU tests, its kernel sweep, decode with it on
#                                   # vs off, and the 1B batch-256 profile (scripts/bench_gemv.py): not in "all"
#   scripts/gpu_check.sh dataplane  # issue 14: 1B served vs offline, the c=1 TTFT hop by hop, router scaling 1/2/4/8 (ROUTERS=...)
#   scripts/gpu_check.sh real       # the real model (smollm2, GGUF): its GPU tests, decode ms/token at
#                                   # batch 1 and 64, and HTTP vs gRPC throughput at 64 streams: not in "all"
# The machines reach no package registry: for `real`, put SmolLM2's GGUF in $KVRELAY_CACHE_DIR
# (default ~/.cache/kvrelay) first, e.g. carried from a machine where `kvrelay generate --model smollm2` ran.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"; mkdir -p "$out"
what="${1:-all}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Packages the GPU image lacks travel as wheels in .whl/ (pure Python; see docs/BENCHMARKS.md).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
# Ray, from the slim bundle of ../shared/device/ray-bundle.sh, when carried.
if [[ -f .devicepkgs/ray-slim.tar.xz ]]; then
  mkdir -p /tmp/site && tar -xJf .devicepkgs/ray-slim.tar.xz -C /tmp/site && chmod -R +x /tmp/site/ray/core
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
declare -A status
if [[ "$what" == all || "$what" == tests ]]; then
  python3 -m pytest -q -m "gpu or multi_gpu" -p no:cacheprovider --junitxml="$out/gpu_tests.xml" tests 2>&1 | tee "$out/gpu_tests.log"
  status[tests]=${PIPESTATUS[0]}
fi
if [[ "$what" == all || "$what" == bench ]]; then
  python3 -m kvrelay.cli bench engine --json "$out/bench_engine.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench_engine.log"
  status[bench]=${PIPESTATUS[0]}
fi
if [[ "$what" == all || "$what" == memory ]]; then
  python3 -m kvrelay.cli litmus --json "$out/litmus.json" ${LITMUS_ARGS:-} 2>&1 | tee "$out/litmus.log"
  status[litmus]=${PIPESTATUS[0]}
  python3 -m kvrelay.cli bench handoff --json "$out/bench_handoff.json" ${HANDOFF_ARGS:-} 2>&1 | tee "$out/bench_handoff.log"
  status[handoff]=${PIPESTATUS[0]}
fi
if [[ "$what" == serve ]]; then
  python3 scripts/serve_sweep.py --out "$out/serve" ${SWEEP_ARGS:-} 2>&1 | tee "$out/serve_sweep.log"
  status[serve]=${PIPESTATUS[0]}
  python3 -m kvrelay.cli bench disagg --json "$out/bench_disagg.json" ${DISAGG_ARGS:-} 2>&1 | tee "$out/bench_disagg.log"
  status[disagg]=${PIPESTATUS[0]}
  tar -czf "$out/serve.tar.gz" -C "$out" serve && rm -rf "$out/serve"
fi
if [[ "$what" == dataplane ]]; then
  # issue 14: served vs offline (1B, with a concurrency-1 TTFT/TPOT phase), then the router scaling curve
  # 8 client processes: 4 saturate (1.0 CPU-s/s each) near 46k tok/s on the 16-core H200 host
  python3 scripts/serve_vs_offline.py --model random:llama-3.2-1b --workers 1 --requests 2048 --concurrency 256 \
    --client-processes 8 --router-processes auto --json "$out/svo_1b.json" ${SVO_ARGS:-} 2>&1 | tee "$out/svo_1b.log"
  status[svo]=${PIPESTATUS[0]}
  # the concurrency-1 TTFT, hop by hop (KVRELAY_HOP_TRACE)
  python3 scripts/ttft_hops.py --requests 32 --json "$out/ttft_hops.json" 2>&1 | grep -v " INFO " | tee "$out/ttft_hops.log"
  status[hops]=${PIPESTATUS[0]}
  python3 scripts/router_scaling.py --routers ${ROUTERS:-1,2,4,8} --workers 8 --step-ms 10 --streams 1024 \
    --output-len 128 --out "$out/router_scaling" 2>&1 | grep -v "^\s*$" | tee "$out/router_scaling.log"
  status[scaling]=${PIPESTATUS[0]}
  # one file back, not one per point (the device tool returns a limited number of files)
  tar -czf "$out/router_scaling.tar.gz" -C "$out" router_scaling && rm -rf "$out/router_scaling"
fi
if [[ "$what" == gemv ]]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemv.py 2>&1 | tee "$out/gemv_tests.log"
  status[gemv_tests]=${PIPESTATUS[0]}
  python3 scripts/bench_gemv.py --json "$out/bench_gemv.json" 2>&1 | tee "$out/bench_gemv.log"
  status[gemv_bench]=${PIPESTATUS[0]}
fi
if [[ "$what" == real ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_smollm2.py tests/test_gguf.py -m "gpu or not gpu" 2>&1 | tee "$out/real_tests.log"
  status[real_tests]=${PIPESTATUS[0]}
  python3 -m kvrelay.cli bench engine --models smollm2 --batch-sizes 1,64 --contexts 512 --no-hf \
    --json "$out/bench_smollm2.json" 2>&1 | tee "$out/bench_smollm2.log"
  status[real_bench]=${PIPESTATUS[0]}
  python3 scripts/http_vs_grpc.py --model smollm2 --concurrency 64 --out "$out/http_vs_grpc" ${HTTP_ARGS:-} 2>&1 | tee "$out/http_vs_grpc.log"
  status[http_vs_grpc]=${PIPESTATUS[0]}
fi
echo
echo "== summary"
[[ -n "${status[tests]:-}" ]] && echo "gpu tests: exit ${status[tests]} ($(tail -n 1 "$out/gpu_tests.log"))"
[[ -n "${status[bench]:-}" ]] && { echo "bench engine: exit ${status[bench]}"; sed -n '/^kvrelay bench engine on/,$p' "$out/bench_engine.log"; }
[[ -n "${status[litmus]:-}" ]] && { echo "litmus: exit ${status[litmus]}"; tail -n 30 "$out/litmus.log"; }
[[ -n "${status[handoff]:-}" ]] && { echo "bench handoff: exit ${status[handoff]}"; tail -n 20 "$out/bench_handoff.log"; }
[[ -n "${status[serve]:-}" ]] && { echo "serve sweeps: exit ${status[serve]}"; grep -E "^ *(inf|[0-9.]+) +[0-9]+ +[0-9]+ " "$out/serve_sweep.log"; }
[[ -n "${status[disagg]:-}" ]] && { echo "bench disagg: exit ${status[disagg]}"; tail -n 12 "$out/bench_disagg.log"; }
[[ -n "${status[svo]:-}" ]] && { echo "serve vs offline: exit ${status[svo]}"; tail -n 25 "$out/svo_1b.log"; }
[[ -n "${status[scaling]:-}" ]] && { echo "router scaling: exit ${status[scaling]}"; tail -n 8 "$out/router_scaling.log"; }
[[ -n "${status[gemv_tests]:-}" ]] && echo "gemv gpu tests: exit ${status[gemv_tests]} ($(tail -n 1 "$out/gemv_tests.log"))"
[[ -n "${status[gemv_bench]:-}" ]] && { echo "bench gemv: exit ${status[gemv_bench]}"; grep -v "capturing CUDA" "$out/bench_gemv.log" | tail -n 80; }
[[ -n "${status[real_tests]:-}" ]] && echo "smollm2/gguf tests: exit ${status[real_tests]} ($(tail -n 1 "$out/real_tests.log"))"
[[ -n "${status[real_bench]:-}" ]] && { echo "bench engine smollm2: exit ${status[real_bench]}"; sed -n '/^kvrelay bench engine on/,$p' "$out/bench_smollm2.log"; }
[[ -n "${status[http_vs_grpc]:-}" ]] && { echo "http vs grpc: exit ${status[http_vs_grpc]}"; tail -n 7 "$out/http_vs_grpc.log"; }
rc=0; for s in "${status[@]}"; do [[ "$s" == 0 ]] || rc=1; done
exit $rc
