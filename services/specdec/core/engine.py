"""The embedded engine: target, drafters and the loop in one process.

Usable as a library and the benchmark baseline; runs the same loop the coordinator runs.

    engine = Engine.load("smollm2-135m", drafter="ngram")
    result = engine.complete(RequestSpec(prompt="def fib(n):", max_new_tokens=64))
"""

from __future__ import annotations

import asyncio

from specdec.core import compute
from specdec.core.drafters.registry import DrafterSpec, parse_drafter
from specdec.core.drafters.worker import DraftWorker
from specdec.core.generation import GenerationResult, generate
from specdec.core.grammar import vocab_for_model
from specdec.core.interfaces import Tiers
from specdec.core.local import LocalDrafter, LocalVerifier
from specdec.core.models import load_model, load_tokenizer
from specdec.core.request import ModelLimits, RequestSpec, build_request, longest_token_chars
from specdec.core.runner import CausalLM, build_runner
from specdec.core.target import TargetWorker
from specdec.core.tokenizer import Tokenizer


class Engine:
    def __init__(
        self,
        target_model: CausalLM,
        tokenizer: Tokenizer,
        drafter: str | DrafterSpec = "ngram",
        draft_model: CausalLM | None = None,
        draft_model_name: str = "",
        overlap: bool = False,
    ) -> None:
        runner = compute.run_sync(build_runner, target_model)  # packs weights: torch work
        self.tokenizer = tokenizer
        self.verifier = LocalVerifier(TargetWorker(runner))
        draft_runner = compute.run_sync(build_runner, draft_model) if draft_model is not None else None
        # The model-free drafters' grammar vocabulary (constrained drafts) is the target's.
        vocab = (lambda: vocab_for_model(target_model, runner.vocab_size)) if draft_runner is None else None
        self.drafter = LocalDrafter(DraftWorker(draft_runner, draft_model_name, grammar_vocab=vocab))
        self.verifier.batcher.share_compute_with(self.drafter.batcher)
        self.tiers = Tiers(self.verifier, self.drafter)
        self.default_drafter = parse_drafter(drafter)
        self.default_overlap = overlap
        self.limits = ModelLimits(
            vocab_size=runner.vocab_size, max_context=runner.max_context, max_token_chars=longest_token_chars(tokenizer)
        )

    @classmethod
    def load(
        cls, model: str, drafter: str | DrafterSpec = "ngram", device: str = "cpu", dtype: str = "float32"
    ) -> Engine:
        """The target `model`, and the draft model `drafter` names, if any (every engine
        also serves the model-free drafters)."""
        spec = parse_drafter(drafter)
        target = compute.run_sync(load_model, model, device, dtype)
        draft = None
        if spec.needs_model:
            draft = target if spec.model == model else compute.run_sync(load_model, spec.model, device, dtype)
        return cls(target, load_tokenizer(model), spec, draft, spec.model)

    @property
    def available_drafters(self) -> list[str]:
        return self.drafter.worker.drafters

    async def complete_async(self, spec: RequestSpec) -> GenerationResult:
        request, stops = build_request(
            spec, self.tokenizer, self.limits, self.default_drafter, self.available_drafters, self.default_overlap
        )
        return await generate(request, self.tiers, self.tokenizer, stops)

    def complete(self, spec: RequestSpec) -> GenerationResult:
        """Synchronous convenience for scripts; not for use inside a running event loop."""

        async def run() -> GenerationResult:
            try:
                return await self.complete_async(spec)
            finally:
                await self.aclose()

        return asyncio.run(run())

    async def aclose(self) -> None:
        """Stop the batchers' workers (they restart on the next request)."""
        for batcher in (self.verifier.batcher, self.drafter.batcher):
            await batcher.stop()
