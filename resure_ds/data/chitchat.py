"""The embedded corpus: PyPI `chitchat-dataset` (MIT, 7,168 human conversations).

Each conversation is a list of turns; a turn is a list of consecutive messages
by one sender. The first sender is the user, the other the assistant;
messages of one turn are joined by newlines. Conversations with a single
turn have no assistant message and are reported as `no_assistant_turn` by
validation (the default recipe counts and skips them).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Iterator

from ..errors import DataError


def chitchat_path() -> str:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the PyPI package 'chitchat-dataset': "
                        "pip install chitchat-dataset (it is in requirements.txt)")
    return os.path.join(list(spec.submodule_search_locations)[0], "dataset.json")


@functools.lru_cache(maxsize=1)
def _load(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return list(json.load(f).items())  # 40 MB: parsed once per process


def chitchat_count(path: str | None = None) -> int:
    return len(_load(path or chitchat_path()))


def chitchat_records(path: str | None = None, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (conversation key, OpenAI-layout record with 'id') for conversations [start, stop)."""
    for key, conv in _load(path or chitchat_path())[start:stop]:
        messages, first = [], None
        for turn in conv.get("messages", []):
            if not turn:
                continue
            sender = turn[0].get("sender")
            first = sender if first is None else first
            role = "user" if sender == first else "assistant"
            messages.append({"role": role, "content": "\n".join(m.get("text", "") for m in turn)})
        yield key, {"id": key, "messages": messages}
