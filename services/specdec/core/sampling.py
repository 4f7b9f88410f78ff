"""Sampling parameters and logits processing.

Temperature, top-k, top-p and min-p are applied to the target's and the drafter's logits
alike, *before* the rejection test, so both sides speak about the same distribution. The
penalties (core/penalties.py) and a structured-output constraint (core/grammar.py) act on
the logits before these, each row seeing the tokens before it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from specdec.core.errors import InvalidArgument
from specdec.core.transfer import to_device_split

MAX_TOP_K = 1 << 20
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0
MAX_GRAMMAR_CHARS = 1 << 16  # a JSON schema or a regex
GRAMMAR_KINDS = ("", "json_object", "json_schema", "regex")
MAX_LOGIT_BIAS = 100.0  # |bias| (OpenAI's range)
MAX_LOGIT_BIAS_TOKENS = 1024  # biased tokens per request (OpenAI allows 300)
MAX_MIN_TOKENS = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # (0, 1]; 1 = off
    seed: int = 0  # keys the counter-based generator with the token position
    min_p: float = 0.0  # [0, 1]: drop tokens less likely than min_p x the most likely one; 0 = off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among the generated tokens
    repetition_penalty: float = 1.0  # HF's: divides (>0) or multiplies (<0) the logit of prompt and output tokens
    # The session's first prompt_len tokens are the prompt: presence and frequency count
    # only the tokens after them (the output), repetition all of them.
    prompt_len: int = 0
    grammar_kind: str = ""  # "" (none) | "json_object" | "json_schema" | "regex"
    grammar: str = ""  # the JSON schema (as JSON text) or the regex; "" for json_object
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) added to that token's logit, ids ascending.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's min_tokens: the min_tokens_ids (EOS and the stop token ids) are masked until
    # this many tokens were generated (counted after prompt_len).
    min_tokens: int = 0
    min_tokens_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Some penalty, a logit bias or min_tokens changes the logits (the plain path
        skips all of that work; core/penalties.py applies them)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or bool(self.logit_bias)
            or (self.min_tokens > 0 and bool(self.min_tokens_ids))
        )

    @property
    def constrained(self) -> bool:
        return self.grammar_kind != ""

    def validate(self, prefix: str = "") -> SamplingParams:
        """Raise InvalidArgument naming the bad field; return self when valid."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(prefix + "temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.temperature > 100:
            raise InvalidArgument(prefix + "temperature", f"must be <= 100, got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument(prefix + "top_k", f"must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidArgument(prefix + "top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 1 << 64:
            raise InvalidArgument(prefix + "seed", "must fit in 64 bits")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise InvalidArgument(prefix + "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise InvalidArgument(prefix + name, f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise InvalidArgument(
                prefix + "repetition_penalty",
                f"must be in (0, {MAX_REPETITION_PENALTY}], got {self.repetition_penalty}",
            )
        if self.prompt_len < 0:
            raise InvalidArgument(prefix + "prompt_len", f"must be >= 0, got {self.prompt_len}")
        self._validate_bias(prefix)
        self._validate_grammar(prefix)
        return self

    def _validate_bias(self, prefix: str) -> None:
        """logit_bias and min_tokens; token ids against the vocabulary: core/checks.py."""
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise InvalidArgument(prefix + "logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                bounds = f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
                raise InvalidArgument(prefix + "logit_bias", f"token {token}: must be in {bounds}, got {bias}")
        ids = [token for token, _ in self.logit_bias]
        if any(b <= a for a, b in itertools.pairwise(ids)):
            raise InvalidArgument(prefix + "logit_bias", "token ids must be distinct, ascending")
        if not 0 <= self.min_tokens <= MAX_MIN_TOKENS:
            raise InvalidArgument(prefix + "min_tokens", f"must be in [0, {MAX_MIN_TOKENS}], got {self.min_tokens}")

    def _validate_grammar(self, prefix: str) -> None:
        if self.grammar_kind not in GRAMMAR_KINDS:
            raise InvalidArgument(prefix + "constraint", f"unknown kind {self.grammar_kind[:40]!r}")
        if not self.grammar_kind:
            if self.grammar:
                raise InvalidArgument(prefix + "constraint", "a grammar without a kind")
            return
        if len(self.grammar) > MAX_GRAMMAR_CHARS:
            raise InvalidArgument(prefix + "constraint." + self.grammar_kind, f"at most {MAX_GRAMMAR_CHARS} characters")
        from specdec.core.grammar import check_grammar  # the grammar engine loads only when a request uses it

        error = check_grammar(self.grammar_kind, self.grammar)
        if error:
            raise InvalidArgument(prefix + "constraint." + self.grammar_kind, error[:300])


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [n, vocab] -> float64 probabilities [n, vocab] after temperature, top-k,
    top-p, then min-p (vLLM's order).

    Greedy parameters give the one-hot of the argmax, so the rejection test degenerates to
    an exact argmax match.
    """
    logits = logits.to(torch.float64)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(torch.float64)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if params.min_p > 0.0:
        # The most likely token always stays (p >= min_p * p with min_p <= 1).
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass
class RowSampling:
    """Each row's temperature, top-k, top-p and min-p, on the logits' device, for
    `probs_from_logits_rows`."""

    params: list[SamplingParams]  # per row, on the host (which filters to run at all)
    vocab: int
    temperature: torch.Tensor  # [rows, 1] float64, > 0 (sampled rows only)
    top_k: torch.Tensor  # [rows, 1] int64; 0 = off (as is a top_k >= vocab)
    top_p: torch.Tensor  # [rows, 1] float64; 1 = off
    min_p: torch.Tensor  # [rows, 1] float64; 0 = off

    @classmethod
    def build(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> RowSampling:
        """Row r sampled with params[r] (none greedy); two host->device copies."""
        assert not any(p.greedy for p in params), "greedy rows have no distribution to process"
        temperature, top_p, min_p = to_device_split(
            [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]],
            torch.float64,
            device,
        )
        (top_k,) = to_device_split([[_top_k(p, vocab) for p in params]], torch.int64, device)
        return cls(params, vocab, temperature[:, None], top_k[:, None], top_p[:, None], min_p[:, None])

    def rows(self, start: int, stop: int) -> RowSampling:
        """Rows [start, stop) (views: no copy)."""
        return RowSampling(
            self.params[start:stop], self.vocab, self.temperature[start:stop], self.top_k[start:stop],
            self.top_p[start:stop], self.min_p[start:stop],
        )  # fmt: skip


def _top_k(params: SamplingParams, vocab: int) -> int:
    return params.top_k if 0 < params.top_k < vocab else 0


def probs_from_logits_rows(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """`probs_from_logits` for rows with their own parameters, in tensor ops on the logits'
    device (no host read). Bit-identical row by row to the per-request function, which
    stays the reference: the same ops in the same order on each row; a filter that is off
    for a row is computed and discarded (`where`), as renormalising would change its bits."""
    logits = logits.to(torch.float64) / rows.temperature
    max_top_k = max((_top_k(p, rows.vocab) for p in rows.params), default=0)
    if max_top_k:
        # The k-th largest value, as topk(k).values[-1] finds it.
        kth = torch.topk(logits, max_top_k, dim=-1).values.gather(-1, (rows.top_k - 1).clamp(min=0))
        logits = logits.masked_fill((rows.top_k > 0) & (logits < kth), -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in rows.params):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter(-1, order, mass_before >= rows.top_p)
        cut = probs.masked_fill(drop, 0.0)
        probs = torch.where(rows.top_p < 1.0, cut / cut.sum(dim=-1, keepdim=True), probs)
    if any(p.min_p > 0.0 for p in rows.params):
        cut = probs.masked_fill(probs < rows.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = torch.where(rows.min_p > 0.0, cut / cut.sum(dim=-1, keepdim=True), probs)
    return probs


def quantize_f16(probs: torch.Tensor) -> torch.Tensor:
    """Round a distribution to float16 and renormalise in float64.

    The drafter samples from exactly this distribution and ships the float16 bytes, so the
    target's rejection test uses the very q the draft was drawn from (exactness survives
    the wire format: both ends renormalise with `renormalised_f16`).
    """
    values = probs.detach().to(torch.float16).cpu().numpy()
    return renormalised_f16(values).to(probs.device)


def renormalised_f16(values: np.ndarray) -> torch.Tensor:
    """float16 weights [..., vocab] -> float64 probabilities summing to 1 on the last axis.

    In numpy, because the services call it on their gRPC threads, where a torch op this
    size would start a second OpenMP team (see `core.compute`)."""
    q = values.astype(np.float64)
    return torch.from_numpy(q / q.sum(axis=-1, keepdims=True))
