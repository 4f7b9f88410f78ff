"""Sampling parameters and logits processing.

Temperature, top-k, top-p and min-p are applied to the target's and the drafter's logits
alike, *before* the rejection test, so both sides speak about the same distribution. The
penalties (core/penalties.py) and a structured-output constraint (core/grammar.py) act on
the logits before these, each row seeing the tokens before it.
"""

from __future__ import annotations

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Some penalty changes the logits (the plain path skips all of that work)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

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
        self._validate_grammar(prefix)
        return self

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
    `probs_from_logits_rows`. A filter lists only the rows it applies to, as the per-request
    `probs_from_logits` skips a filter that is off (renormalising would change the bits)."""

    temperature: torch.Tensor  # [rows, 1] float64, > 0 (sampled rows only)
    top_k_rows: torch.Tensor  # [num_top_k] int64: rows with 0 < top_k < vocab
    top_k: torch.Tensor  # [num_top_k, 1] int64: their k
    max_top_k: int  # the largest of those k; 0 = no row filters by top-k
    top_p_rows: torch.Tensor  # [num_top_p] int64: rows with top_p < 1
    top_p: torch.Tensor  # [num_top_p, 1] float64
    min_p_rows: torch.Tensor  # [num_min_p] int64: rows with min_p > 0
    min_p: torch.Tensor  # [num_min_p, 1] float64

    @classmethod
    def build(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> RowSampling:
        """Row r sampled with params[r] (none greedy); two host->device copies."""
        assert not any(p.greedy for p in params), "greedy rows have no distribution to process"
        k_rows = [r for r, p in enumerate(params) if 0 < p.top_k < vocab]
        p_rows = [r for r, p in enumerate(params) if p.top_p < 1.0]
        m_rows = [r for r, p in enumerate(params) if p.min_p > 0.0]
        top_k = [params[r].top_k for r in k_rows]
        temperature, top_p, min_p = to_device_split(
            [[p.temperature for p in params], [params[r].top_p for r in p_rows], [params[r].min_p for r in m_rows]],
            torch.float64,
            device,
        )
        k_rows_t, top_k_t, p_rows_t, m_rows_t = to_device_split([k_rows, top_k, p_rows, m_rows], torch.int64, device)
        return cls(
            temperature[:, None], k_rows_t, top_k_t[:, None], max(top_k, default=0),
            p_rows_t, top_p[:, None], m_rows_t, min_p[:, None],
        )  # fmt: skip


def probs_from_logits_rows(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """`probs_from_logits` for rows with their own parameters, in tensor ops on the logits'
    device (no host read): bit-identical row by row to the per-request function, which
    stays the reference (the same ops in the same order on each row)."""
    logits = logits.to(torch.float64) / rows.temperature
    if rows.max_top_k:
        sub = logits[rows.top_k_rows]
        # The k-th largest value, as topk(k).values[-1] finds it.
        kth = torch.topk(sub, rows.max_top_k, dim=-1).values.gather(-1, rows.top_k - 1)
        logits = logits.index_copy(0, rows.top_k_rows, sub.masked_fill(sub < kth, -math.inf))
    probs = torch.softmax(logits, dim=-1)
    if rows.top_p_rows.numel():
        sub = probs[rows.top_p_rows]
        sorted_probs, order = torch.sort(sub, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter(-1, order, mass_before >= rows.top_p)
        sub = sub.masked_fill(drop, 0.0)
        probs = probs.index_copy(0, rows.top_p_rows, sub / sub.sum(dim=-1, keepdim=True))
    if rows.min_p_rows.numel():
        sub = probs[rows.min_p_rows]
        floor = rows.min_p * sub.max(dim=-1, keepdim=True).values
        sub = sub.masked_fill(sub < floor, 0.0)
        probs = probs.index_copy(0, rows.min_p_rows, sub / sub.sum(dim=-1, keepdim=True))
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
