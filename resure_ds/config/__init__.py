"""Typed configuration: the one source of defaults.

A recipe is YAML whose sections mirror these dataclasses; `key.sub=value`
overrides (values parsed as YAML) apply on top. Unknown keys, wrong types
and invalid values are all collected into one ConfigError before anything
launches.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import typing
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .sections import (MAX_TIMEOUT, SIGNALS, AdaptiveConfig, CheckpointConfig, Config, DataConfig, DistConfig,
                       EvalConfig, LoraConfig, LossTruncationConfig, ModelConfig, OutputConfig, ResureConfig,
                       StatsConfig, TrainConfig, is_template_text, parse_duration, parse_steps)

__all__ = ["MAX_TIMEOUT", "SIGNALS", "AdaptiveConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DistConfig", "EvalConfig", "LoraConfig", "LossTruncationConfig", "ModelConfig", "OutputConfig",
           "ResureConfig", "StatsConfig", "TrainConfig", "is_template_text", "load_config", "parse_duration",
           "parse_steps", "split_recipe_args", "to_dict", "two_sided"]


def _check_type(value: Any, tp: Any) -> Any:
    """Return value coerced to tp, or raise TypeError/ValueError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in typing.get_args(tp):
            value = str(value).lower()  # YAML reads true/false as booleans: auto|true|false options
        if value not in typing.get_args(tp):
            raise ValueError(f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:
            try:
                return _check_type(value, a)
            except (TypeError, ValueError):
                pass
        return _check_type(value, options[-1])
    if tp is list and isinstance(value, list):
        return value
    if tp is dict and isinstance(value, dict):
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 3e-5 (no dot) as a string; accept what Python reads as a number
            x = float(value)
        except ValueError:
            x = None
        if x is not None:
            if not math.isfinite(x):  # .nan, .inf: no option means anything with them
                raise ValueError(f"must be a finite number, got {value!r}")
            return x
    if tp in (int, bool, str) and type(value) is tp:
        return value
    raise TypeError(f"must be {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            errors.append(f"{name}: unknown key (known: {', '.join(hints)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name}: must be a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(tp, value, name + ".", errors)
        else:
            try:
                kwargs[key] = _check_type(value, tp)
            except (TypeError, ValueError) as e:
                errors.append(f"{name}: {e}")
    return cls(**kwargs)


CLONE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shipped(path: str) -> str:
    """A relative path that the working directory lacks and this clone has (recipes/default.yaml,
    recipes/ds_offload.json): the clone's file, so the shipped recipes work from any directory."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    there = os.path.join(CLONE, path)
    return there if os.path.exists(there) else path


def _validate(c: Config) -> list[str]:
    """Every section's own problems (config/sections.py), then those across sections."""
    e = [p for f in dataclasses.fields(c) for p in getattr(c, f.name).problems()]
    if c.train.sequence_parallel > 1 and c.model.attn_implementation == "eager":
        e.append("train.sequence_parallel with model.attn_implementation=eager: "
                 "DeepSpeed's Ulysses attention runs sdpa, varlen or flash_attention_2; set one of them (or auto)")
    if c.train.sequence_parallel > 1 and c.model.compile:
        e.append("model.compile with train.sequence_parallel: the Ulysses attention is swapped in after the "
                 "engine is built, under a compiled model; set one of them")
    if c.resure.threshold == "quantile" and c.stats.length_scaled:
        e.append("resure.threshold=quantile with stats.length_scaled: the bucket's quantile has no per-length "
                 "form; set one of them")
    two, sig = c.resure.two_sided, c.stats.signals
    if isinstance(two, list) and (not all(isinstance(x, str) for x in two) or set(two) - set(sig)):
        e.append(f"resure.two_sided: true, false, or a list of signals of stats.signals ({sig}); got {two!r}")
    if (c.eval.every or c.eval.keep_best) and c.data.eval is None:
        e.append("eval.every / eval.keep_best: set data.eval (a validation source or a held-out fraction)")
    if c.train.ds_config:
        e += _ds_config_problems(c.train.ds_config)
    return e


def _ds_config_problems(path: str) -> list[str]:
    """train.ds_config names a readable JSON object (DeepSpeed's keys), or it is one problem here rather
    than a traceback on every rank when the engine is built."""
    if not os.path.isfile(path):
        return [f"train.ds_config: no such file {path} (a DeepSpeed JSON, its path absolute, relative to the "
                f"working directory {os.getcwd()}, or a file of this clone such as recipes/ds_offload.json)"]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return [f"train.ds_config: {path} is not a readable JSON file ({err})"]
    return [] if isinstance(data, dict) else [f"train.ds_config: {path} must hold a JSON object of DeepSpeed keys, "
                                              f"got a {type(data).__name__}"]


def two_sided(cfg: Config, signal: str) -> bool:
    """Whether resure.two_sided covers `signal`."""
    t = cfg.resure.two_sided
    return signal in t if isinstance(t, list) else bool(t)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. train.lr=1e-5)")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.load(raw, Loader=UniqueKeyLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote "
                          "text with brackets or colons, e.g. key='[a, b]'") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML would keep
    the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            if not isinstance(key, typing.Hashable):
                break  # PyYAML's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", k.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def split_recipe_args(args: list[str]) -> tuple[str | None, list[str]]:
    """Command-line words -> (recipe path or None, overrides): a recipe is a leading .yaml/.yml file."""
    if args and args[0].endswith((".yaml", ".yml")):
        return args[0], list(args[1:])
    return None, list(args)


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a command that takes [RECIPE.yaml] and dotted key=value overrides, as training
    does; parse with parse_intermixed_args, so its options may come before, between or after them."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="[RECIPE.yaml] then dotted key=value overrides")
    return ap


def positive(kind, most: float = math.inf):
    """An argparse type: a finite number > 0 (and <= most) of `kind`: a command's counts and sizes
    are checked where they are read (0 GPUs divided by zero; a NaN memory 'fitted')."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and 0 < v <= most):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0{f' and <= {most:g}' if most < math.inf else ''}"
                                             f", got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


def load_config(recipe: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """YAML recipe (optional) + dotted overrides -> validated Config."""
    data: dict = {}
    if recipe:
        recipe = shipped(recipe)
        try:
            with open(recipe, encoding="utf-8") as f:
                data = yaml.load(f, Loader=UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{recipe}: no such recipe file (see recipes/)") from None
        except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
            raise ConfigError(f"{recipe}: cannot read the recipe ({e}); a recipe is a YAML text file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{recipe}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe must be a mapping of sections")
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[path[-1]] = value
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if not errors and cfg.train.ds_config:
        cfg.train.ds_config = shipped(cfg.train.ds_config)
    if not errors:
        errors = _validate(cfg)
    if errors:
        where = f" in {recipe}" if recipe else ""
        raise ConfigError(f"{len(errors)} config problem(s){where}:\n  " + "\n  ".join(errors))
    if "excess" in cfg.stats.signals and cfg.stats.reference is None:  # the excess signal's default reference
        cfg.stats.reference = "base"
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def option_table() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every option, docs read from this file's field docstrings."""

    def section(cls, prefix: str) -> list[tuple[str, str, str]]:
        body = ast.parse(inspect.getsource(cls)).body[0].body
        docs = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(b.value.value.split())
        default, hints, rows = cls(), typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):  # a subsection (model.lora): its options, in place
                rows += section(hints[f.name], f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", repr(getattr(default, f.name)), docs.get(f.name, "")))
        return rows

    hints = typing.get_type_hints(Config)
    return [row for s in dataclasses.fields(Config) for row in section(hints[s.name], f"{s.name}.")]


def markdown_table() -> str:
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {doc.replace('|', chr(92) + '|')} |" for k, d, doc in option_table()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m resure_ds.config: the option table of docs/configuration.md
    print(markdown_table())
