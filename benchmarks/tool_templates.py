"""Tool-call dialogues through real chat templates: which train their calls, which refuse, and why.

    python benchmarks/tool_templates.py [--templates DIR] [--out benchmarks/results/tool_templates.json]

Templates: every .jinja file of DIR (default: the chat templates TRL ships, `trl/chat_templates`,
where trl is installed: `pip install -r benchmarks/requirements.txt`; else the suite's fixtures,
tests/fixtures/templates). The tokenizer is the embedded SmolLM2's with the template's own markers
(`<|...|>`, `<turn|>`, `<｜...｜>`, `[INST]`-style) added as special tokens, so they are single
tokens as in the real model. Each template renders agent dialogues (a system prompt, a tools list,
calls with tool results between them, two calls in one message, replies); each dialogue is:

- trained: every check below holds;
- refused: one located error, with its kind and message;
- WRONG: rendered and trained, but a check fails. This must never happen.

The checks are independent of the renderer's own (they read the trained tokens back): the tokens
decode to the template's own rendering of the whole dialogue; a calling turn's trained text holds
each call's function name and argument values and no text of any tool message; a reply's trained
text holds its content; nothing but assistant turns is trained.
"""
from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resure_ds.data.records import Dialogue, normalise, record_tools  # noqa: E402
from resure_ds.data.render import Renderer  # noqa: E402
from resure_ds.data.template import call_form  # noqa: E402
from resure_ds.errors import DataError  # noqa: E402
from resure_ds.models import load_tokenizer, resolve_model_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"type": "string"}},
                                                "required": ["city"]}}}
FLIGHTS = {"type": "function", "function": {"name": "search_flights", "description": "Flights between cities",
                                            "parameters": {"type": "object", "properties": {
                                                "origin": {"type": "string"}, "destination": {"type": "string"},
                                                "passengers": {"type": "integer"}}}}}


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


DIALOGUES = {
    "two calls, replies between": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "You are a helpful travel agent."},
        {"role": "user", "content": "Is it warm in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call12345", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"celsius\": 21}"},
        {"role": "assistant", "content": "Yes, 21 degrees in Paris."},
        {"role": "user", "content": "And in Oslo, in fahrenheit?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("call67890", "get_weather", {"city": "Oslo", "unit": "fahrenheit"})]},
        {"role": "tool", "tool_call_id": "call67890", "name": "get_weather", "content": "{\"fahrenheit\": 39}"},
        {"role": "assistant", "content": "No, only 39 degrees Fahrenheit in Oslo."}]},
    "two calls in one message": {"tools": [WEATHER, FLIGHTS], "messages": [
        {"role": "user", "content": "Weather in Rome and flights from Berlin to Rome for 2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("callaaaaa", "get_weather", {"city": "Rome"}),
            call("callbbbbb", "search_flights", {"origin": "Berlin", "destination": "Rome", "passengers": 2})]},
        {"role": "tool", "tool_call_id": "callaaaaa", "name": "get_weather", "content": "{\"celsius\": 25}"},
        {"role": "tool", "tool_call_id": "callbbbbb", "name": "search_flights",
         "content": "[{\"flight\": \"LH232\", \"price\": 189}]"},
        {"role": "assistant", "content": "Rome is at 25 degrees; flight LH232 costs 189 euros."}]},
}

MARKERS = re.compile(r"<\|[^<>\s|]{1,40}\|>|<\|[^<>\s|]{1,40}>|<[^<>\s|/]{1,40}\|>|<｜[^｜]{1,40}｜>|</?s>"
                     r"|\[/?[A-Z_]{2,30}\]")


def family(name: str) -> str:
    return re.sub(r"(_training|_v\d+)+$", "", name)


def template_tokenizer(base, text: str):
    """The base tokenizer with this template and its markers as special tokens."""
    tok = copy.deepcopy(base)
    tok.chat_template = text
    found = set()
    for rec in DIALOGUES.values():
        messages, _ = normalise(rec)
        for args_as_text in (False, True):
            msgs = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"])}} for c in m["tool_calls"]]} if args_as_text and m.get("tool_calls")
                    else m for m in messages]
            try:
                found |= set(MARKERS.findall(tok.apply_chat_template(msgs, tools=rec["tools"], tokenize=False)))
            except Exception:  # noqa: BLE001 - a template that refuses: its markers do not matter
                pass
    found |= set(MARKERS.findall(text))
    if found:
        tok.add_special_tokens({"additional_special_tokens": sorted(found)})
    return tok


def written(value, text: str) -> bool:
    value = str(value).lower() if isinstance(value, bool) else str(value)
    return any(v in text for v in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]))


