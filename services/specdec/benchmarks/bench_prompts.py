"""The prompt sets `specdec bench` runs: JSONL files and multi-turn traces made at bench time.

A file line is either the bench's own row (`prompt` or `messages`, optional `kind`) or a
Spec-Bench question (`question_id`, `category`, `turns`): its first turn becomes a chat
message and its category the row's kind, so the bench reports it per category.

`multiturn` names the built-in traces: conversations whose later turns quote the model's
own earlier answer and ask for an edit of it, the way an agent feeds a tool's or its own
output back. The answers cannot be written down in advance (they are whatever the model
says), so a trace is expanded turn by turn while the bench runs, from the greedy output
every configuration produced identically.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]  # "prompt" or "messages"; "kind"; Spec-Bench's "id"; a trace's "turn"
MULTITURN = "multiturn"
ANSWER = "{answer}"  # where a follow-up quotes the previous answer


@dataclass(frozen=True)
class Trace:
    """A conversation of 1 + len(edits) user turns; follow-up t quotes answer t."""

    name: str
    first: str
    edits: tuple[str, ...]
    kind: str = MULTITURN

    @property
    def turns(self) -> int:
        return 1 + len(self.edits)

    def row(self, turn: int, answers: list[str]) -> Row:
        """Turn `turn`'s prompt: the whole conversation so far, the model's answers in it."""
        if len(answers) < turn:
            raise ValueError(f"trace {self.name}: turn {turn} needs {turn} earlier answers, got {len(answers)}")
        messages = [{"role": "user", "content": self.first}]
        for t in range(turn):
            messages.append({"role": "assistant", "content": answers[t]})
            messages.append({"role": "user", "content": self.edits[t].replace(ANSWER, answers[t])})
        return {"kind": self.kind, "id": self.name, "turn": turn, "messages": messages}


Item = Row | Trace

_QUOTE = "Here is your previous answer:\n\n" + ANSWER + "\n\n"
TRACES = (
    Trace(
        "csv",
        "Write a Python function `parse_line(line)` that splits one CSV line into fields, handling quoted "
        "fields that contain commas. Include a docstring and a short usage example.",
        (
            _QUOTE + "Rewrite it with the function renamed to `split_fields`. Return the complete code.",
            _QUOTE + "Add type hints to every function and return the whole code again, otherwise unchanged.",
        ),
    ),
    Trace(
        "email",
        "Draft a short email to a colleague asking to move our Tuesday project meeting to Thursday afternoon.",
        (
            _QUOTE + "Rewrite it with Thursday changed to Friday; keep everything else as it is.",
            _QUOTE + "Sign it with the name Dana Lee instead and return the complete email.",
        ),
    ),
    Trace(
        "config",
        "Write a JSON configuration for a web service with a server section (host, port, workers), a database "
        "section (host, port, name, user) and a logging section (level, format).",
        (
            _QUOTE + "Change the server port to 9090 and return the complete JSON, otherwise unchanged.",
            _QUOTE + 'Add a field "timeout_s": 30 to the server section and return the whole JSON again.',
        ),
    ),
    Trace(
        "stack",
        "Write a Python class `Stack` with the methods push, pop, peek and is_empty, using a list inside.",
        (
            _QUOTE + "Rewrite it with the class renamed to `LifoStack`. Return the complete code.",
            _QUOTE + "Make pop and peek raise IndexError with a clear message on an empty stack; return all the code.",
        ),
    ),
    Trace(
        "product",
        "Write a product description, about 100 words, for a stainless steel insulated water bottle.",
        (
            _QUOTE + "Rewrite it with 'water bottle' replaced by 'flask' everywhere, otherwise unchanged.",
            _QUOTE + "Add one sentence about the lifetime warranty at the end; return the whole description.",
        ),
    ),
    Trace(
        "sql",
        "Write an SQL query that lists each customer's name and the total of their orders in 2023, from tables "
        "customers(id, name) and orders(id, customer_id, amount, created_at), highest total first.",
        (
            _QUOTE + "Change the year to 2024 and return the complete query, otherwise unchanged.",
            _QUOTE + "Show only customers whose total is above 1000; return the whole query.",
        ),
    ),
)


def turns(item: Item) -> int:
    return item.turns if isinstance(item, Trace) else 1


def kind(item: Item) -> str:
    return item.kind if isinstance(item, Trace) else str(item.get("kind", ""))


def load_prompts(
    sources: str | Path, kinds: list[str] | None = None, per_category: int = 0, seed: int = 0
) -> list[Item]:
    """The prompts of `sources` (comma-separated paths, or `multiturn`), only `kinds` if
    given, and at most `per_category` of each kind (a seeded sample, in file order)."""
    items: list[Item] = []
    for source in str(sources).split(","):
        items += list(TRACES) if source == MULTITURN else read_rows(Path(source))
    items = [item for item in items if not kinds or kind(item) in kinds]
    if not items:
        raise ValueError(f"{sources}: no prompts (kinds {kinds})")
    return sample_per_category(items, per_category, seed) if per_category > 0 else items


def read_rows(path: Path) -> list[Row]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "turns" in row:  # Spec-Bench: the first turn as a chat message
            row = {
                "kind": row.get("category", ""),
                "id": row.get("question_id"),
                "messages": [{"role": "user", "content": row["turns"][0]}],
            }
        if "prompt" not in row and "messages" not in row:
            raise ValueError(f"{path}:{i + 1}: each line needs 'prompt', 'messages' or Spec-Bench's 'turns'")
        rows.append(row)
    return rows


def sample_per_category(items: list[Item], n: int, seed: int) -> list[Item]:
    """At most n items of each kind, drawn with `seed`; the survivors keep their order."""
    rng = random.Random(seed)
    by_kind: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_kind.setdefault(kind(item), []).append(i)
    keep: set[int] = set()
    for indices in by_kind.values():  # dicts keep first-seen order, so the draw is reproducible
        keep.update(indices if len(indices) <= n else rng.sample(indices, n))
    return [item for i, item in enumerate(items) if i in keep]


def as_prompt(row: Row, has_chat_template: bool) -> Row:
    """`row` as the model can take it: chat messages stay messages where the tokenizer has a
    chat template; otherwise they become a plain transcript prompt."""
    if "messages" not in row or has_chat_template:
        return row
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in row["messages"]) + "assistant:"
    return {key: value for key, value in row.items() if key != "messages"} | {"prompt": text}
