"""Where the recipe writes, and how.

Writes that cannot tear: every file the recipe writes whole goes to a temporary name beside it
(unique to this process, so concurrent writers never share one) and is renamed over the final
name, atomically on one filesystem. A reader sees the old file or the new one, never a part, and a
failed write leaves no temporary behind (atomic).

Where a command may write (check_target): never onto, into or around a path it must not touch, an
input of the run (a source file or folder) or something the run owns (an entry of its run folder);
the caller names them, with what they are, so the refusal says which and why.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

from .errors import ConfigError, DataError


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


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path` to write (a file or a folder); on success it is renamed
    over `path`, on any failure removed."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def inside(path: str, folder: str, resolve: bool = True) -> bool:
    """path is folder or lies under it (folder resolved: links, .., relative parts; path too, unless
    resolve=False, for a path whose last part is a link to be replaced)."""
    path = os.path.realpath(path) if resolve else os.path.normpath(os.path.abspath(path))
    folder = os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target(target: str, protected: dict[str, str], flag: str, fix: str) -> None:
    """Refuse to write `target` where it would be, lie inside or hold a protected path (path -> what
    it is, e.g. 'an input of this run'). One ConfigError naming the flag, the path and the fix."""
    # a link is checked as itself too: writing replaces the link, beside it, where it lies
    named = os.path.abspath(target)  # newout/ and newout/. name newout
    as_named = os.path.join(os.path.realpath(os.path.dirname(named)), os.path.basename(named))
    for path, what in protected.items():
        for t, resolve in ((target, True), (as_named, False)):
            within, holds = inside(t, path, resolve), inside(path, t)
            if within or holds:
                how = "is" if within and holds else "lies inside" if within else "holds"
                raise ConfigError(f"{flag} {target}: {how} {path}, {what}; {fix}")


def run_entries(run_dir: str) -> dict[str, str]:
    """What a run owns, to protect: every entry of its folder (metrics, audit, checkpoints, ...)."""
    if not os.path.isdir(run_dir):
        return {}
    return {os.path.join(run_dir, n): f"a file of the run {run_dir}" for n in sorted(os.listdir(run_dir))}


def input_root(path: str) -> str:
    """What a source path claims on disk: the path itself, or for a glob the folder its pattern starts
    from (data/**/*.jsonl: data), since anything written under it could match the pattern next time.
    file:///x is the local path /x."""
    if path.lower().startswith("file:///"):
        path = path[len("file://"):]
    if not any(c in path for c in "*?["):
        return path
    head = []
    for part in path.split(os.sep):
        if any(c in part for c in "*?["):
            break
        head.append(part)
    return os.sep.join(head) or "."


def jsonl_rows(path: str) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file the recipe appends to (metrics.jsonl), one at a time. A
    last line without its end that does not parse is a write cut off by a killed process: left out.
    Any other line that is not a JSON object is one DataError naming the file and the line."""
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, ln in enumerate(f, 1):
                if not ln.strip():
                    continue
                try:
                    row = json.loads(ln)
                except ValueError:
                    if not ln.endswith("\n"):
                        return
                    row = None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n}: not a JSON object; the file was edited or damaged (the "
                                    "recipe writes one object a line): restore it, or remove the line")
                yield row
    except UnicodeDecodeError:
        raise DataError(f"{path} line {n + 1}: not UTF-8 text; the file is damaged: restore it") from None
