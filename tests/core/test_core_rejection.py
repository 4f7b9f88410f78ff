"""Rejection sampling is exact (Leviathan et al. 2023, arXiv 2211.17192).

First exactly, from the algorithm's own pieces: the probability of every output token,
sum_x q(x) [a(x) 1{x = y} + (1 - a(x)) r(y)], must equal the processed target p. Then
empirically, over many seeds of the counter-based RNG, with `rejection_sample` itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from specdec.core.rejection import (
    RejectionInput,
    acceptance_probability,
    one_hot,
    recovery_distribution,
    rejection_sample,
)
from specdec.core.rng import Purpose, sample_index, uniform
from specdec.core.sampling import SamplingParams, probs_from_logits, quantize_f16

PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=7, top_p=0.9),
]


def random_logits(seed: int, rows: int, vocab: int, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale


def exact_output_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(first output token = y), composed from acceptance_probability and
    recovery_distribution: draw x ~ q; keep it w.p. a(x), else draw from r."""
    out = torch.zeros_like(p)
    for x in range(p.shape[0]):
        if q[x] <= 0:
            continue
        a = acceptance_probability(p, q, x)
        out[x] += q[x] * a
        out += q[x] * (1 - a) * recovery_distribution(p, q)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exact_distribution_from_the_algorithms_pieces(seed: int, k: int) -> None:
    vocab = 8 + (seed * 3 + k) % 13  # 8..20
    params = PARAMS[(seed + k) % len(PARAMS)]
    p_all = probs_from_logits(random_logits(seed, k + 1, vocab), params)
    q_all = probs_from_logits(random_logits(1000 + seed, k, vocab), params)
    for i in range(k):  # every draft position is the same one-step problem
        p, q = p_all[i], q_all[i]
        assert torch.allclose(exact_output_distribution(p, q), p, atol=1e-6, rtol=0)
        # A deterministic drafter is a one-hot q, for any token it may propose.
        for token in range(vocab):
            assert torch.allclose(exact_output_distribution(p, one_hot(token, vocab)), p, atol=1e-6, rtol=0)
        # Quantised to float16 (the wire format), q is still a distribution, and exactness
        # holds for the quantised q the drafter samples from.
        q16 = quantize_f16(q)
        assert math.isclose(float(q16.sum()), 1.0, abs_tol=1e-12)
        assert torch.allclose(q16, q, atol=1e-3, rtol=0)
        assert torch.allclose(exact_output_distribution(p, q16), p, atol=1e-6, rtol=0)
    # The pieces themselves.
    p, q = p_all[0], q_all[0]
    x = int(torch.argmax(q))
    assert math.isclose(acceptance_probability(p, q, x), min(1.0, float(p[x] / q[x])))
    r = recovery_distribution(p, q)
    assert math.isclose(float(r.sum()), 1.0, abs_tol=1e-12)
    assert bool(torch.all(r[p <= q] == 0))
    assert torch.equal(recovery_distribution(p, p), p)


