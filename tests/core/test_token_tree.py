"""Token-tree verification: one forward pass over a draft tree scores every root-to-node
path exactly as running that path as a chain would, and keeping the accepted path's rows
leaves a cache that continues exactly like plain decoding."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import VOCAB

from specdec.core.runner import ForwardItem, ModelRunner

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
