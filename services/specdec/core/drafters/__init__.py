"""Drafters: propose k tokens for a sequence. Model-free (n-gram) and model-based."""
from specdec.core.drafters.base import DraftSession, DraftWorker, parse_drafter
from specdec.core.drafters.ngram import ngram_propose

__all__ = ["DraftSession", "DraftWorker", "ngram_propose", "parse_drafter"]
