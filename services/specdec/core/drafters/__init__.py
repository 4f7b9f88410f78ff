"""Drafters: propose k tokens for a sequence. Model-free (n-gram) and model-based."""

from specdec.core.drafters.base import DraftMethod, DraftSession
from specdec.core.drafters.ngram import ngram_propose
from specdec.core.drafters.registry import DRAFTERS, DrafterSpec, parse_drafter
from specdec.core.drafters.worker import DraftWorker

__all__ = ["DRAFTERS", "DraftMethod", "DraftSession", "DraftWorker", "DrafterSpec", "ngram_propose", "parse_drafter"]