def leaves(x):
    if isinstance(x, dict):
        return [v for y in x.values() for v in leaves(y)]
    if isinstance(x, list):
        return [v for y in x for v in leaves(y)]
    return [x]


def judge(renderer, rec) -> tuple[str, str]:
    """("trained" | "refused" | "WRONG", detail) for one dialogue."""
    messages, _ = normalise(rec)
    d = Dialogue("d", messages, "bench", record_tools(rec))
    try:
        ex = renderer.render(d)
    except DataError as e:
        return "refused", str(e).split(": ", 1)[-1].split(". Fix the record")[0]
    tok = renderer.tok
    form = renderer.template.call_form or (False, False)  # the form the renderer chose for this template
    full = tok.apply_chat_template(call_form(d.messages, form), tools=d.tools, tokenize=False)
    if tok.decode(ex.input_ids.tolist()) != full:
        return "WRONG", "the tokens are not the template's rendering of the dialogue"
    assistant = [m for m in d.messages if m["role"] == "assistant"]
    if sorted(set(ex.turn_ids.tolist()) - {-1}) != list(range(len(assistant))):
        return "WRONG", "not every assistant turn is trained"
    tool_texts = [m["content"].strip() for m in d.messages if m["role"] == "tool"]
    for t, m in enumerate(assistant):
        text = tok.decode(ex.input_ids[ex.turn_ids == t].tolist())
        leaked = [x for x in tool_texts if written(x, text)]
        if leaked:
            return "WRONG", f"turn {t} trains a tool's output {leaked[0]!r}: {text!r}"
        for c in m.get("tool_calls", ()):
            fn = c["function"]
            missing = [v for v in [fn["name"], *leaves(fn["arguments"])] if not written(v, text)]
            if missing:
                return "WRONG", f"turn {t} trains {text!r} without its call's {missing[0]!r}"
        if m["content"].strip() and m["content"].strip() not in text:
            return "WRONG", f"turn {t} trains {text!r} without its content"
    calls = [tok.decode(ex.input_ids[ex.turn_ids == t].tolist()) for t, m in enumerate(assistant) if m.get("tool_calls")]
    return "trained", calls[0] if calls else ""


def default_dir() -> str:
    spec = importlib.util.find_spec("trl")
    if spec is not None and spec.submodule_search_locations:
        d = os.path.join(spec.submodule_search_locations[0], "chat_templates")
        if os.path.isdir(d):
            return d
    return os.path.join(ROOT, "tests", "fixtures", "templates")


def run(folder: str) -> dict:
    base = load_tokenizer(resolve_model_path("smollm2"))
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.jinja"))):
        name = os.path.basename(path)[:-len(".jinja")]
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tok = template_tokenizer(base, text)
        res = {}
        for label, rec in DIALOGUES.items():
            res[label] = judge(Renderer(tok, 8192), rec)
        out[name] = res
    return out


def summary(results: dict) -> list[dict]:
    """One row per family: its templates' verdicts on the dialogues (trained, refused and why, WRONG)."""
    rows: dict[str, dict] = {}
    for name, res in results.items():
        row = rows.setdefault(family(name), {"family": family(name), "templates": [], "verdicts": Counter(),
                                             "why": Counter(), "call": ""})
        row["templates"].append(name)
        for verdict, detail in res.values():
            row["verdicts"][verdict] += 1
            if verdict != "trained":
                row["why"][detail.split(";")[0][:110]] += 1
            elif detail and not row["call"]:
                row["call"] = detail
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--templates", default=None, help="folder of .jinja chat templates")
    ap.add_argument("--out", default=None, help="write every verdict as JSON here")
    a = ap.parse_args()
    folder = a.templates or default_dir()
    results = run(folder)
    rows = summary(results)
    total = Counter(v for res in results.values() for v, _ in res.values())
    print(f"{len(results)} templates from {folder}, {len(DIALOGUES)} agent dialogues each: "
          f"{total['trained']} trained, {total['refused']} refused, {total['WRONG']} WRONG\n")
    print("| family | templates | dialogues trained / refused / WRONG | a calling turn's trained text, or why refused |")
    print("| --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["family"]):
        v = r["verdicts"]
        why = r["call"] if r["call"] else "; ".join(r["why"])
        print(f"| {r['family']} | {len(r['templates'])} | {v['trained']} / {v['refused']} / {v['WRONG']} | "
              f"`{why[:150]!r}` |" if r["call"] else
              f"| {r['family']} | {len(r['templates'])} | {v['trained']} / {v['refused']} / {v['WRONG']} | {why[:200]} |")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"folder": folder, "results": results}, f, indent=1, ensure_ascii=False)
    if total["WRONG"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
