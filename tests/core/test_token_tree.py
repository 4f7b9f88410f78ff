"""Token-tree verification: one forward pass over a draft tree scores every root-to-node
path exactly as running that path as a chain would, and keeping the accepted path's rows
leaves a cache that continues exactly like plain decoding."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from tiny_models import VOCAB, run

from specdec.core.adaptive import CostBook
from specdec.core.errors import InvalidArgument
from specdec.core.local import LocalVerifier
from specdec.core.loop import GenerationRequest, Step, speculate
from specdec.core.rejection import RejectionInput, rejection_sample, rejection_sample_batch
from specdec.core.runner import ForwardItem, HFRunner, ModelRunner
from specdec.core.sampling import SamplingParams, probs_from_logits
from specdec.core.target import TargetWorker
from specdec.core.types import Proposal, ProposeItem, Verdict, VerifyItem

# A tree of 7 nodes after the cached tokens: 0 -> (1 -> (3, 4), 2 -> 5), and a second root 6.
PARENTS = [-1, 0, 0, 1, 1, 2, -1]


def _tokens(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


def _path(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("batched", [False, True])
def test_tree_rows_equal_each_path_run_as_a_chain(target_model, batched: bool) -> None:
    runner = ModelRunner(target_model)
    prompt, nodes = _tokens(3, 40), _tokens(4, len(PARENTS))
    kv = runner.new_kv()
    runner.forward([ForwardItem(kv, prompt[:-1], 0)])
    # The newest committed token is fed with the tree, as the target worker does.
    fed = [prompt[-1], *nodes]
    parents = [-1, *(p + 1 for p in PARENTS)]
    items = [ForwardItem(kv, fed, len(fed), parents)]
    others = []
    if batched:  # sessions beside it in the same pass (grouped attention shares their slab)
        others = [runner.new_kv() for _ in range(3)]
        for j, other in enumerate(others):
            runner.forward([ForwardItem(other, _tokens(10 + j, 20 + j), 1)])
        items += [ForwardItem(other, _tokens(20 + j, 3), 3) for j, other in enumerate(others)]
    tree_logits = runner.forward(items)[0]
    for node in range(len(PARENTS)):
        chain = [nodes[n] for n in _path(PARENTS, node)]
        ref_kv = runner.new_kv()
        ref = runner.forward([ForwardItem(ref_kv, prompt + chain, 1)])[0][0]
        assert torch.allclose(tree_logits[1 + node], ref, atol=1e-5), f"node {node}"
    assert torch.allclose(tree_logits[0], runner.forward([ForwardItem(runner.new_kv(), prompt, 1)])[0][0], atol=1e-5)


def test_keep_path_leaves_the_cache_of_the_accepted_path(target_model) -> None:
    runner = ModelRunner(target_model)
    prompt, nodes = _tokens(5, 30), _tokens(6, len(PARENTS))
    kv = runner.new_kv()
    runner.forward([ForwardItem(kv, prompt, 0)])
    runner.forward([ForwardItem(kv, nodes, len(nodes), PARENTS)])
    path = _path(PARENTS, 4)  # nodes 0, 1, 4: two of them move down
    kv.keep_path(len(prompt), path)
    accepted = [nodes[n] for n in path]
    assert kv.token_ids == prompt + accepted
    following = _tokens(7, 5)
    out = runner.forward([ForwardItem(kv, following, len(following))])[0]
    ref = runner.forward([ForwardItem(runner.new_kv(), prompt + accepted + following, len(following))])[0]
    assert torch.allclose(out, ref, atol=1e-5)


def _plain(runner: ModelRunner, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding, one token a pass: the reference every tree step must reproduce."""
    kv, out = runner.new_kv(), []
    logits = runner.forward([ForwardItem(kv, prompt, 1)])[0]
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = runner.forward([ForwardItem(kv, out[-1:], 1)])[0]
    return out


