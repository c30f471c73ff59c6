"""Writes that cannot tear: every file the recipe writes whole goes to a temporary name beside it
(unique to this process, so concurrent writers never share one) and is renamed over the final
name, atomically on one filesystem. A reader sees the old file or the new one, never a part."""
from __future__ import annotations

import json
import os
from typing import Any


def temp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def write_text(path: str, text: str) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(obj, indent=indent))
