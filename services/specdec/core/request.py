"""Turning a caller's request into a validated GenerationRequest.

Transport-neutral: the coordinator converts protobuf into a RequestSpec, the CLI and the
embedded engine build one directly. Every problem is an InvalidArgument naming the field
as the public proto spells it.
"""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from dataclasses import dataclass, field

from specdec.core.checks import check_ids, check_sampling_ids
from specdec.core.drafters.registry import DrafterSpec, parse_drafter
from specdec.core.errors import InvalidArgument
from specdec.core.loop import GenerationRequest
from specdec.core.sampling import MAX_GRAMMAR_CHARS, SamplingParams
from specdec.core.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_DRAFT_TOKENS = 5  # a model drafter's longest draft, unless the request says
MAX_DRAFT_TOKENS = 16
# A model-free drafter's: it drafts only where it finds a match, at almost no cost, so the
# longest cap pays (offline replay of 48 Spec-Bench outputs with the floor: 5 gives 1.62x
# plain, 12 gives 1.667x, 16 gives 1.671x; a copied turn goes 16 tokens a step).
DEFAULT_FREE_DRAFT_TOKENS = MAX_DRAFT_TOKENS
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string
MAX_MESSAGES = 256  # chat messages in one request
MAX_REQUEST_ID_CHARS = 256
MAX_TOP_LOGPROBS = 20  # alternatives per token with logprobs (OpenAI's cap)
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
    logprobs: int | None = None  # None: none; n: each token's log-probability and the top n (0..20)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    grammar_kind: str = ""  # structured output: "" | "json_object" | "json_schema" | "regex"
    grammar: str = ""  # the JSON schema (JSON text) or the regex
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100], added to its logit
    min_tokens: int | None = None  # EOS and the stop token ids are masked until this many tokens


@dataclass
class ModelLimits:
    vocab_size: int
    max_context: int
    max_new_tokens: int = 4096  # server cap on one request
    # The longest token's text: a prompt of n characters has at least n / this many tokens,
    # so one that cannot fit the context is refused before it is tokenized.
    max_token_chars: int = 1 << 20


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """Characters in the vocabulary's longest token (special ones included), at least 1."""
    vocab = getattr(tokenizer, "get_vocab", None)
    return max((len(token) for token in vocab()), default=1) if vocab is not None else 1 << 20


def build_request(
    spec: RequestSpec,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    default_drafter: DrafterSpec | str,
    available_drafters: list[str],
    default_overlap: bool = False,
) -> tuple[GenerationRequest, list[str]]:
    """-> (the loop's request, stop strings). Raises InvalidArgument. Sizes are checked
    before anything is tokenized; tokenizing a large prompt takes a while, so a server
    calls this off its event loop."""
    check_sizes(spec, limits)
    prompt_ids = _prompt_ids(spec, tokenizer, limits)
    max_new = DEFAULT_MAX_NEW_TOKENS if spec.max_new_tokens is None else spec.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise InvalidArgument("decoding.max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new}")
    stops = _stop_token_ids(spec, tokenizer, limits)
    sampling = _with_min_tokens(_sampling(spec, len(prompt_ids)), max_new, stops, limits)
    drafter = _drafter(parse_drafter(spec.drafter or default_drafter), available_drafters)
    k = default_draft_tokens(drafter) if spec.max_draft_tokens is None else spec.max_draft_tokens
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidArgument("speculation.max_draft_tokens", f"must be in [1, {MAX_DRAFT_TOKENS}], got {k}")
    _check_stop_strings(spec.stop)
    request = GenerationRequest(
        session_id=uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=sampling,
        drafter=drafter,
        max_draft_tokens=k,
        adaptive=True if spec.adaptive is None else spec.adaptive,
        stop_token_ids=stops,
        max_context=limits.max_context,
        overlap=default_overlap if spec.overlap is None else spec.overlap,
        logprobs=_logprobs(spec.logprobs),
    )
    return request, list(spec.stop)


def _sampling(spec: RequestSpec, prompt_len: int) -> SamplingParams:
    def given(value: float | None, default: float) -> float:
        return default if value is None else 1.0 * value

    return SamplingParams(
        temperature=given(spec.temperature, 0.0),
        top_k=0 if spec.top_k is None else spec.top_k,
        top_p=given(spec.top_p, 1.0),
        seed=secrets.randbits(63) if spec.seed is None else spec.seed,
        min_p=given(spec.min_p, 0.0),
        presence_penalty=given(spec.presence_penalty, 0.0),
        frequency_penalty=given(spec.frequency_penalty, 0.0),
        repetition_penalty=given(spec.repetition_penalty, 1.0),
        prompt_len=prompt_len,
        grammar_kind=spec.grammar_kind,
        grammar=spec.grammar,
        logit_bias=tuple(sorted((int(t), 1.0 * b) for t, b in (spec.logit_bias or {}).items())),
        min_tokens=spec.min_tokens or 0,
    ).validate("decoding.")


