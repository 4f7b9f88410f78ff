"""Draft-length control: speculate only as far as it pays, per request.

The controller keeps two running estimates from the request's own steps:

* how often the first draft token is kept (α₁), and how often a draft token is kept
  when the one before it was (α₂). Acceptance comes in runs: an n-gram draft copying
  text is usually kept whole, one that guessed wrong usually loses its first token. So a
  token i deep is kept with probability α₁·α₂^(i-1), and a k-token draft commits on
  average E(k) = 1 + Σ α₁·α₂^(i-1) tokens, the target's own token included. (One
  per-token rate would badly undervalue long drafts: measured on the bundled prompts,
  this model gave n-gram drafting +3% on the copy prompts and +15% on chat.)
* the cost of a step, base + per_token * k, timed around the draft and the verification
  of real steps. Under load the verifier's queueing and batch cost show up in both.

It also caps k by the target's load: a verification pass costs about the same up to some
number of rows (`row_budget` tokens) and then grows linearly (compute-bound). Each of the
`batch_size` sequences may fill its share of the flat rows (budget/batch - 1 drafts);
past that a drafted row costs as much as any other, and the i-th draft token is worth its
row only if it is likely to be kept: α₁·α₂^(i-1) >= batch_size / row_budget. A
request copying text verbatim keeps drafting far under load while one whose drafts are
kept half the time drafts a token or none, which spends the shared rows where they pay
most, with no coordination between requests.

It picks the k in 0..cap with the most expected tokens per second. k = 0 is plain
decoding, so a request whose drafts do not pay falls back to it instead of getting slower
(the vLLM #17984 failure); a plain step now and then re-measures the base cost, and a
short draft now and then re-measures acceptance (and again at once while those drafts
are all kept, so a request notices within a few steps that its text has become copyable).
"""
from __future__ import annotations

EMA = 0.25  # weight of the newest observation
PROBE_EVERY = 16  # steps between re-measurements of the branch not taken


class DraftLength:
    def __init__(self, max_k: int, adaptive: bool, prior_acceptance: float = 0.7,
                 prior_token_cost: float = 0.2, row_budget: int = 0) -> None:
        if max_k < 0:
            raise ValueError("max_k must be >= 0")
        self.max_k, self.adaptive = max_k, adaptive
        self.first = prior_acceptance  # P(the first draft token is kept)
        self.follow = prior_acceptance  # P(a draft token is kept | the one before it was)
        self.base_s: float | None = None  # time of a plain step
        self.token_cost = prior_token_cost  # extra time per drafted token, relative to base_s
        self.row_budget = row_budget  # 0 = no load cap
        self.load_cap = max_k
        self._steps = 0
        self._since_probe = 0
        self.k = self._best() if adaptive else max_k

    def update(self, proposed: int, accepted: int, step_s: float | None = None, batch_size: int = 1) -> None:
        """Record a step: drafts proposed and accepted, its wall time (None: untimed, e.g.
        the first step, which carries the prefill) and the sequences in its verify pass."""
        self._steps += 1
        if not self.adaptive:
            return
        if proposed:
            self._observe_acceptance(proposed, accepted)
        if self.row_budget:
            self.load_cap = self._load_cap(batch_size)
        if step_s is not None:
            self._observe_cost(proposed, step_s)
        self.k = self._choose(all_kept=proposed > 0 and accepted == proposed)

    def _observe_acceptance(self, proposed: int, accepted: int) -> None:
        self.first += EMA * ((accepted > 0) - self.first)
        # Token j+1 was judged only if token j was kept: min(accepted, proposed - 1) such
        # trials, all kept but the last when the draft was cut short.
        trials = min(accepted, proposed - 1)
        if trials:
            self.follow += EMA * ((accepted - 1 if accepted < proposed else trials) / trials - self.follow)

    def kept_probability(self, i: int) -> float:
        """P(the i-th draft token, 1-based, is kept)."""
        return self.first * self.follow ** (i - 1)

    def _observe_cost(self, proposed: int, step_s: float) -> None:
        if proposed == 0:
            self.base_s = step_s if self.base_s is None else self.base_s + EMA * (step_s - self.base_s)
        elif self.base_s is not None:
            per_token = max(0.0, (step_s / self.base_s - 1.0) / proposed)
            self.token_cost += EMA * (per_token - self.token_cost)

    def _load_cap(self, batch_size: int) -> int:
        """Each sequence's fair share of the flat-cost rows, or beyond it the longest
        draft whose every token is kept with probability >= the load."""
        free = self.row_budget // max(1, batch_size) - 1
        threshold = min(1.0, batch_size / self.row_budget)
        k = 0
        while k < self.max_k and self.kept_probability(k + 1) >= threshold:
            k += 1
        return min(self.max_k, max(free, k))

    def expected_tokens(self, k: int) -> float:
        return 1.0 + sum(self.kept_probability(i) for i in range(1, k + 1))

    def _best(self) -> int:
        return max(range(self.load_cap + 1), key=lambda k: self.expected_tokens(k) / (1.0 + self.token_cost * k))

    def _choose(self, all_kept: bool) -> int:
        self._since_probe += 1
        best = self._best()
        if self.base_s is None and self._steps >= 1:
            return 0  # measure the plain step once, early
        if best == 0 and all_kept:
            return min(2, self.max_k)  # the last probe was all kept: keep probing while the text copies
        if self._since_probe >= PROBE_EVERY:
            self._since_probe = 0
            # Re-measure the branch not taken. A short draft probes acceptance even past
            # the load cap: it only moves when something is drafted, and a request stuck
            # at k = 0 would otherwise never notice that its text became copyable again.
            return 0 if best > 0 else min(2, self.max_k)
        return best
