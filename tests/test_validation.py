"""cluster/validation.py: every refusal names its field and limit; accepted requests convert exactly."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from kvrelay.cluster.validation import (
    MAX_CHAT_MESSAGES,
    ChatPrompt,
    Limits,
    check_prompt,
    check_request_id,
    prompt_of,
    remaining_context,
    sampling_params,
    work_request,
)
from kvrelay.proto import kvrelay_pb2 as pb
from kvrelay.worker.sampling_params import SamplingParams

LIMITS = Limits(vocab_size=320, max_model_len=4096, kv_capacity_tokens=2048, accepts_text=True)
NO_TEXT = Limits(vocab_size=320, max_model_len=4096, kv_capacity_tokens=2048, accepts_text=False)


def sampling(**fields: Any) -> pb.SamplingParams:
    return pb.SamplingParams(**fields)


def test_defaults_convert_proto_zeros() -> None:
    p = sampling_params(sampling(), LIMITS)
    assert p == SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None)


def test_full_conversion() -> None:
    s = sampling(
        max_tokens=7, temperature=0.5, top_p=0.25, top_k=5, min_p=0.125, seed=2**64 - 1, stop=["ab", "c"],
        stop_token_ids=[3, 4], ignore_eos=True, logprobs=2,
    )  # fmt: skip
    p = sampling_params(s, Limits(320, 4096, 2048, True, default_max_tokens=99))
    assert p == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.25, top_k=5, min_p=0.125, seed=2**64 - 1, stop=("ab", "c"),
        stop_token_ids=(3, 4), ignore_eos=True, logprobs=2,
    )  # fmt: skip
    assert sampling_params(sampling(seed=0), LIMITS).seed == 0  # an explicit 0 is a seed, not "unset"
    assert sampling_params(sampling(), Limits(320, 4096, 2048, True, default_max_tokens=99)).max_tokens == 99


def test_work_request_keeps_stop_strings_on_the_router() -> None:
    p = SamplingParams(max_tokens=3, stop=("x",), stop_token_ids=(5,))
    w = work_request("7", [1, 2], p, 1.5)
    assert (w.request_id, w.prompt_token_ids, w.timeout_s) == ("7", [1, 2], 1.5)
    assert w.params == SamplingParams(max_tokens=3, stop=(), stop_token_ids=(5,))


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"temperature": -0.5}, ["temperature", ">= 0"]),
        ({"temperature": math.nan}, ["temperature", "finite"]),
        ({"temperature": math.inf}, ["temperature", "finite"]),
        ({"top_p": 1.5}, ["top_p", "(0, 1]"]),
        ({"top_p": -0.1}, ["top_p", "(0, 1]"]),
        ({"top_p": math.nan}, ["top_p"]),
        ({"min_p": 1.5}, ["min_p", "[0, 1]"]),
        ({"min_p": -0.5}, ["min_p", "[0, 1]"]),
        ({"top_k": 321}, ["top_k", "320"]),
        ({"max_tokens": 4097}, ["max_tokens", "4096"]),
        ({"stop": ["s"] * 17}, ["stop", "16"]),
        ({"stop": ["x" * 257]}, ["stop", "256"]),
        ({"stop": [""]}, ["stop", "1..256"]),
        ({"stop_token_ids": [320]}, ["stop_token_ids", "320"]),
        ({"stop_token_ids": [1] * 65}, ["stop_token_ids", "64"]),
        ({"logprobs": 21}, ["logprobs", "20"]),
        ({"repetition_penalty": 0.0}, ["repetition_penalty", "> 0"]),
        ({"repetition_penalty": -1.0}, ["repetition_penalty", "> 0"]),
        ({"repetition_penalty": math.inf}, ["repetition_penalty", "finite"]),
        ({"repetition_penalty": math.nan}, ["repetition_penalty", "finite"]),
        ({"presence_penalty": 2.5}, ["presence_penalty", "[-2, 2]"]),
        ({"presence_penalty": -2.01}, ["presence_penalty", "[-2, 2]"]),
        ({"presence_penalty": math.nan}, ["presence_penalty", "[-2, 2]"]),
        ({"frequency_penalty": -3.0}, ["frequency_penalty", "[-2, 2]"]),
        ({"frequency_penalty": math.inf}, ["frequency_penalty", "[-2, 2]"]),
    ],
)
def test_bad_sampling_names_field_and_limit(fields: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        sampling_params(sampling(**fields), LIMITS)
    message = str(e.value)
    assert message.startswith(needles[0]), message
    for n in needles[1:]:
        assert n in message, message


def test_limits_at_the_edge_pass() -> None:
    p = sampling_params(
        sampling(
            top_k=320, top_p=1.0, min_p=1.0, logprobs=20, stop=["x" * 256] * 16, stop_token_ids=[319] * 64
        ),
        LIMITS,
    )
    assert (p.top_k, p.logprobs, len(p.stop), len(p.stop_token_ids)) == (320, 20, 16, 64)


def test_penalties_convert_and_default_to_off() -> None:
    p = sampling_params(sampling(), LIMITS)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert not p.has_penalties
    # Values exact in float32, so the proto's float carries them unchanged; the edges are allowed.
    p = sampling_params(
        sampling(repetition_penalty=1.25, presence_penalty=-2.0, frequency_penalty=2.0), LIMITS
    )
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.25, -2.0, 2.0)
    assert p.has_penalties


def test_stop_strings_need_a_tokenizer() -> None:
    with pytest.raises(ValueError, match=r"^stop: this model has no tokenizer"):
        sampling_params(sampling(stop=["a"]), NO_TEXT)


def test_prompt_forms() -> None:
    assert prompt_of(pb.GenerateRequest(text="hi"), LIMITS) == "hi"
    assert prompt_of(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2])), LIMITS) == [1, 2]
    cases = [
        (pb.GenerateRequest(), "prompt: give text or token_ids"),
        (pb.GenerateRequest(text=""), "text: the prompt must not be empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids: the prompt must hold at least 1"),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 4097)),
            "token_ids: 4097 tokens exceed max_model_len 4096",
        ),
    ]
    for request, message in cases:
        with pytest.raises(ValueError) as e:
            prompt_of(request, LIMITS)
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ValueError, match=r"^text: this model has no tokenizer"):
        prompt_of(pb.GenerateRequest(text="hi"), NO_TEXT)


def test_prompt_ids_against_vocab_context_and_kv() -> None:
    check_prompt([0, 319], SamplingParams(max_tokens=2046), LIMITS)  # 2048 = the KV capacity exactly
    with pytest.raises(ValueError, match=r"^token_ids: token id 320 is outside the vocabulary \[0, 320\)"):
        check_prompt([1, 320, 2], SamplingParams(), LIMITS)
    with pytest.raises(ValueError, match=r"^max_tokens: .* = 4097 exceeds max_model_len 4096"):
        check_prompt([1], SamplingParams(max_tokens=4096), Limits(320, 4096, 10**6, True))
    with pytest.raises(
        ValueError, match=r"^max_tokens: .* = 2049 exceeds one worker's KV cache capacity of 2048"
    ):
        check_prompt([1, 2, 3], SamplingParams(max_tokens=2046), LIMITS)


def test_request_id_length() -> None:
    assert check_request_id("a" * 256, LIMITS) == "a" * 256
    with pytest.raises(ValueError, match=r"^request_id: at most 256 characters, got 257"):
        check_request_id("a" * 257, LIMITS)


CHAT = Limits(
    vocab_size=320, max_model_len=8, kv_capacity_tokens=2048, accepts_text=True, has_chat_template=True
)


def _chat(*messages: tuple[str, str]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    )


def test_chat_prompt_is_bounded_before_rendering() -> None:
    prompt = prompt_of(_chat(("system", "be brief"), ("user", "hi")), CHAT)
    assert prompt == ChatPrompt(
        ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    )
    # max_model_len 8 x 16 characters a token = 128 characters of roles and content
    assert prompt_of(_chat(("user", "x" * 124)), CHAT) == ChatPrompt(
        ({"role": "user", "content": "x" * 124},)
    )
    cases = [
        (_chat(), "chat: give at least 1 message, got none"),
        (_chat(("user", "x" * 125)), "chat: 129 characters of messages exceed 128 (max_model_len 8 x 16)"),
        (_chat(("", "hi")), "chat: message 0: role must be 1..64 characters, got 0"),
        (
            _chat(*[("user", "")] * (MAX_CHAT_MESSAGES + 1)),
            f"chat: at most {MAX_CHAT_MESSAGES} messages, got {MAX_CHAT_MESSAGES + 1}",
        ),
    ]
    for request, message in cases:
        with pytest.raises(ValueError) as e:
            prompt_of(
                request,
                dataclasses.replace(CHAT, max_model_len=10**6) if "messages, got" in message else CHAT,
            )
        assert str(e.value) == message
    with pytest.raises(ValueError, match=r"^chat: this model has no chat template; send text or token_ids$"):
        prompt_of(_chat(("user", "hi")), LIMITS)


def test_penalties_pass_through_and_are_bounded() -> None:
    p = sampling_params(
        sampling(repetition_penalty=1.5, presence_penalty=-2.0, frequency_penalty=0.5), LIMITS
    )
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.5, -2.0, 0.5)
    assert sampling_params(sampling(), LIMITS).repetition_penalty == 1.0  # unset: off
    for fields, message in [
        ({"repetition_penalty": 0.0}, "repetition_penalty: must be finite and > 0 (1 = off), got 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty: must be in [-2, 2] (0 = off), got 2.5"),
        ({"frequency_penalty": math.inf}, "frequency_penalty: must be in [-2, 2] (0 = off), got inf"),
    ]:
        with pytest.raises(ValueError) as e:
            sampling_params(sampling(**fields), LIMITS)
        assert str(e.value) == message


def test_remaining_context_is_bounded_by_the_context_and_one_workers_kv() -> None:
    assert remaining_context(100, LIMITS) == 2048 - 100  # KV capacity 2048 < max_model_len 4096
    assert remaining_context(100, dataclasses.replace(LIMITS, kv_capacity_tokens=10**6)) == 4096 - 100
    params = SamplingParams(max_tokens=remaining_context(100, LIMITS))
    check_prompt([1] * 100, params, LIMITS)  # accepted exactly at the bound
    with pytest.raises(ValueError, match=r"^max_tokens: prompt \(101 tokens\)"):
        check_prompt([1] * 101, params, LIMITS)


def test_text_prompt_is_bounded_by_characters_before_tokenizing() -> None:
    # max_model_len 4096 x 16 characters a token = 65536 characters; checked on the string itself.
    ok = pb.GenerateRequest(text="x" * 65536)
    assert prompt_of(ok, LIMITS) == "x" * 65536
    with pytest.raises(ValueError) as e:
        prompt_of(pb.GenerateRequest(text="é" * 65537), LIMITS)
    assert str(e.value) == (
        "text: 65537 characters exceed 65536 (max_model_len 4096 x 16); the prompt cannot fit"
    )
