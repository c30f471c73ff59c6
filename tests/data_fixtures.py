"""Small dialogue records in both layouts, written as real files."""
from __future__ import annotations

import json

OPENAI = [
    {"id": "a1", "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi there!"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]},
]
SHAREGPT = [
    {"id": "s1", "conversations": [{"from": "human", "value": "Tell me a joke."},
                                   {"from": "gpt", "value": "Why did the chicken cross the road?"},
                                   {"from": "human", "value": "Why?"},
                                   {"from": "gpt", "value": "To get to the other side.\nBa-dum-tss."}]},
]


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)
