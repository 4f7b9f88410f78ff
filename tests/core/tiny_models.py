"""Tiny seeded Llama models and a test tokenizer for the core tests."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.core.request import RequestSpec

VOCAB = 256
REPEATS = [188, 17, 189, 37, 248, 42, 228, 188, 17, 189]  # repeats: the n-gram drafter proposes


def tiny_llama(num_layers: int, seed: int, initializer_range: float = 0.2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        # No special tokens: generation must run for exactly max_new_tokens everywhere.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


class IdTokenizer:
    """Test-only tokenizer for the tiny random models, which have no real vocabulary: the
    engine is fed raw token ids (RequestSpec.token_ids), so only `decode` (for the
    detokenizer) and `eos_token_id` (no EOS: runs go to max_new_tokens) are needed. Each id
    decodes to a fixed 2-character piece so stop strings can be tested on the text."""

    eos_token_id = None

    @staticmethod
    def piece(token: int) -> str:
        return chr(ord("A") + token // 16) + chr(ord("a") + token % 16)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.piece(int(t)) for t in ids)


def build_target() -> LlamaForCausalLM:
    model = tiny_llama(2, seed=0)
    # Damp the last layer so an early-exit draft (below) agrees with the target often but
    # not always: acceptance is partial, which exercises both accept and reject paths.
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.3)
        model.model.layers[1].mlp.down_proj.weight.mul_(0.3)
    return model


def build_draft(target: LlamaForCausalLM) -> LlamaForCausalLM:
    """A smaller (1-layer), separately seeded llama, given the target's embeddings, first
    layer and head (a LayerSkip-style early-exit draft) so its guesses are useful."""
    draft = tiny_llama(1, seed=1)
    target_state = target.state_dict()
    with torch.no_grad():
        for name, tensor in draft.state_dict().items():
            tensor.copy_(target_state[name])
    return draft


def run(coro):
    """Run a coroutine on a fresh event loop (batcher workers are cancelled at its end)."""
    return asyncio.run(coro)


def fixed_spec(drafter: str, seed: int = 0, max_new_tokens: int = 3, k: int = 4, **kw: Any) -> RequestSpec:
    """A request on REPEATS at a fixed draft length (no EOS stop), seeded."""
    return RequestSpec(
        token_ids=list(REPEATS),
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        drafter=drafter,
        max_draft_tokens=k,
        adaptive=False,
        seed=seed,
        **kw,
    )
