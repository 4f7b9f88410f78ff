"""A whole generation: the speculation loop plus detokenization, stop strings, timing."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from specdec.core.detokenize import IncrementalDetokenizer
from specdec.core.interfaces import Tiers
from specdec.core.loop import GenerationRequest, Step, speculate
from specdec.core.stats import SpecStats
from specdec.core.tokenizer import Decoder
from specdec.core.types import TokenLogprob


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    step: Step  # the step that committed these tokens


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when the request asked


async def generate_stream(
    request: GenerationRequest, tiers: Tiers, tokenizer: Decoder, stop_strings: list[str], result: GenerationResult
) -> AsyncGenerator[Chunk, None]:
    """Yield one chunk per step as tokens are verified; fill `result` (text, ids, reason, stats)."""
    start = time.perf_counter()
    detok = IncrementalDetokenizer(tokenizer, stop_strings)
    stats = result.stats
    stats.prompt_tokens, stats.drafter = len(request.prompt_ids), str(request.drafter)
    steps = speculate(request, tiers.drafter, tiers.verifier, tiers.costs)
    try:
        async for step in steps:
            stats.record(step)
            if not result.token_ids and step.tokens:
                stats.ttft_s = time.perf_counter() - start
            delta = detok.add(step.tokens, final=step.finish_reason is not None)
            result.token_ids.extend(step.tokens)
            result.logprobs.extend(step.logprobs)
            if delta.stopped:
                result.finish_reason = "stop"
            elif step.finish_reason is not None:
                result.finish_reason = step.finish_reason
            yield Chunk(step.tokens, delta.text, step)
            if delta.stopped:
                break
    finally:
        await steps.aclose()
        stats.elapsed_s = time.perf_counter() - start
        result.text = detok.text


def chunk_logprobs(chunk: Chunk) -> list[TokenLogprob]:
    """The logprobs of the chunk's tokens: the tail of its step's (a resumed delivery may
    hold the head back); empty when the request did not ask for them."""
    n, logprobs = len(chunk.token_ids), chunk.step.logprobs
    return logprobs[len(logprobs) - n :] if n and len(logprobs) >= n else []


async def generate(
    request: GenerationRequest, tiers: Tiers, tokenizer: Decoder, stop_strings: list[str]
) -> GenerationResult:
    result = GenerationResult()
    async for _ in generate_stream(request, tiers, tokenizer, stop_strings, result):
        pass
    return result