def _with_min_tokens(
    sampling: SamplingParams, max_new: int, stops: frozenset[int], limits: ModelLimits
) -> SamplingParams:
    """The ids min_tokens masks (EOS unless ignored, and the stop token ids), and the
    checks that need the request's length and the vocabulary."""
    if sampling.min_tokens > max_new:
        raise InvalidArgument("decoding.min_tokens", f"must be <= max_new_tokens {max_new}, got {sampling.min_tokens}")
    check_sampling_ids("decoding.", sampling, limits.vocab_size)
    if not sampling.min_tokens:
        return sampling
    return dataclasses.replace(sampling, min_tokens_ids=tuple(sorted(stops)))


def continued_sampling(
    recorded: SamplingParams, spec: RequestSpec, prompt_len: int, stop_token_ids: frozenset[int] = frozenset()
) -> SamplingParams:
    """A resumed request's sampling: the recorded temperature, top-k, top-p and seed, and the
    penalties, min-p and constraint of the resent request (the same request: its
    fingerprint matched), with the original prompt's length, so the tiers count and replay
    the output generated before the break as output (the new prompt holds it)."""
    spec_sampling = _sampling(dataclasses.replace(spec, seed=recorded.seed), prompt_len)
    return dataclasses.replace(
        spec_sampling,
        temperature=recorded.temperature,
        top_k=recorded.top_k,
        top_p=recorded.top_p,
        min_tokens_ids=tuple(sorted(stop_token_ids)) if spec_sampling.min_tokens else (),
    ).validate("decoding.")


def check_sizes(spec: RequestSpec, limits: ModelLimits) -> None:
    """Bounds on everything a caller sizes, checked in time proportional to the counts,
    never to the text; messages never echo the input."""
    if len(spec.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(spec.request_id)}")
    if len(spec.grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidArgument("decoding.constraint", f"at most {MAX_GRAMMAR_CHARS} characters")
    if len(spec.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("decoding.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(spec.stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in spec.stop):
        raise InvalidArgument("decoding.stop", f"a stop string has at most {MAX_STOP_CHARS} characters")
    if len(spec.stop_token_ids) > limits.vocab_size:
        raise InvalidArgument("decoding.stop_token_ids", f"at most {limits.vocab_size} ids")
    if spec.messages is not None and len(spec.messages) > MAX_MESSAGES:
        raise InvalidArgument("chat.messages", f"at most {MAX_MESSAGES} messages, got {len(spec.messages)}")
    texts = [spec.prompt] if spec.prompt is not None else [m.get("content", "") for m in spec.messages or []]
    chars = sum(len(text) for text in texts)
    if chars > limits.max_context * limits.max_token_chars:
        field = "prompt" if spec.prompt is not None else "chat.messages"
        raise InvalidArgument(
            field, f"{chars} characters cannot fit the model's context of {limits.max_context} tokens"
        )
    if spec.token_ids is not None and len(spec.token_ids) >= limits.max_context:
        raise InvalidArgument(
            "token_ids.ids",
            f"prompt of {len(spec.token_ids)} tokens does not fit the model's context of {limits.max_context}",
        )


def _prompt_ids(spec: RequestSpec, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
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
        check_ids(field_name, ids, limits.vocab_size)
    if len(ids) >= limits.max_context:
        raise InvalidArgument(
            field_name, f"prompt of {len(ids)} tokens does not fit the model's context of {limits.max_context}"
        )
    return ids


def default_draft_tokens(drafter: DrafterSpec) -> int:
    """The longest draft a request gets when it does not say (model drafters pay a pass per token)."""
    return DEFAULT_DRAFT_TOKENS if drafter.needs_model else DEFAULT_FREE_DRAFT_TOKENS


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied, as a plain list of token ids (transformers returns a list
    or, in newer versions, a dict-like with input_ids)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _chat_ids(messages: list[dict[str, str]], tokenizer: Tokenizer) -> list[int]:
    if not messages:
        raise InvalidArgument("chat.messages", "must not be empty")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidArgument(
                f"chat.messages[{i}].role", f"must be one of {ROLES}, got {str(message.get('role'))[:40]!r}"
            )
    if not any(m.get("content", "").strip() for m in messages):
        raise InvalidArgument("chat.messages", "all messages are empty")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument("chat", "this model has no chat template; send a prompt instead")
    return chat_prompt_ids(tokenizer, messages)


def _drafter(drafter: DrafterSpec, available: list[str]) -> DrafterSpec:
    if drafter.speculates and str(drafter) not in available:
        raise InvalidArgument(
            "speculation.drafter",
            f"drafter {str(drafter)[:100]!r} is not served here; available: {['none', *available]}",
        )
    return drafter


def _stop_token_ids(spec: RequestSpec, tokenizer: Tokenizer, limits: ModelLimits) -> frozenset[int]:
    check_ids("decoding.stop_token_ids", spec.stop_token_ids, limits.vocab_size)
    stops = set(spec.stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    # A constraint ends the text with EOS: past it the grammar allows nothing else, so with
    # ignore_eos the output would only repeat EOS up to max_new_tokens. EOS stops it there.
    if eos is not None and (not spec.ignore_eos or spec.grammar_kind):
        stops.add(int(eos))
    return frozenset(stops)


def _logprobs(top: int | None) -> int:
    if top is None:
        return -1
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("decoding.logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    return top


def _check_stop_strings(stop: list[str]) -> None:
    if any(not s for s in stop):
        raise InvalidArgument("decoding.stop", "stop strings must not be empty")
