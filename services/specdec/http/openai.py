"""OpenAI's request and response shapes, and their conversion to and from the core's.

Requests are pydantic models (FastAPI validates them); `to_specs` turns one into the
`RequestSpec`s the coordinator runs (one per choice: `n` × prompts). Every field that
would change the output and is not implemented is refused with a 400 naming it, never
ignored; its neutral value (`min_tokens: 0`, `logprobs: false`, ...) is accepted.
`response_format` json_object / json_schema constrains the output (core/grammar.py), as do
vLLM's extra-body conventions: `structured_outputs: {"regex": ...}` or `{"json": ...}`, and
the older `guided_regex` / `guided_json` (one constraint per request). `logit_bias`
(OpenAI's) and `min_tokens` (vLLM's) are processed on the target's rows as the penalties.
Responses are plain dicts in OpenAI's shapes; `usage` carries the speculation statistics
under `usage.speculation`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from specdec.core.errors import InvalidArgument
from specdec.core.request import RequestSpec
from specdec.core.stats import SpecStats

MAX_CHOICES = 128  # prompts × n in one request (OpenAI's own cap on n)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; the gRPC API's is 0 (greedy)
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class NotSupported(InvalidArgument):
    """A field that would change the output, set to a value this server does not implement."""

    def __init__(self, param: str, detail: str = "") -> None:
        super().__init__(param, "not supported yet by this server" + (f" ({detail})" if detail else ""))


class _Strict(BaseModel):
    # An unknown field is a 400 naming it: a parameter silently dropped would change the
    # output without telling anyone.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class Speculation(_Strict):
    """Extension object `speculation` (send it through the openai client's `extra_body`)."""

    drafter: str | None = Field(default=None, description="none | ngram | model:NAME (default: the server's)")
    max_draft_tokens: int | None = Field(
        default=None, description="longest draft per step, 1..16 (default 16 for model-free drafters, 5 for a model)"
    )
    adaptive: bool | None = Field(default=None, description="adapt the draft length (default true)")
    overlap: bool | None = Field(default=None, description="draft step n+1 while step n is verified")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # description, ...: do not change the output
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> tuple[str, str]:
        """-> (grammar_kind, grammar) as RequestSpec spells them."""
        if self.type == "text":
            return "", ""
        if self.type == "json_object":
            return "json_object", ""
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise InvalidArgument("response_format", "type json_schema needs json_schema.schema")
            return "json_schema", json.dumps(self.json_schema.schema_)
        raise NotSupported("response_format", f"type {self.type[:40]!r}")


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra-body object: one of its fields."""

    regex: str | None = None
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> tuple[str, str, str]:
        """-> (param, grammar_kind, grammar)."""
        given = [name for name in ("regex", "json_", "choice", "grammar", "json_object") if getattr(self, name)]
        if len(given) > 1:
            raise InvalidArgument("structured_outputs", "give one of regex, json, json_object")
        if not given:
            return "structured_outputs", "", ""
        name = given[0]
        if name == "regex":
            return "structured_outputs.regex", "regex", self.regex or ""
        if name == "json_":
            return "structured_outputs.json", "json_schema", _schema_text(self.json_)
        if name == "json_object":
            return "structured_outputs.json_object", "json_object", ""
        raise NotSupported(f"structured_outputs.{name}")


def _schema_text(schema: dict[str, Any] | str | None) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, description="extension (vLLM's): 0 or -1 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculation: Speculation | None = None
    stop_token_ids: list[int] | None = Field(default=None, description="extension (vLLM's)")
    ignore_eos: bool = Field(default=False, description="extension (vLLM's): keep generating past end of sequence")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(default=None, description="extension (vLLM's)")
    min_p: float | None = Field(default=None, description="extension (vLLM's)")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(default=None, description="extension (vLLM's)")
    guided_regex: str | None = Field(default=None, description="extension (vLLM's older name)")
    guided_json: dict[str, Any] | str | None = Field(default=None, description="extension (vLLM's older name)")
    min_tokens: int | None = Field(default=None, description="extension (vLLM's): no EOS / stop token before")
    logit_bias: dict[str, float] | None = Field(default=None, description="token id (a string) -> bias [-100, 100]")
    # Metadata that does not change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def _refuse_unsupported(self) -> None:
        if self.n < 1:
            raise InvalidArgument("n", f"must be >= 1, got {self.n}")

    def _base_spec(self, max_tokens: int | None, default_max_tokens: int) -> RequestSpec:
        spec = self.speculation or Speculation()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _, grammar_kind, grammar = self.constraint()
        return RequestSpec(
            max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            drafter=spec.drafter,
            max_draft_tokens=spec.max_draft_tokens,
            adaptive=spec.adaptive,
            overlap=spec.overlap,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            grammar_kind=grammar_kind,
            grammar=grammar,
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens,
        )

    def constraint(self) -> tuple[str, str, str]:
        """-> (the param it came from, grammar_kind, grammar): response_format, vLLM's
        structured_outputs, or its older guided_regex / guided_json; at most one of them."""
        given: list[tuple[str, str, str]] = []
        if self.response_format is not None:
            kind, source = self.response_format.constraint()
            given += [("response_format", kind, source)] if kind else []
        if self.structured_outputs is not None:
            param, kind, source = self.structured_outputs.constraint()
            given += [(param, kind, source)] if kind else []
        if self.guided_regex is not None:
            given.append(("guided_regex", "regex", self.guided_regex))
        if self.guided_json is not None:
            given.append(("guided_json", "json_schema", _schema_text(self.guided_json)))
        if len(given) > 1:
            names = ", ".join(param for param, _, _ in given)
            raise InvalidArgument(given[1][0], f"one constraint per request, got {names}")
        return given[0] if given else ("", "", "")

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's keys are token ids as strings."""
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            if not key.strip().isdigit():
                raise InvalidArgument("logit_bias", f"keys are token ids, got {key[:40]!r}")
            out[int(key)] = bias
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_specs(self, max_new_tokens_cap: int) -> list[RequestSpec]:
        """One spec per choice, prompt-major (choice index = prompt index × n + j); without
        max_tokens, OpenAI's default of 16."""
        self._refuse_unsupported()
        if self.echo:
            raise NotSupported("echo")
        if self.suffix:
            raise NotSupported("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise NotSupported("best_of", "other than n")
        prompts = _prompts(self.prompt)
        _check_choices(len(prompts) * self.n)
        base = self._base_spec(self.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        base.logprobs = self.logprobs  # the chosen token's and this many alternatives (0..20)
        specs = []
        for prompt in prompts:
            for j in range(self.n):
                spec = _with_seed(base, j)
                if isinstance(prompt, str):
                    spec.prompt = prompt
                else:
                    spec.token_ids = list(prompt)
                specs.append(spec)
        return specs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: refused below if they matter
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def to_specs(self, max_new_tokens_cap: int) -> list[RequestSpec]:
        """One spec per choice; without max_(completion_)tokens, up to the server's cap (and
        the context: a reply that fills it finishes with `length`), as OpenAI does."""
        self._refuse_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs: true")
        if self.tools:
            raise NotSupported("tools")
        if self.tool_choice not in (None, "none"):
            raise NotSupported("tool_choice")
        _check_choices(self.n)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        base = self._base_spec(max_tokens, max_new_tokens_cap)
        base.logprobs = (self.top_logprobs or 0) if self.logprobs else None
        base.messages = [_message(i, m) for i, m in enumerate(self.messages)]
        return [_with_seed(base, j) for j in range(self.n)]


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> Sequence[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]  # one prompt of token ids
    return prompt  # type: ignore[return-value]  # several prompts (strings or token-id lists)


def _check_choices(count: int) -> None:
    if count > MAX_CHOICES:
        raise InvalidArgument("n", f"at most {MAX_CHOICES} completions per request (prompts × n), got {count}")


def _with_seed(base: RequestSpec, j: int) -> RequestSpec:
    """Choice j of n: with a seed, choice j samples with seed + j (choice 0 is what n=1 gives)."""
    spec = dataclasses.replace(base, stop=list(base.stop), stop_token_ids=list(base.stop_token_ids))
    if spec.seed is not None and j:
        spec.seed = (spec.seed + j) % (1 << 64)
    return spec


def _message(i: int, m: ChatMessage) -> dict[str, str]:
    extra = set(m.model_extra or {}) - {"name"}
    if extra:
        raise NotSupported(f"messages[{i}].{sorted(extra)[0][:40]}")
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.type != "text" or part.text is None:
                raise NotSupported(f"messages[{i}].content", f"parts of type {part.type[:40]!r}")
            texts.append(part.text)
        content = "".join(texts)
    else:
        content = m.content or ""
    return {"role": ROLE_ALIASES.get(m.role, m.role), "content": content}


_INDEXED = re.compile(r"^chat\.messages")


def param_for(field: str, request: BaseModel | None) -> str:
    """The OpenAI parameter a core field (as the proto spells it) came from."""
    if field == "decoding.logprobs":
        return "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
    if field == "decoding.max_new_tokens":
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens"
    if field in ("input", "chat"):
        return "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    if field == "token_ids.ids":
        return "prompt"
    if field.startswith("decoding.constraint"):
        param = request.constraint()[0] if isinstance(request, _Sampling) else ""
        return param or "response_format"
    if field == "decoding.min_tokens_ids":
        return "min_tokens"
    if _INDEXED.match(field):
        return _INDEXED.sub("messages", field)
    return field.removeprefix("decoding.")


def usage(prompt_tokens: int, stats: Sequence[SpecStats]) -> dict[str, Any]:
    """OpenAI's usage plus `speculation`: the request's draft statistics (all choices)."""
    completion = sum(s.generated_tokens for s in stats)
    proposed = sum(s.proposed_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    steps = sum(s.steps for s in stats)
    drafters = sorted({s.drafter for s in stats}) or ["none"]
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "speculation": {
            "drafter": drafters[0] if len(drafters) == 1 else ",".join(drafters),
            "proposed_tokens": proposed,
            "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / proposed, 6) if proposed else 0.0,
            "mean_accepted_length": round(completion / steps, 6) if steps else 0.0,
            "steps": steps,
        },
    }


def prompt_tokens(stats: Sequence[SpecStats], n: int) -> int:
    """Each prompt counted once, however many choices it had (choices are prompt-major)."""
    return sum(s.prompt_tokens for s in stats[::n])


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(kind: str, rid: str, model: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()) if created is None else created,
        "model": model,
        "system_fingerprint": None,
    }


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
