"""Fixtures for the core tests: tiny seeded Llama models, built once per session."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, build_draft, build_target
from transformers import LlamaForCausalLM

from specdec.core.engine import Engine


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """The tiny models are far faster on one intra-op thread, above all on a shared CPU
    (the batchers already run the draft and target workers on threads of their own).
    Module-scoped so the setting never leaks into other test directories."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def target_model() -> LlamaForCausalLM:
    return build_target()


@pytest.fixture(scope="session")
def draft_model(target_model: LlamaForCausalLM) -> LlamaForCausalLM:
    return build_draft(target_model)


@pytest.fixture(scope="session")
def tokenizer() -> IdTokenizer:
    return IdTokenizer()


@pytest.fixture(scope="module")
def engine(target_model: LlamaForCausalLM, draft_model: LlamaForCausalLM, tokenizer: IdTokenizer) -> Engine:
    """An engine serving the model-free drafters and `model:small` (the tiny draft model);
    a module that needs another defines its own `engine`."""
    return Engine(target_model, tokenizer, drafter="ngram", draft_model=draft_model, draft_model_name="small")
