"""Checks every tier applies to what it receives, as if a stranger sent it: the client's
request (core/request.py), a propose item (draft worker), a verify item (target worker).
A failure is an InvalidArgument naming the field."""

from __future__ import annotations

from specdec.core.errors import InvalidArgument
from specdec.core.sampling import SamplingParams

MAX_ITEM_DRAFT_TOKENS = 64  # per tier item: far above any useful draft, it bounds one item's rows


def check_ids(field: str, ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(field, f"token id {bad} outside the vocabulary [0, {vocab_size})")


def check_delta(prefix_len: int, sampling: SamplingParams, vocab_size: int | None = None) -> None:
    """The fields every tier item shares: the tokens-as-a-delta prefix and the sampling
    (its token ids against the vocabulary when the tier knows it)."""
    sampling.validate("sampling.")
    if vocab_size is not None:
        check_sampling_ids("sampling.", sampling, vocab_size)
    if prefix_len < 0:
        raise InvalidArgument("prefix_len", f"must be >= 0, got {prefix_len}")


def check_sampling_ids(prefix: str, sampling: SamplingParams, vocab_size: int) -> None:
    """The token ids the sampling names (logit_bias, min_tokens' masked ids) are the model's."""
    check_ids(prefix + "logit_bias", [token for token, _ in sampling.logit_bias], vocab_size)
    check_ids(prefix + "min_tokens_ids", list(sampling.min_tokens_ids), vocab_size)
