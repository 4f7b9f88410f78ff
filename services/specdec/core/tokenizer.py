"""What the core uses of a tokenizer: transformers' tokenizers (`PreTrainedTokenizerBase`)
fit these protocols, and so does any test double with the same methods."""

from __future__ import annotations

from typing import Any, Protocol


class Decoder(Protocol):
    """Enough to detokenize."""

    # transformers returns a list of strings only for a batch of sequences
    def decode(self, token_ids: list[int], /, skip_special_tokens: bool = ...) -> str | list[str]: ...


class Tokenizer(Decoder, Protocol):
    """Enough to turn a request into token ids. `chat_template` is read with getattr: not
    every tokenizer has one."""

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, /, *, add_special_tokens: bool = ...) -> list[int]: ...

    # a list of ids or, in newer transformers, a dict-like holding input_ids
    def apply_chat_template(
        self, conversation: list[dict[str, str]], /, *, add_generation_prompt: bool = ..., tokenize: bool = ...
    ) -> Any: ...
