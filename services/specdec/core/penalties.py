"""Presence, frequency and repetition penalties over the rows of one verify (or draft) pass.

Row j of a pass predicts the token after `tokens[:base + j]`: the committed tokens and the
first j drafts. Each row is penalised by exactly that history, so a verified position sees
the drafts accepted before it as plain decoding would have seen them as its own output.

Semantics as vLLM (and OpenAI / HF) define them, in vLLM's order:

* repetition_penalty (HF): every token of the prompt or the output has its logit divided
  by the penalty when positive, multiplied when negative;
* frequency_penalty (OpenAI): minus the penalty times the token's count in the output;
* presence_penalty (OpenAI): minus the penalty once for a token present in the output.

"Output" is the history after the prompt (`SamplingParams.prompt_len` tokens).

Before the penalties, as vLLM's logits processors do (they come first there too):

* logit_bias (OpenAI): the bias is added to its token's logit;
* min_tokens (vLLM): while the output has fewer than min_tokens tokens, EOS and the stop
  token ids (`SamplingParams.min_tokens_ids`) are masked (-inf): a row whose history has
  too little output cannot end the text.
"""

from __future__ import annotations

import torch

from specdec.core.sampling import SamplingParams


def penalize(logits: torch.Tensor, tokens: list[int], base: int, params: SamplingParams) -> torch.Tensor:
    """Logits [n, vocab] -> float64 penalised logits [n, vocab]; row j sees tokens[:base + j].
    Counting is vectorised (bincount, one scatter for the drafts): no loop over the vocab."""
    n, vocab = logits.shape
    assert len(tokens) >= base + n - 1, "each row needs its history"
    out = biased(logits.to(torch.float64), base, params)
    prompt_len = min(params.prompt_len, base)
    counts = output_counts(tokens, prompt_len, base, n, vocab).to(out.device)  # counted on the host
    if params.repetition_penalty != 1.0:
        in_prompt = torch.bincount(torch.tensor(tokens[:prompt_len], dtype=torch.long), minlength=vocab) > 0
        in_prompt = in_prompt.to(out.device)
        seen = (counts > 0) | in_prompt
        scaled = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, scaled, out)
    if params.frequency_penalty != 0.0:
        out = out - params.frequency_penalty * counts
    if params.presence_penalty != 0.0:
        out = out - params.presence_penalty * (counts > 0).to(torch.float64)
    return out


def biased(logits: torch.Tensor, base: int, params: SamplingParams) -> torch.Tensor:
    """logit_bias and min_tokens on float64 logits [n, vocab] (row j after base + j tokens)."""
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=logits.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float64, device=logits.device)
        logits = logits.index_add(1, ids, bias.expand(logits.shape[0], -1))
    if params.min_tokens > 0 and params.min_tokens_ids:
        # row j's output so far: base + j - prompt_len tokens; masked while under min_tokens
        early = max(0, min(logits.shape[0], params.min_tokens + params.prompt_len - base))
        if early:
            ids = torch.tensor(params.min_tokens_ids, dtype=torch.long, device=logits.device)
            logits = logits.clone() if not params.logit_bias else logits
            logits[:early, ids] = -torch.inf
    return logits


def output_counts(tokens: list[int], prompt_len: int, base: int, n: int, vocab: int) -> torch.Tensor:
    """[n, vocab] float64: row j counts each token in tokens[prompt_len:base + j]."""
    before = torch.bincount(torch.tensor(tokens[prompt_len:base], dtype=torch.long), minlength=vocab)
    counts = before.to(torch.float64).unsqueeze(0).repeat(n, 1)
    if n > 1:
        drafts = torch.tensor(tokens[base : base + n - 1], dtype=torch.long)
        # (row r, draft i) for every i < r: draft i is in the history of each later row.
        rows, cols = torch.tril_indices(n, n - 1, offset=-1)
        counts.index_put_((rows, drafts[cols]), torch.ones(len(rows), dtype=torch.float64), accumulate=True)
    return counts
