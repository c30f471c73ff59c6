"""A tokenizer loaded only when it is used, and its fingerprints (the prepared data's cache key)
remembered without it. The memo is keyed by the bytes of every file of the model folder except the
weights, the chat template override and the versions of transformers and tokenizers, so a cache
hit of prepare imports no transformers; any change to what builds the tokenizer is a new key."""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata

from ..files import write_json
from ..models import cache_root, load_tokenizer

WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
READ_LIMIT = 64 << 20  # a larger file of another kind counts by its size and time, not its bytes


def fingerprints_of(tok) -> dict:
    """What the prepared data depends on in a tokenizer: its vocabulary and rules, and its template."""
    return {"tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16],
            "template": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16]}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def memo_key(model_path: str, chat_template: str | None, trust_remote_code: bool) -> str | None:
    """The memo's key, or None where the tokenizer must be loaded to know (not a local folder, code
    of its own that may run, or tokenizer files named from its config)."""
    if trust_remote_code or not os.path.isdir(model_path):
        return None
    conf = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(conf):
        with open(conf, "rb") as f:
            if b"fast_tokenizer_files" in f.read():  # files it names may lie outside the folder's top level
                return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if name.endswith(".py"):
            return None
        if not os.path.isfile(path) or name.endswith(WEIGHTS):
            continue
        h.update(name.encode() + b"\0")
        st = os.stat(path)
        if st.st_size > READ_LIMIT:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            continue
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    template = chat_template or ""
    if template and os.path.isfile(template):
        with open(template, "rb") as f:
            h.update(b"template-file\0" + f.read())
    else:
        h.update(b"template\0" + template.encode())
    h.update(f"\0{_version('transformers')}\0{_version('tokenizers')}".encode())
    return h.hexdigest()[:32]


class OnDemand:
    """load_tokenizer's arguments; the tokenizer itself on the first get()."""

    def __init__(self, model_path: str, chat_template: str | None = None, trust_remote_code: bool = False):
        self.args = (model_path, chat_template, trust_remote_code)
        self._tok = None

    def get(self):
        if self._tok is None:
            self._tok = load_tokenizer(*self.args)
        return self._tok

    def fingerprints(self) -> dict:
        key = memo_key(*self.args)
        path = os.path.join(cache_root(), "tokenizers", f"{key}.json") if key else None
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    fps = json.load(f)
                if set(fps) == {"tokenizer", "template"}:
                    return fps
            except (OSError, ValueError):
                pass  # unreadable: computed again and written over
        fps = fingerprints_of(self.get())
        if path and memo_key(*self.args) == key:  # not edited while it loaded
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json(path, fps)
            except OSError:
                pass  # a cache that cannot be written: the next prepare loads the tokenizer again
        return fps
