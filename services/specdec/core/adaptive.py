"""Draft-length control: speculate only as far as it pays, per request.

The controller keeps two running estimates from the request's own steps: how often the
first draft token is kept (α₁), and how often a draft token is kept when the one before
it was (α₂). Acceptance comes in runs: an n-gram draft copying text is usually kept
whole, one that guessed wrong usually loses its first token. So a token i deep is kept
with probability α₁·α₂^(i-1), and a k-token draft commits on average
E(k) = 1 + Σ α₁·α₂^(i-1) tokens, the target's own token included.

What a step costs comes from the tiers themselves, not from the request's wall clock:
the verifier reports its fitted pass cost, base + row_s × rows (`core/cost.py`), and a
model drafter its own (one pass per drafted token: d_base + d_row × rows). With n
sequences sharing each pass, a step with k drafts costs

    T(k) = k·(d_base + d_row·n) + base + row_s · n · (k + 1)

counting every sequence's rows as if all drafted like this one: under load each extra row
is paid by the whole batch, and a request that only counted its own rows would draft far
past what pays (each one's rows are cheap, everyone's are not). The wall clock could not
tell this: in a shared batch a request's plain step takes as long as the others' drafting.

It picks the k in 0..max_k with the most expected tokens per second, E(k) / T(k). So a
request copying text keeps drafting under load while one whose drafts are rarely kept, or
whose draft model costs as much as the target (an int8 copy of it on a busy CPU), decodes
plainly instead of getting slower (the vLLM #17984 failure). A short draft now and then
re-measures acceptance (and again at once while those drafts are all kept, so a request
notices within a few steps that its text has become copyable), unless drafting would not
pay even if every draft were kept: then only a change in cost brings drafting back.
"""

from __future__ import annotations

from dataclasses import dataclass

EMA = 0.25  # weight of the newest observation
PROBE_EVERY = 16  # steps between re-measurements of acceptance while decoding plainly
PRIOR_TOKEN_COST = 0.2  # a drafted token's cost relative to a plain step, before any report
FLOOR_COST = 0.1  # a model-free drafter keeps drafts that make a step at most this much dearer


@dataclass
class StepCosts:
    """What the tiers reported: with one step (`Step.reported`), or last of all (one object
    shared through a `CostBook` by the requests that use the same drafter, so a new
    request starts from what the others learned instead of drafting blind into a busy tier)."""

    draft_pass_base_s: float = 0.0  # the drafter's cost line per drafted token (0 = not reported)
    draft_row_s: float = 0.0
    pass_base_s: float = 0.0  # the verifier's cost line (0 = not reported yet)
    row_s: float = 0.0
    batch_size: int = 1  # sequences in the last verify pass


class CostBook:
    """The tiers' last reported costs, per drafter. Owned by whoever owns the tiers (the
    embedded engine, the coordinator) and passed to each request's loop."""

    def __init__(self) -> None:
        self._by_drafter: dict[str, StepCosts] = {}

    def for_drafter(self, drafter: str) -> StepCosts:
        return self._by_drafter.setdefault(drafter, StepCosts())


class DraftLength:
    def __init__(
        self,
        max_k: int,
        adaptive: bool,
        prior_acceptance: float = 0.7,
        costs: StepCosts | None = None,
        floor: bool = False,
    ) -> None:
        if max_k < 0:
            raise ValueError("max_k must be >= 0")
        self.max_k, self.adaptive = max_k, adaptive
        self.first = prior_acceptance  # P(the first draft token is kept)
        self.follow = prior_acceptance  # P(a draft token is kept | the one before it was)
        self.costs = costs if costs is not None else StepCosts()
        self.floor = floor
        self._since_probe = 0
        # With no cost reported yet, the first step (it carries the prompt's prefill) drafts
        # nothing rather than paying for k draft passes that may not pay on a busy tier.
        self.k = max_k if not adaptive else max(self._best(), self._floor()) if self.costs.pass_base_s > 0 else 0

    def update(self, proposed: int, accepted: int, reported: StepCosts | None = None) -> None:
        """Record a step: drafts proposed and accepted, and what the tiers reported with it
        (its verify pass's size and cost lines; a cost of 0 = not reported)."""
        if not self.adaptive:
            return
        if proposed:
            self._observe_acceptance(proposed, accepted)
        c, r = self.costs, reported or StepCosts()
        if r.draft_pass_base_s > 0:
            c.draft_pass_base_s, c.draft_row_s = r.draft_pass_base_s, r.draft_row_s
        if r.pass_base_s > 0:
            c.pass_base_s, c.row_s = r.pass_base_s, r.row_s
        c.batch_size = max(1, r.batch_size)
        self.k = max(self._choose(all_kept=proposed > 0 and accepted == proposed), self._floor())

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

    def expected_tokens(self, k: int) -> float:
        return 1.0 + sum(self.kept_probability(i) for i in range(1, k + 1))

    def step_cost(self, k: int) -> float:
        """T(k) in seconds; before the verifier has reported, relative to a plain step."""
        c = self.costs
        if c.pass_base_s <= 0:
            return 1.0 + PRIOR_TOKEN_COST * k
        draft_token_s = c.draft_pass_base_s + c.draft_row_s * c.batch_size
        return k * draft_token_s + c.pass_base_s + c.row_s * c.batch_size * (k + 1)

    def _best(self) -> int:
        return max(range(self.max_k + 1), key=lambda k: self.expected_tokens(k) / self.step_cost(k))

    def _choose(self, all_kept: bool) -> int:
        best = self._best()
        self._since_probe = self._since_probe + 1 if best == 0 else 0
        if best > 0:
            # Everything drafted was kept: one more token next time. Without this a request
            # at k = 1 would never measure α₂ (nothing follows its one token).
            return min(best + 1, self.max_k) if all_kept else best
        if not self._pays_if_always_kept():
            return 0  # would not pay even if every draft were kept: no probe
        if all_kept:
            return min(2, self.max_k)  # the last probe was all kept: keep probing while the text copies
        if self._since_probe >= PROBE_EVERY:
            self._since_probe = 0
            # Acceptance only moves when something is drafted: a request stuck at k = 0
            # would otherwise never notice that its text became copyable.
            return min(2, self.max_k)
        return 0

    def _floor(self) -> int:
        """The draft length a model-free drafter keeps whatever acceptance says: the longest
        whose step costs at most FLOOR_COST more than a plain one at the reported batch
        size. Such a drafter proposes only where its context repeats (nothing otherwise, at
        no cost), so a controller that stopped asking after a run of misses would miss the
        next copy until its probe (offline replay of 48 Spec-Bench outputs: 1.62x plain
        with the floor, 1.52x without); under load the batch's rows price it out."""
        if not self.floor or self.costs.pass_base_s <= 0:
            return 0
        budget = (1 + FLOOR_COST) * self.step_cost(0)
        return max(k for k in range(self.max_k + 1) if self.step_cost(k) <= budget)

    def _pays_if_always_kept(self) -> bool:
        plain = 1.0 / self.step_cost(0)
        return any((1 + k) / self.step_cost(k) > plain for k in range(1, self.max_k + 1))
