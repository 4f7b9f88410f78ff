"""Fixtures for the tiers: tiny seeded models saved as HF directories (with the real
SmolLM2 tokenizer, so text prompts work) and a running stack of real processes."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import ValkeyProcess, free_port


def save_tiny_llama(path: Path, seed: int, layers: int, tokenizer, init_from: Path | None = None) -> Path:
    """A seeded tiny llama; with init_from, its first `layers` layers, embeddings and head
    are copied from that model (an early-exit draft that agrees with it often, not always)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    if init_from is not None:
        source = LlamaForCausalLM.from_pretrained(init_from).state_dict()
        model.load_state_dict({k: v for k, v in source.items() if k in model.state_dict()})
    else:
        with torch.no_grad():  # larger logits: fewer near-ties between the top tokens
            model.lm_head.weight.mul_(8)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(target dir, draft dir): two different seeded tiny llamas sharing SmolLM2's tokenizer."""
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("tiny")
    target = save_tiny_llama(root / "target", seed=0, layers=2, tokenizer=tokenizer)
    draft = save_tiny_llama(root / "draft", seed=1, layers=1, tokenizer=tokenizer, init_from=target)
    return str(target), str(draft)


class RunningStack:
    def __init__(self, stack, prefix: str) -> None:
        self.stack, self.prefix = stack, prefix

    @property
    def address(self) -> str:
        return self.stack.coordinator


def start(model: str, drafter: str, valkey: ValkeyProcess, targets: int = 1, drafts: int = 1) -> RunningStack:
    from specdec.launcher import start_stack

    prefix = f"specdec-test-{uuid.uuid4().hex[:6]}:"
    os.environ["SPECDEC_REDIS_PREFIX"] = prefix  # the launcher's registry wait reads it too
    env = {"SPECDEC_REDIS_PREFIX": prefix, "SPECDEC_TORCH_THREADS": "1", "SPECDEC_HEARTBEAT_S": "0.5"}
    stack = start_stack(model, drafter, drafts, targets, free_port(), valkey.url, extra_env=env)
    return RunningStack(stack, prefix)


@pytest.fixture(scope="session")
def tiny_stack(tiny_models: tuple[str, str], valkey: ValkeyProcess) -> Iterator[RunningStack]:
    target, draft = tiny_models
    running = start(target, f"model:{draft}", valkey)
    yield running
    running.stack.stop()
