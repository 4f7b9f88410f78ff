"""Per-request speculation counters, summed from the loop's step records; rates are
derived where they are read. The one place a request's statistics are shaped: the
services convert this to and from protobuf (`rpc/convert.py`), the CLI prints `as_dict`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specdec.core.loop import Step


@dataclass
class SpecStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    proposed_tokens: int = 0  # draft tokens sent to the verifier
    accepted_tokens: int = 0  # draft tokens it kept
    steps: int = 0  # verification steps
    batch_size_sum: int = 0  # sum over steps of the verify batch size
    predrafts: int = 0  # next-step drafts made while a step was being verified
    predrafts_used: int = 0  # ... that turned out valid and were used
    steps_without_drafter: int = 0  # steps decoded plainly because no replica served the drafter
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    drafter: str = "none"

    def record(self, step: Step) -> None:
        self.steps += 1
        self.proposed_tokens += step.proposed
        self.accepted_tokens += step.accepted
        self.generated_tokens += len(step.tokens)
        self.batch_size_sum += step.batch_size
        self.predrafts += step.predrafted
        self.predrafts_used += step.used_predraft
        self.steps_without_drafter += step.drafter_unavailable

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per step: accepted drafts plus the target's own token."""
        return self.generated_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mean_verify_batch_size(self) -> float:
        return self.batch_size_sum / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "proposed_tokens": self.proposed_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "steps": self.steps,
            "ttft_s": round(self.ttft_s, 4),
            "elapsed_s": round(self.elapsed_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "mean_verify_batch_size": round(self.mean_verify_batch_size, 3),
            "drafter": self.drafter,
            "predrafts": self.predrafts,
            "predrafts_used": self.predrafts_used,
            "steps_without_drafter": self.steps_without_drafter,
        }
