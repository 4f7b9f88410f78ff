"""Resuming a request from its session record, on whichever coordinator the client reaches.

A client whose stream broke sends the same request again, with its request_id and the
number of tokens it holds (`resume_from`). The coordinator that takes it over continues
the record's loop: prompt + committed tokens become the new prompt context, so every
position, and with it every counter-based random number, is where it was; the seed is the
one recorded, max_new_tokens is what remains, the stop conditions are the recorded ones.
`Delivery` then decides what the client still lacks: tokens after the ones it holds, and
only the text those add (the detokenizer's text for the held tokens is never re-sent).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import fields

from specdec.core.detokenize import IncrementalDetokenizer
from specdec.core.drafters.registry import parse_drafter
from specdec.core.loop import GenerationRequest
from specdec.core.request import MAX_DRAFT_TOKENS, RequestSpec
from specdec.core.sampling import SamplingParams
from specdec.core.stats import SpecStats
from specdec.core.tokenizer import Decoder
from specdec.state.sessions import SessionRecord

COUNTERS = tuple(f.name for f in fields(SpecStats) if f.name not in ("drafter", "prompt_tokens"))


class CannotResume(Exception):
    """The client holds tokens this coordinator cannot continue exactly (FAILED_PRECONDITION)."""


class RunningElsewhere(Exception):
    """Another coordinator runs this request_id and did not let go of it (ABORTED)."""


def fingerprint(spec: RequestSpec) -> str:
    """What a request asks for (input and parameters as the caller sent them, request_id
    aside): a resumed request must be the same request. Linear in the prompt's size, so a
    server computes it off its event loop."""
    body = {k: v for k, v in vars(spec).items() if k != "request_id"}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    return hashlib.blake2b(raw, digest_size=16, person=b"specdec-fp-v1").hexdigest()


def released_text(tokenizer: Decoder, stops: list[str], token_ids: list[int], final: bool = False) -> str:
    """The text a stream has released once it has delivered `token_ids` (held back: an
    incomplete character, a possible start of a stop string, unless `final`)."""
    return IncrementalDetokenizer(tokenizer, stops).add(token_ids, final=final).text


def finish_reason(record: SessionRecord, max_context: int, text_stopped: bool) -> str | None:
    """Why a record's generation has ended, or None while it has not: the coordinator may
    have died after its last step but before it wrote `done`. Checked as the loop and the
    detokenizer check a step: stop string, stop token, length, context."""
    if record.state == "done":
        return record.finish_reason
    generated = record.generated_ids
    if text_stopped or (generated and generated[-1] in record.stop_token_ids):
        return "stop"
    if len(generated) >= record.max_new_tokens:
        return "length"
    if generated and len(record.prompt_ids) + len(generated) >= max_context:
        return "context"
    return None


def request_from_record(record: SessionRecord, session_id: str, max_context: int) -> GenerationRequest:
    """The loop's request that continues the record where it stopped (ValueError or
    InvalidArgument when the record does not describe one)."""
    s = record.sampling
    sampling = SamplingParams(
        temperature=float(s["temperature"]), top_k=int(s["top_k"]), top_p=float(s["top_p"]), seed=int(s["seed"])
    ).validate("sampling.")
    if not 1 <= record.max_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"max_draft_tokens {record.max_draft_tokens}")
    remaining = record.max_new_tokens - len(record.generated_ids)
    if remaining < 1:
        raise ValueError("nothing left to generate")
    return GenerationRequest(
        session_id=session_id,
        prompt_ids=[*record.prompt_ids, *record.generated_ids],
        max_new_tokens=remaining,
        sampling=sampling,
        drafter=parse_drafter(record.drafter, "drafter"),
        max_draft_tokens=record.max_draft_tokens,
        adaptive=record.adaptive,
        stop_token_ids=frozenset(record.stop_token_ids),
        max_context=max_context,
        overlap=record.overlap,
    )


def stats_counters(stats: SpecStats) -> dict[str, float]:
    """What a record keeps of a request's statistics: the counters, summed across resumes."""
    return {name: getattr(stats, name) for name in COUNTERS}


def merged_stats(before: dict[str, float], after: SpecStats, prompt_tokens: int) -> SpecStats:
    """Statistics of a whole request: what the record had before the resume, plus the
    resumed run's. Time to first token is the first run's when it had produced one."""
    merged = SpecStats(prompt_tokens=prompt_tokens, drafter=after.drafter)
    for name in COUNTERS:
        kind = type(getattr(merged, name))
        setattr(merged, name, kind(before.get(name, 0)) + getattr(after, name))
    merged.ttft_s = float(before.get("ttft_s", 0.0)) if before.get("generated_tokens") else after.ttft_s
    return merged


class Delivery:
    """What a stream still owes its client, which holds the first `held` tokens (and the
    text released with them). Fed the whole output in order (tokens, and the text released
    with them), it answers the part to send: the tokens past `held` and the text they add.
    When the client holds tokens the feed has not reached yet (a record written a step
    behind the stream), they are regenerated and skipped."""

    def __init__(self, held: int, text_for: Callable[[list[int]], str]) -> None:
        self.held = held  # tokens the client holds
        self.tokens: list[int] = []
        self.text = ""  # text released for self.tokens
        self._text_for = text_for  # text a stream releases with these tokens delivered
        self._held_chars: int | None = 0 if held == 0 else None  # characters the client holds

    def add(self, tokens: list[int], text: str) -> tuple[list[int], str] | None:
        """(tokens, text) to send now, or None when the client holds all of it already."""
        if len(self.tokens) == self.held and self._held_chars is None:
            self._held_chars = len(self.text)  # the feed passes exactly where the client stopped
        start = len(self.tokens)
        self.tokens.extend(tokens)
        self.text += text
        if len(self.tokens) <= self.held:
            return None
        if self._held_chars is None:  # the client stopped inside this step: its text there
            self._held_chars = len(self._text_for(self.tokens[: self.held]))
        out = self.tokens[max(start, self.held) :], self.text[self._held_chars :]
        self.held, self._held_chars = len(self.tokens), len(self.text)
        return out