def test_draft_token_the_drafter_could_not_draw_is_rejected() -> None:
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert acceptance_probability(p, q, 0) == 0.0
    assert acceptance_probability(p, q, 1) == 0.5
    assert torch.allclose(recovery_distribution(p, q), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def _chi2_pvalue(observed: list[int], probs: torch.Tensor) -> float:
    """Goodness of fit; categories with small expected counts are pooled. A token with
    probability 0 that was observed fails outright (p-value 0)."""
    n = sum(observed)
    exp = [float(pr) * n for pr in probs]
    if any(o > 0 and e == 0 for o, e in zip(observed, exp)):
        return 0.0
    obs_big, exp_big, obs_rest, exp_rest = [], [], 0, 0.0
    for o, e in zip(observed, exp):
        if e >= 5:
            obs_big.append(o)
            exp_big.append(e)
        else:
            obs_rest += o
            exp_rest += e
    if exp_rest > 0:
        obs_big.append(obs_rest)
        exp_big.append(exp_rest)
    scale = sum(obs_big) / sum(exp_big)
    return float(chisquare(obs_big, [e * scale for e in exp_big]).pvalue)


def _draft(q: torch.Tensor, seed: int, pos: int) -> list[int]:
    return [sample_index(q[i], uniform(seed, pos + i, Purpose.DRAFT)) for i in range(q.shape[0])]


@pytest.mark.parametrize("case", range(4))
def test_rejection_sample_matches_target_empirically(case: int) -> None:
    k = case + 1
    vocab = [10, 16, 12, 20][case]
    params = PARAMS[case]
    pos = 17 + 5 * case
    target_logits = random_logits(50 + case, k + 1, vocab).float()
    draft_logits = random_logits(80 + case, k, vocab).float()
    p = probs_from_logits(target_logits, params)
    # The drafter processes its logits with the same parameters, ships float16.
    q = quantize_f16(probs_from_logits(draft_logits, params))
    n = 3000
    first = [0] * vocab
    second = [0] * vocab  # the token after an accepted first draft comes from p[1]
    drafted = [0] * vocab
    accepted_first = 0
    items = []
    for s in range(n):
        seed = 1_000_003 * s + case
        items.append(
            RejectionInput(
                target_logits,
                _draft(q, seed, pos),
                q,
                params.__class__(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed),
                pos,
            )
        )
    for item, out in zip(items, [rejection_sample(item) for item in items]):
        assert 0 <= out.num_accepted <= k
        assert len(out.tokens) == out.num_accepted + 1
        assert out.tokens[: out.num_accepted] == item.draft_tokens[: out.num_accepted]
        first[out.tokens[0]] += 1
        drafted[item.draft_tokens[0]] += 1
        if out.num_accepted >= 1:
            accepted_first += 1
            second[out.tokens[1]] += 1
    assert _chi2_pvalue(first, p[0]) > 1e-3
    assert _chi2_pvalue(second, p[1]) > 1e-3
    # The test has power: the raw draft tokens (from q, not p) fail it.
    assert _chi2_pvalue(drafted, p[0]) < 1e-6
    # Acceptance rate at the first position is sum_x min(p(x), q(x)).
    expected = float(torch.minimum(p[0], q[0]).sum())
    assert abs(accepted_first / n - expected) < 4.5 * math.sqrt(expected * (1 - expected) / n) + 1e-9


@pytest.mark.parametrize("params", PARAMS[:2], ids=["t1", "t07k5"])
def test_one_hot_drafts_match_target_empirically(params: SamplingParams) -> None:
    """A deterministic drafter (q one-hot, draft_probs None) proposing the same token every
    time: the output must still follow p."""
    vocab, pos = 12, 40
    logits = random_logits(7, 3, vocab).float()
    p = probs_from_logits(logits, params)
    fixed_draft = [int(torch.argmax(p[0])), int(torch.argmin(p[1]))]
    counts = [0] * vocab
    for s in range(3000):
        sp = SamplingParams(params.temperature, params.top_k, params.top_p, seed=s)
        out = rejection_sample(RejectionInput(logits, fixed_draft, None, sp, pos))
        counts[out.tokens[0]] += 1
    assert _chi2_pvalue(counts, p[0]) > 1e-3


def test_bonus_token_follows_last_target_distribution() -> None:
    """q == p: every draft is accepted and the bonus token is drawn from p[k]."""
    vocab, k, pos = 14, 2, 3
    params = SamplingParams(temperature=1.0)
    logits = random_logits(11, k + 1, vocab).float()
    p = probs_from_logits(logits, params)
    counts = [0] * vocab
    for s in range(3000):
        draft = _draft(p[:k], s, pos)
        out = rejection_sample(RejectionInput(logits, draft, p[:k].clone(), SamplingParams(1.0, seed=s), pos))
        assert out.num_accepted == k
        counts[out.tokens[k]] += 1
    assert _chi2_pvalue(counts, p[k]) > 1e-3


def test_same_seed_same_output_and_seeds_matter() -> None:
    vocab, k, pos = 16, 4, 9
    params = SamplingParams(temperature=1.0, seed=12345)
    logits = random_logits(3, k + 1, vocab).float()
    q = quantize_f16(probs_from_logits(random_logits(4, k, vocab).float(), params))
    draft = _draft(q, params.seed, pos)
    item = RejectionInput(logits, draft, q, params, pos)
    first = rejection_sample(item)
    for _ in range(3):
        again = rejection_sample(RejectionInput(logits.clone(), list(draft), q.clone(), params, pos))
        assert (again.num_accepted, again.tokens) == (first.num_accepted, first.tokens)
    outs = {
        tuple(rejection_sample(RejectionInput(logits, _draft(q, s, pos), q, SamplingParams(1.0, seed=s), pos)).tokens)
        for s in range(50)
    }
    assert len(outs) > 5
    # The generator is a pure function of its key; purposes and positions are distinct streams.
    assert uniform(5, 6, Purpose.ACCEPT) == uniform(5, 6, Purpose.ACCEPT)
    assert (
        len(
            {
                uniform(5, 6, Purpose.ACCEPT),
                uniform(5, 6, Purpose.DRAFT),
                uniform(5, 6, Purpose.RESAMPLE),
                uniform(5, 7, Purpose.ACCEPT),
                uniform(6, 6, Purpose.ACCEPT),
            }
        )
        == 5
    )
    assert all(0.0 <= uniform(s, 0, Purpose.DRAFT) < 1.0 for s in range(100))


def test_greedy_is_argmax_match() -> None:
    vocab, k = 20, 4
    logits = random_logits(21, k + 1, vocab).float()
    argmax = logits.argmax(dim=-1).tolist()
    greedy = SamplingParams(temperature=0.0, seed=99)
    wrong = (argmax[2] + 1) % vocab
    out = rejection_sample(RejectionInput(logits, [argmax[0], argmax[1], wrong, argmax[3]], None, greedy, 5))
    assert (out.num_accepted, out.tokens) == (2, argmax[:3])
    out = rejection_sample(RejectionInput(logits, argmax[:k], None, greedy, 5))
    assert (out.num_accepted, out.tokens) == (k, argmax)
    out = rejection_sample(RejectionInput(logits[:1], [], None, greedy, 5))
    assert (out.num_accepted, out.tokens) == (0, argmax[:1])
    first_wrong = (argmax[0] + 3) % vocab
    out = rejection_sample(RejectionInput(logits, [first_wrong] + argmax[1:k], None, greedy, 5))
    assert (out.num_accepted, out.tokens) == (0, argmax[:1])
    # Greedy probabilities are the one-hot argmax, so the general test degenerates to it.
    probs = probs_from_logits(logits, greedy)
    assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))
    assert torch.equal(probs.sum(dim=-1), torch.ones(k + 1, dtype=torch.float64))