class OracleTree:
    """Proposes trees whose right path is never the first branch: at each depth a wrong
    token first (with a wrong subtree of its own), then the reference token, so the target
    must walk past siblings and the kept rows must move down. Every `miss`-th step the
    reference is left out at depth 2, so a tree is also rejected part-way."""

    def __init__(self, prompt: list[int], reference: list[int], miss: int = 3) -> None:
        self.prompt, self.reference, self.miss = prompt, reference, miss
        self.known: list[int] = []
        self.steps = 0

    async def propose(self, item: ProposeItem) -> Proposal:
        del self.known[item.prefix_len :]
        self.known += item.tokens
        at = len(self.known) - len(self.prompt)
        self.steps += 1
        tokens, parents, parent = [], [], -1
        for depth in range(min(item.num_tokens // 3, len(self.reference) - at)):
            right = self.reference[at + depth]
            wrong = (right + 1) % VOCAB
            tokens += [wrong, (wrong + 7) % VOCAB]  # a wrong branch with a child
            parents += [parent, len(tokens) - 2]
            if depth == 2 and self.steps % self.miss == 0:
                break
            tokens.append(right)
            parents.append(parent)
            parent = len(tokens) - 1
        return Proposal(tokens, parents=parents if tokens else None)

    async def release(self, session_id: str) -> None:
        return None


@pytest.mark.parametrize("judge", ["per_item", "batched"])
def test_greedy_tree_speculation_is_token_identical_and_keeps_deep_paths(target_model, judge: str) -> None:
    runner = ModelRunner(target_model)
    prompt = _tokens(8, 25)
    reference = _plain(runner, prompt, 40)
    worker = TargetWorker(runner, judge=judge)
    verifier = LocalVerifier(worker)
    drafter = OracleTree(prompt, reference)
    request = GenerationRequest("t", prompt, 40, SamplingParams(), "ngram", max_draft_tokens=15, adaptive=False)

    async def go() -> list[Step]:
        return [step async for step in speculate(request, drafter, verifier, CostBook())]

    steps = run(go())
    assert [t for step in steps for t in step.tokens] == reference
    assert max(step.accepted for step in steps) == 5  # a whole path, past a sibling at each depth
    assert any(0 < step.accepted < 5 for step in steps)  # and a tree rejected part-way
    assert len(steps) < len(reference) / 3


def test_tree_logprobs_equal_plain_decoding(target_model) -> None:
    runner = ModelRunner(target_model)
    prompt = _tokens(9, 20)
    reference = _plain(runner, prompt, 3)
    tree = TargetWorker(ModelRunner(target_model), judge="per_item")
    chain = TargetWorker(ModelRunner(target_model), judge="per_item")
    wrong = (reference[0] + 1) % VOCAB
    nodes, parents = [wrong, reference[0], reference[1]], [-1, -1, 1]
    got = tree.verify_batch([VerifyItem("s", 0, prompt, nodes, None, SamplingParams(), 2, parents)])[0]
    want = chain.verify_batch([VerifyItem("s", 0, prompt, reference[:2], None, SamplingParams(), 2)])[0]
    assert isinstance(got, Verdict) and isinstance(want, Verdict)
    assert got.tokens == want.tokens == reference[:3] and got.num_accepted == 2
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-5 and [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize(
    ("parents", "sampling", "message"),
    [
        ([-1, 0], SamplingParams(), "2 parents for 3"),
        ([-1, 0, 2], SamplingParams(), "earlier draft token"),
        ([-1, -2, 0], SamplingParams(), "earlier draft token"),
        ([-1, 0, 0], SamplingParams(repetition_penalty=1.3), "penalty"),
    ],
)
def test_a_bad_tree_is_refused_naming_the_field(target_model, parents, sampling, message: str) -> None:
    worker = TargetWorker(ModelRunner(target_model), judge="per_item")
    good = VerifyItem("ok", 0, [1, 2, 3], [4], None, SamplingParams())
    bad = VerifyItem("bad", 0, [1, 2, 3], [4, 5, 6], None, sampling, -1, parents)
    verdicts = worker.verify_batch([bad, good])
    assert isinstance(verdicts[0], InvalidArgument) and verdicts[0].field == "draft_parents"
    assert message in str(verdicts[0])
    assert isinstance(verdicts[1], Verdict) and verdicts[1].tokens  # the rest of the batch is served


def test_a_runner_without_trees_verifies_the_first_path(target_model) -> None:
    runner = ModelRunner(target_model)
    prompt = _tokens(10, 20)
    reference = _plain(runner, prompt, 3)
    worker = TargetWorker(HFRunner(target_model), judge="per_item")
    # First path: nodes 0 -> 2 (node 1 is a second root); it holds the reference.
    nodes, parents = [reference[0], (reference[0] + 1) % VOCAB, reference[1]], [-1, -1, 0]
    verdict = worker.verify_batch([VerifyItem("s", 0, prompt, nodes, None, SamplingParams(), -1, parents)])[0]
    assert isinstance(verdict, Verdict) and verdict.tokens == reference[:3] and verdict.num_accepted == 2


def _sampled_case(seed: int, vocab: int = 8) -> tuple[torch.Tensor, list[int], list[int]]:
    """Logits for a tree of 6 nodes: three roots (the third repeats the first's token), the
    first with two children, the second with one."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, vocab, generator=gen, dtype=torch.float64) * 1.2
    a, b = int(logits[0].argmax()), int(logits[0].argsort()[-2])
    nodes = [a, b, a, int(logits[1].argmax()), (int(logits[1].argmax()) + 1) % vocab, int(logits[2].argmax())]
    return logits, nodes, [-1, -1, -1, 0, 0, 1]


PARAMS_T = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=5, top_p=0.9)]


@pytest.mark.parametrize("params", PARAMS_T)
def test_sampled_tree_output_follows_the_target_empirically(params: SamplingParams) -> None:
    """SpecInfer's multi-step sampling keeps p exact: the first token ~ p at the root, and
    the token after a kept child ~ p at that child (chi-square over many seeds)."""
    from scipy.stats import chisquare

    logits, nodes, parents = _sampled_case(1)
    p = probs_from_logits(logits, params)
    first, after_a = [], []
    for seed in range(4000):
        sampling = dataclasses.replace(params, seed=seed)
        out = rejection_sample(RejectionInput(logits, nodes, None, sampling, 10, parents))
        first.append(out.tokens[0])
        if out.path and out.path[0] == 0:  # kept the first root: its row decides the next token
            after_a.append(out.tokens[1])
    for sample, row in ((first, p[0]), (after_a, p[1])):
        counts = torch.bincount(torch.tensor(sample), minlength=p.shape[1]).double()
        keep = row > 0
        assert int(counts[~keep].sum()) == 0  # never a token the processing removed
        expected = row[keep] / row[keep].sum() * counts.sum()
        assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
    assert len(after_a) > 1000  # the tree was walked, not just its root judged


def test_sampled_trees_batched_equal_per_item_with_two_reads() -> None:
    from specdec.core import transfer

    items = []
    for case in range(24):
        logits, nodes, parents = _sampled_case(100 + case)
        params = dataclasses.replace(PARAMS_T[case % 2], seed=case)
        if case % 3 == 0:
            params = SamplingParams()  # greedy trees beside them
        items.append(RejectionInput(logits.float(), nodes, None, params, 5 + case, parents))
    items.append(RejectionInput(_sampled_case(7)[0][:3], [1, 2], None, SamplingParams(temperature=1.0, seed=3), 0))
    want = [rejection_sample(item) for item in items]
    before = transfer.STATS.to_host
    for by_item in (True, False):
        got = rejection_sample_batch(items, by_item=by_item)
        assert [(g.tokens, g.path) for g in got] == [(w.tokens, w.path) for w in want]
    assert transfer.STATS.to_host - before == 4  # per batch: the verdicts' read, then the sampled trees' draws


def test_a_chain_shaped_tree_draws_what_the_chain_judge_draws() -> None:
    logits, nodes, _ = _sampled_case(3)
    for seed in range(200):
        sampling = SamplingParams(temperature=1.0, seed=seed)
        chain = rejection_sample(RejectionInput(logits[:4], nodes[:3], None, sampling, 9))
        tree = rejection_sample(RejectionInput(logits[:4], nodes[:3], None, sampling, 9, [-1, 0, 1]))
        assert tree.tokens == chain.tokens


def test_sampled_tree_speculation_follows_plain_sampling_through_the_loop(target_model) -> None:
    """Trees through the loop and the target worker, sampled: the tokens at positions 1 and
    3 over many seeds follow plain sampling's (chi-square on a contingency table)."""
    from scipy.stats import chi2_contingency

    from tests.reference import contingency

    runner = ModelRunner(target_model)
    prompt = _tokens(12, 16)
    reference = _plain(runner, prompt, 6)
    worker = TargetWorker(runner, judge="per_item")
    verifier = LocalVerifier(worker)
    params = SamplingParams(temperature=0.6, top_k=8)
    accepted: list[int] = []

    async def sample(seed: int, drafter: OracleTree | None) -> list[int]:
        request = GenerationRequest(
            f"s{seed}{drafter is None}",
            prompt,
            5,
            dataclasses.replace(params, seed=seed),
            "ngram" if drafter else "none",
            max_draft_tokens=9,
            adaptive=False,
        )
        steps = [s async for s in speculate(request, drafter, verifier, CostBook())]
        accepted.append(sum(s.accepted for s in steps))
        return [t for s in steps for t in s.tokens]

    async def go() -> tuple[list[list[int]], list[list[int]]]:
        plain = [await sample(seed, None) for seed in range(400)]
        tree = [await sample(10_000 + seed, OracleTree(prompt, reference, miss=2)) for seed in range(400)]
        return plain, tree

    plain, tree = run(go())
    assert sum(accepted[400:]) > 150  # the trees were walked (past a wrong first root each time)
    for position in (1, 3):
        rows = contingency([t[position] for t in plain], [t[position] for t in tree])
        assert len(rows[0]) >= 3
        assert chi2_contingency(rows).pvalue > 1e-3
