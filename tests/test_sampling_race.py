"""The fused sampling kernel (worker/sampling_race.py) against its PyTorch reference path.

Without a GPU the kernel runs in Triton's interpreter at small, odd sizes that exercise every
mask: a vocab that is not a multiple of the block, several blocks per split, splits whose last
one is short, rows that are all -inf or tied. The noise is bit-identical on both paths, so the
tokens must be equal (logits are random, so a float near-tie between the top two is a ~1e-6 event
per row). The ``gpu`` tests run the 128256-entry vocab of Llama 3 and a CUDA-graph replay.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is first launched
pytest.importorskip("triton")

from engine_helpers import make_engine, random_prompts

from kvrelay.worker.penalties import PenaltyState
from kvrelay.worker.request import Request
from kvrelay.worker.sampler import Sampler
from kvrelay.worker.sampling_params import SamplingParams
from kvrelay.worker.sampling_race import argmax_rows, race, race_torch, uniform_noise

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature (every 4th row greedy), seed (some >= 2**63, i.e. negative int64) and
    counter, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    temps = torch.rand(n, generator=g) * 1.5 + 0.2
    temps[::4] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64) * 2
    counters = torch.randint(0, 5000, (n,), generator=g, dtype=torch.int64)
    return temps.to(DEVICE), seeds.to(DEVICE), counters.to(DEVICE)


def _logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * scale).to(DEVICE)


@pytest.mark.parametrize(
    ("n", "vocab", "splits"),
    [(5, 300, 1), (7, 3000, 1), (7, 3000, 2), (4, 5000, 8), (3, 50, 4)],
)
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_matches_torch(n: int, vocab: int, splits: int, scaled: bool) -> None:
    x = _logits(n, vocab, seed=vocab + n)
    temps, seeds, counters = _rows(n, seed=n)
    want = race_torch(x, temps, seeds, counters, scaled=scaled)
    got = race(x, temps, seeds, counters, scaled=scaled, impl="triton", num_splits=splits)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert got.tolist() == want.tolist()
    greedy = (temps == 0).nonzero().flatten().tolist()
    assert [int(got[i]) for i in greedy] == x[greedy].argmax(dim=-1).tolist()
    assert len(set(got.tolist())) > 1


def test_kernel_noise_is_bit_identical_to_torch() -> None:
    """Zero logits, temperature 1: the token is the argmax of U alone, so the kernel's in-register
    hash must produce the reference's exact U at the winning entry (and not exceed it elsewhere)."""
    n, vocab = 16, 2000
    temps = torch.ones(n, device=DEVICE)
    _, seeds, counters = _rows(n, seed=3)
    got = race(torch.zeros(n, vocab, device=DEVICE), temps, seeds, counters, scaled=False, impl="triton",
               num_splits=3)  # fmt: skip
    assert got.tolist() == uniform_noise(seeds, counters, vocab).argmax(dim=-1).tolist()


def test_kernel_filtered_rows_ties_and_all_masked_rows() -> None:
    """-inf entries (filtered tokens) never win, even when the only finite ones sit in the last
    split; greedy ties resolve to the first index across splits; an all -inf row gives index 0, as
    torch.argmax does."""
    n, vocab = 6, 2500
    x = _logits(n, vocab, seed=8)
    x[0, :2400] = float("-inf")  # sampled row, survivors only in the last split
    x[1, 1:] = float("-inf")  # one survivor
    x[2] = 0.0
    x[2, [1700, 30, 2400]] = 5.0  # greedy tie: first index 30
    x[3] = float("-inf")  # greedy, all masked
    x[4] = float("-inf")  # sampled, all masked
    x[5, ::3] = float("-inf")
    temps = torch.tensor([0.8, 1.0, 0.0, 0.0, 1.3, 0.9], device=DEVICE)
    _, seeds, counters = _rows(n, seed=9)
    got = race(x, temps, seeds, counters, scaled=True, impl="triton", num_splits=3).tolist()
    assert got == race_torch(x, temps, seeds, counters, scaled=True).tolist()
    assert got[0] >= 2400 and got[1] == 0 and got[2] == 30 and got[3] == 0 and got[4] == 0
    assert got[5] % 3 != 0


def _penalized_request(i: int, params: SamplingParams) -> Request:
    req = Request(f"r{i}", [3, 5, 7, i], params)
    req.all_token_ids += [5, 9, 9, i + 1]
    return req


def test_sampler_triton_equals_torch_for_a_mixed_batch() -> None:
    """The whole sampler with impl="triton" (fused draw, also after the sort-based filters) against
    impl="torch": greedy, plain temperature, each filter, penalties, seeded and not."""
    vocab = 700
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, seed=2**64 - 5),
        SamplingParams(temperature=1.2, top_k=40),
        SamplingParams(temperature=0.7, top_p=0.8, seed=3),
        SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.5),
        SamplingParams(temperature=1.4, top_k=100, top_p=0.9, min_p=0.02, frequency_penalty=0.5),
        SamplingParams(repetition_penalty=1.3),
    ]
    reqs = [_penalized_request(i, p) for i, p in enumerate(params)]
    logits = _logits(len(params), vocab, seed=4)
    counters = [4, 0, 17, 2, 9, 1, 3]
    seeds = [11, None, 12, None, 13, 14, 15]
    for batch in (params, [p for p in params if p.top_k == 0 and p.top_p == 1 and p.min_p == 0]):
        rows = [params.index(p) for p in batch]
        out = {}
        for impl in ("torch", "triton"):
            penalties = PenaltyState(vocab, DEVICE).batch([reqs[i] for i in rows])
            out[impl] = Sampler(seed=0, impl=impl)(
                logits[rows], batch, seeds=[seeds[i] for i in rows], counters=[counters[i] for i in rows],
                penalties=penalties,
            ).token_ids.tolist()  # fmt: skip
        assert out["triton"] == out["torch"]
        assert out["triton"][0] != out["triton"][1]


