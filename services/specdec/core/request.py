"""Turning a caller's request into a validated GenerationRequest.

Transport-neutral: the coordinator converts protobuf into a RequestSpec, the CLI and the
embedded engine build one directly. Every problem is an InvalidArgument naming the field
as the public proto spells it.
"""
from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from specdec.core.drafters.registry import DrafterSpec, parse_drafter
from specdec.core.errors import InvalidArgument
from specdec.core.loop import GenerationRequest
from specdec.core.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_DRAFT_TOKENS = 5
MAX_DRAFT_TOKENS = 16
MAX_STOP_STRINGS = 16
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class RequestSpec:
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    drafter: str | None = None
    max_draft_tokens: int | None = None
    adaptive: bool | None = None
    overlap: bool | None = None
    request_id: str = ""


@dataclass
class ModelLimits:
    vocab_size: int
    max_context: int
    max_new_tokens: int = 4096  # server cap on one request


def build_request(spec: RequestSpec, tokenizer, limits: ModelLimits, default_drafter: DrafterSpec | str,
                  available_drafters: list[str], default_overlap: bool = False) -> tuple[GenerationRequest, list[str]]:
    """-> (the loop's request, stop strings). Raises InvalidArgument."""
    prompt_ids = _prompt_ids(spec, tokenizer, limits)
    max_new = DEFAULT_MAX_NEW_TOKENS if spec.max_new_tokens is None else spec.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise InvalidArgument("decoding.max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new}")
    sampling = SamplingParams(
        temperature=1.0 * (0.0 if spec.temperature is None else spec.temperature),
        top_k=0 if spec.top_k is None else spec.top_k,
        top_p=1.0 if spec.top_p is None else spec.top_p,
        seed=secrets.randbits(63) if spec.seed is None else spec.seed,
    ).validate("decoding.")
    drafter = _drafter(parse_drafter(spec.drafter or default_drafter), available_drafters)
    k = DEFAULT_DRAFT_TOKENS if spec.max_draft_tokens is None else spec.max_draft_tokens
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidArgument("speculation.max_draft_tokens", f"must be in [1, {MAX_DRAFT_TOKENS}], got {k}")
    stops = _stop_token_ids(spec, tokenizer, limits)
    _check_stop_strings(spec.stop)
    request = GenerationRequest(
        session_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_new_tokens=max_new, sampling=sampling,
        drafter=drafter, max_draft_tokens=k, adaptive=True if spec.adaptive is None else spec.adaptive,
        stop_token_ids=stops, max_context=limits.max_context, overlap=default_overlap if spec.overlap is None else spec.overlap,
    )
    return request, list(spec.stop)


def _prompt_ids(spec: RequestSpec, tokenizer, limits: ModelLimits) -> list[int]:
    given = [x is not None for x in (spec.prompt, spec.messages, spec.token_ids)]
    if sum(given) != 1:
        raise InvalidArgument("input", "give exactly one of prompt, chat or token_ids")
    if spec.prompt is not None:
        if not spec.prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        ids, field_name = tokenizer.encode(spec.prompt, add_special_tokens=False), "prompt"
    elif spec.messages is not None:
        ids, field_name = _chat_ids(spec.messages, tokenizer), "chat.messages"
    else:
        ids, field_name = list(spec.token_ids or []), "token_ids.ids"
        if not ids:
            raise InvalidArgument(field_name, "must not be empty")
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidArgument(field_name, f"token id {bad[0]} outside the vocabulary [0, {limits.vocab_size})")
    if len(ids) >= limits.max_context:
        raise InvalidArgument(field_name, f"prompt of {len(ids)} tokens does not fit the model's context of {limits.max_context}")
    return ids


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied, as a plain list of token ids (transformers returns a list
    or, in newer versions, a dict-like with input_ids)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _chat_ids(messages: list[dict[str, str]], tokenizer) -> list[int]:
    if not messages:
        raise InvalidArgument("chat.messages", "must not be empty")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidArgument(f"chat.messages[{i}].role", f"must be one of {ROLES}, got {message.get('role')!r}")
    if not any(m.get("content", "").strip() for m in messages):
        raise InvalidArgument("chat.messages", "all messages are empty")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument("chat", "this model has no chat template; send a prompt instead")
    return chat_prompt_ids(tokenizer, messages)


def _drafter(drafter: DrafterSpec, available: list[str]) -> DrafterSpec:
    if drafter.speculates and str(drafter) not in available:
        raise InvalidArgument("speculation.drafter",
                              f"drafter {str(drafter)!r} is not served here; available: {['none', *available]}")
    return drafter


def _stop_token_ids(spec: RequestSpec, tokenizer, limits: ModelLimits) -> frozenset[int]:
    for t in spec.stop_token_ids:
        if not 0 <= t < limits.vocab_size:
            raise InvalidArgument("decoding.stop_token_ids", f"token id {t} outside the vocabulary [0, {limits.vocab_size})")
    stops = set(spec.stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not spec.ignore_eos:
        stops.add(int(eos))
    return frozenset(stops)


def _check_stop_strings(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("decoding.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s for s in stop):
        raise InvalidArgument("decoding.stop", "stop strings must not be empty")
