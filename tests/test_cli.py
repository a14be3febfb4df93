"""`kvrelay generate` as a user runs it: prompts file, --json output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import hf_reference, make_checkpoint
from engine_helpers import hf_greedy, random_prompts

from kvrelay.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prompts_file_matches_transformers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path / "ckpt", "llama")
    prompts = random_prompts(4, [3, 29, 11, 64], 300, seed=11)
    lines = [
        json.dumps({"prompt_ids": p, "max_tokens": 6 + i, "ignore_eos": True}) for i, p in enumerate(prompts)
    ]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    code, out, _ = run_cli(
        [
            "generate",
            "--model",
            str(ckpt),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--prompts-file",
            str(tmp_path / "prompts.jsonl"),
            "--json",
        ],
        capsys,
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert [r["token_ids"] for r in rows] == [hf_greedy(hf, p, 6 + i) for i, p in enumerate(prompts)]
    for row, p in zip(rows, prompts, strict=True):
        assert set(row) == {"token_ids", "text", "finish_reason", "prompt_tokens", "cached_prompt_tokens"}
        assert row["finish_reason"] == "length"
        assert row["prompt_tokens"] == len(p)


def test_generate_prompts_file_penalties_match_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_engine_penalties import reference_greedy

    from kvrelay.worker.sampling_params import SamplingParams

    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", seed=2)
    prompts = random_prompts(2, [5, 12], 300, seed=12)
    fields = [
        {"max_tokens": 10, "ignore_eos": True, "repetition_penalty": 1.6, "frequency_penalty": 0.5},
        {"max_tokens": 10, "ignore_eos": True, "presence_penalty": 1, "frequency_penalty": -0.25},
    ]
    lines = [json.dumps({"prompt_ids": p, **f}) for p, f in zip(prompts, fields, strict=True)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    args = ["generate", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--json"]
    code, out, _ = run_cli([*args, "--prompts-file", str(tmp_path / "prompts.jsonl")], capsys)
    assert code == 0
    hf = hf_reference(ckpt)
    expected = [reference_greedy(hf, p, SamplingParams(**f)) for p, f in zip(prompts, fields, strict=True)]
    assert [json.loads(line)["token_ids"] for line in out.splitlines()] == expected

    # The same penalties as flags apply to a --prompt-ids prompt.
    flags = ["--max-tokens", "10", "--ignore-eos", "--repetition-penalty", "1.6"]
    flags += ["--frequency-penalty", "0.5"]
    code, out, _ = run_cli([*args, *flags, "--prompt-ids", ",".join(map(str, prompts[0]))], capsys)
    assert code == 0
    assert json.loads(out)["token_ids"] == expected[0]


def test_generate_text_prompt_on_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["generate", "--prompt", "Hello", "--max-tokens", "8", "--json"], capsys)
    assert code == 0
    row = json.loads(out)
    assert len(row["token_ids"]) == 8 or row["finish_reason"] == "stop"
    assert row["prompt_tokens"] == 6  # <s> + 5 bytes


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"text": "a", "prompt_ids": [1]}'],
            "line 1: give exactly one of 'text', 'prompt_ids' or 'messages'",
        ),
        (['{"messages": [{"role": "user"}]}'], "line 1: 'messages' must be a non-empty list of"),
        (
            ['{"messages": [{"role": "", "content": "x"}]}'],
            "prompt 1: chat: messages[0].role must be a string of 1 to 64 characters",
        ),
        (["not json"], "line 1: not valid JSON"),
        (['{"text": "a"}', '{"text": "b", "temprature": 1}'], "line 2: unknown field 'temprature'"),
        (['{"prompt_ids": [1, "x"]}'], "line 1: 'prompt_ids' must be a list of integers"),
        (['{"text": "a", "top_p": 0}'], "prompt 1: top_p must be in (0, 1], got 0"),
        (['{"prompt_ids": [1, 100000]}'], "token id 100000 is outside the vocabulary [0, 320)"),
        (['{"text": "a", "presence_penalty": 3}'], "prompt 1: presence_penalty must be in [-2, 2], got 3"),
        (['{"text": "a", "repetition_penalty": "x"}'], "field 'repetition_penalty' has the wrong type"),
    ],
)
def test_generate_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], message: str
) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["generate", "--prompts-file", str(f)], capsys)
    assert code == 2
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("kvrelay: error: ") and message in last
    assert "Traceback" not in err


def test_generate_bad_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2
    assert "is not 'tiny', 'smollm2', a .gguf file nor an existing directory" in err


def test_generate_chat_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--chat and a prompts-file 'messages' line are rendered with the model's template: the prompt
    is exactly transformers' apply_chat_template ids for the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    from kvrelay.worker.model.tiny import tiny_model_dir

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ça va ?"}]
    ref = AutoTokenizer.from_pretrained(tiny_model_dir())
    expected = list(ref.apply_chat_template(conv, add_generation_prompt=True, return_dict=False))
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": conv, "max_tokens": 2}) + "\n")
    code, out, _ = run_cli(["generate", "--prompts-file", str(f), "--json"], capsys)
    assert code == 0 and json.loads(out)["prompt_tokens"] == len(expected)
    one_turn = [{"role": "user", "content": "Hi"}]
    code, out, _ = run_cli(["generate", "--chat", "Hi", "--max-tokens", "2", "--json"], capsys)
    want = ref.apply_chat_template(one_turn, add_generation_prompt=True, return_dict=False)
    assert code == 0 and json.loads(out)["prompt_tokens"] == len(want)