@gpu
@pytest.mark.parametrize("n", [1, 32, 256])
def test_kernel_matches_torch_on_gpu_at_llama3_vocab(n: int) -> None:
    vocab = 128256
    x = _logits(n, vocab, seed=n, scale=4.0)
    temps, seeds, counters = _rows(n, seed=n)
    got = race(x, temps, seeds, counters, scaled=False, impl="triton")
    assert got.tolist() == race_torch(x, temps, seeds, counters, scaled=False).tolist()
    # The same batch as bf16 logits (a model's lm_head output): the kernel reads any float dtype.
    xb = x.to(torch.bfloat16)
    got_b = race(xb, temps, seeds, counters, scaled=False, impl="triton")
    assert got_b.tolist() == race_torch(xb, temps, seeds, counters, scaled=False).tolist()


@gpu
def test_kernel_replays_in_a_cuda_graph() -> None:
    """Static grid, shape-determined allocations: capture once, then new logits, seeds and counters
    copied into the static inputs give what an eager call gives."""
    n, vocab = 64, 32000
    x = torch.zeros(n, vocab, device=DEVICE)
    temps, seeds, counters = _rows(n, seed=1)
    race(x, temps, seeds, counters, scaled=False)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = race(x, temps, seeds, counters, scaled=False)
    for step in range(3):
        new_x = _logits(n, vocab, seed=step)
        new_t, new_s, new_c = _rows(n, seed=10 + step)
        for static, new in ((x, new_x), (temps, new_t), (seeds, new_s), (counters, new_c)):
            static.copy_(new)
        graph.replay()
        assert out.tolist() == race(new_x, new_t, new_s, new_c, scaled=False).tolist()


@gpu
def test_sampler_on_gpu_matches_cpu() -> None:
    """Seeded rows give the same tokens on the GPU (fused kernel) as on the CPU (torch)."""
    vocab, n = 32000, 48
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, vocab, generator=g) * 3.0
    configs = [SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.1, top_p=0.9, seed=8),
               SamplingParams(), SamplingParams(temperature=1.0, top_k=50, min_p=0.05, seed=9)]  # fmt: skip
    params = [configs[i % 4] for i in range(n)]
    counters = list(range(n))
    cpu = Sampler()(logits, params, counters=counters).token_ids.tolist()
    cuda = Sampler()(logits.to(DEVICE), params, counters=counters).token_ids.tolist()
    assert cuda == cpu


@gpu
def test_seeded_engine_on_gpu_matches_cpu() -> None:
    """The noise no longer depends on the device (a CUDA torch.Generator and a CPU one gave
    different streams): a float32 engine with seeded sampling (fused draw, filters, penalties,
    graphs and overlapped steps on the GPU) gives the CPU engine's tokens."""
    prompts = random_prompts(6, [5, 17, 40], 256, seed=31)
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.1, top_p=0.9, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=30, min_p=0.05, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, frequency_penalty=0.5, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, seed=2**64 - 1, ignore_eos=True),
    ]
    cpu = make_engine().generate(prompts, params)
    engine = make_engine(device="cuda", num_kv_blocks=1024)
    gpu = engine.generate(prompts, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    engine.check_integrity()


@pytest.mark.parametrize(("n", "vocab", "splits"), [(5, 300, 1), (7, 3000, 3), (4, 5000, 8), (3, 50, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch_argmax(n: int, vocab: int, splits: int, dtype: torch.dtype) -> None:
    # bf16 rounding makes ties common; rows 0 and 1 are all-equal and tied at both ends, so the
    # first index on ties is checked across splits.
    x = _logits(n, vocab, seed=vocab * n).to(dtype)
    x[0] = 1.5
    x[1] = 0.0
    x[1, vocab - 1] = x[1, 2] = 7.0
    got = argmax_rows(x, impl="triton", num_splits=splits)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert got.tolist() == x.float().argmax(dim=-1).tolist()
    assert got[0] == 0 and got[1] == 2


def test_greedy_sampler_reads_bf16_logits_as_their_float32_copy() -> None:
    """The engine hands the sampler the model's dtype: greedy, sampled and logprob rows must give
    what the same logits upcast to float32 give."""
    x = _logits(6, 700, seed=11).to(torch.bfloat16)
    params = [
        SamplingParams(),
        SamplingParams(logprobs=3),
        SamplingParams(temperature=0.7, seed=5),
        SamplingParams(temperature=0.9, top_k=20, seed=6),
        SamplingParams(),
        SamplingParams(temperature=1.1, top_p=0.8, seed=7, logprobs=2),
    ]
    for impl in ("torch", "triton"):
        s = Sampler(seed=0, impl=impl)
        got = s(x, params, counters=list(range(6)))
        want = s(x.float(), params, counters=list(range(6)))
        assert got.token_ids.tolist() == want.token_ids.tolist()
        assert got.logprobs == want.logprobs
        assert sum(lp is not None for lp in got.logprobs) == 2
        greedy = s(x, [SamplingParams()] * 6)
        assert greedy.token_ids.tolist() == x.float().argmax(dim=-1).tolist()


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 32, 256])
def test_argmax_rows_on_gpu_at_llama3_vocab(n: int) -> None:
    x = _logits(n, 128256, seed=n).to(torch.bfloat16)
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