def test_probs_from_logits_processing() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    plain = probs_from_logits(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(plain, torch.softmax(logits.double(), -1))
    hot = probs_from_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(hot, torch.softmax(logits.double() / 0.5, -1))
    top2 = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (top2[0] > 0).tolist() == [True, False, True, False, False]
    assert torch.allclose(top2[0, [0, 2]], torch.softmax(torch.tensor([3.0, 2.0], dtype=torch.float64), -1))
    # top-p: the smallest prefix (by probability) whose mass reaches top_p.
    sorted_mass = plain[0].sort(descending=True).values.cumsum(0)
    top_p = float(sorted_mass[1]) - 1e-9  # needs exactly the two largest
    nucleus = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert (nucleus[0] > 0).tolist() == [True, False, True, False, False]
    assert math.isclose(float(nucleus.sum()), 1.0)
    tiny = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert tiny[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # the top token always stays
    big_k = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=50))
    assert torch.allclose(big_k, plain)


def test_sample_index_inverse_cdf() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0], dtype=torch.float64)
    assert sample_index(probs, 0.0) == 1
    assert sample_index(probs, 0.2499) == 1
    assert sample_index(probs, 0.2501) == 3
    assert sample_index(probs, 1.0 - 2**-53) == 3
    assert sample_index(probs, 1.0) == 3  # rounding past the end never picks a zero entry
    counts = [0] * 5
    for s in range(2000):
        counts[sample_index(probs, uniform(s, 0, Purpose.DRAFT))] += 1
    assert counts[0] == counts[2] == counts[4] == 0
    assert _chi2_pvalue(counts, probs) > 1e-3
