"""The checks no template can fool, for dialogues with tool calls, tool messages or a tools list, on
every span path: a calling turn's trained text must hold its call (function name and every argument
value, as the template writes them), no trained text may hold a tool message's output, a reply's
must hold its content. A template that writes the tool's response inside the model's turn (Gemma 4)
gets the turn cut where the response starts (sub-turn masking: the call trains, the response is
context). What fails is refused with its cause (template_drops_calls, template_drops_tools,
template_tool_output, template_rewrites), never trained.
"""
from __future__ import annotations

import json

from ..errors import InvalidRecord
from .records import Dialogue
from .template import PLACEHOLDER, Template, common_prefix, differing, shows, written


def check_rendered(d: Dialogue, text: str) -> None:
    """A template that leaves out tool calls or tool messages (Llama 3.0's, LFM2's, Phi-3's) cannot
    train them: refused with the cause, before any span is looked for."""
    for j, m in enumerate(d.messages):
        for c in m.get("tool_calls", ()):
            name = c.get("function", c).get("name", "")
            if name and name not in text:
                raise InvalidRecord("template_drops_calls", f"the chat template does not render tool calls (message "
                                    f"{j} calls {name!r}, which is not in its rendering), so the turn would train an "
                                    "empty reply; set model.chat_template to a template that renders tool_calls")
        if m["role"] == "tool" and m["content"].strip() and not written(m["content"].strip(), text):
            raise InvalidRecord("template_drops_tools", f"the chat template does not render tool messages (message {j}'s "
                                "output is not in its rendering), so a reply would train without the output it "
                                "answers; set model.chat_template to a template with a tool role")


def check_tool_spans(t: Template, d: Dialogue, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each span checked against the dialogue's calls and tool outputs, and cut before a tool's response
    the template writes inside the model's own turn. Anything else is one located error (or a
    counted skip), never trained."""
    regions = tool_regions(t, d, text)
    assistant = [j for j, m in enumerate(d.messages) if m["role"] == "assistant"]
    out = []
    for n, ((s, e), j) in enumerate(zip(spans, assistant)):
        m = d.messages[j]
        inside = sorted(r for r in regions if r[0] < e and r[1] > s)
        if inside:
            cut = call_end(t, d, j, text, s, inside[0][0]) if inside[0][0] > s else s
            if cut <= s or text[s:cut].strip() == "":
                raise InvalidRecord("template_tool_output", f"assistant message {n}'s text cannot be told apart "
                                    "from a tool's output in this template's rendering (the span would train "
                                    "the tool's response); set model.chat_template to one that renders it apart")
            e = s + len(text[s:cut].rstrip())
        if m.get("tool_calls"):
            s = call_start(t, d, j, text, s)
        span = text[s:e]
        for call in m.get("tool_calls", ()):
            fn = call.get("function", call)
            missing = [v for v in [fn.get("name", ""), *leaf_values(fn.get("arguments"))] if v and not written(v, span)]
            if missing:
                raise InvalidRecord("template_drops_calls", f"the chat template does not write assistant turn {n}'s "
                                    f"tool call into its reply ({missing[0]!r} is not in the trained text): it "
                                    "renders none of the turn's calls, or only some (one call per message), so "
                                    "the turn would train a reply without its call; set model.chat_template to "
                                    "a template that renders them, or give one call per message")
        if m["content"].strip() and not shows(m, span):
            raise InvalidRecord("template_rewrites", f"assistant message {n}'s content is not in its trained text "
                                "(the chat template rewrites it); set model.chat_template to one that keeps it")
        if out and s < out[-1][1]:
            raise InvalidRecord("template_rewrites", f"assistant message {n} could not be located apart from the "
                                "message before it in the rendering of this dialogue; set model.chat_template "
                                "to a template that renders it as given")
        out.append((s, e))
    return out


def tool_regions(t: Template, d: Dialogue, text: str) -> list[tuple[int, int]]:
    """Where each tool message's content is in `text` (the whole dialogue's rendering): located
    like an assistant message, by a probe with its content replaced by a placeholder; where the
    template refuses that probe, every place the content appears."""
    regions = []
    for j, m in enumerate(d.messages):
        if m["role"] != "tool" or not m["content"].strip():
            continue
        mark = PLACEHOLDER.format(j)
        try:
            other = t.render([*d.messages[:j], {**m, "content": mark}, *d.messages[j + 1:]], False, d.tools,
                             plain=False)
        except InvalidRecord:
            other = None
        if other is not None and mark in other:
            regions.append(differing(text, other))
            continue
        needle = m["content"].strip()
        needle = needle if needle in text else json.dumps(needle, ensure_ascii=False)[1:-1]
        at = text.find(needle)
        while at >= 0:
            regions.append((at, at + len(needle)))
            at = text.find(needle, at + 1)
    return regions


def call_start(t: Template, d: Dialogue, j: int, text: str, s: int) -> int:
    """Where calling message j's own text starts: a routing header the model writes before the call
    (`<|start|>assistant to=get_weather<|message|>`: the model writes ` to=get_weather`) is
    between the generation prompt and the located call; it is the model's text too. Only plain
    text on the header's line is taken over this way (no markup, no line break, no special token:
    a template's own `<think></think>` before a call stays context, as before a reply)."""
    try:
        p = t.render(d.messages[:j], True, d.tools, plain=False)
    except InvalidRecord:
        return s
    gap = text[len(p):s]
    plain = gap.strip() and len(gap) < 64 and not any(c in gap for c in "<>\n[]")
    if text.startswith(p) and plain and not any(sp in gap for sp in t.specials):
        return len(p) + len(gap) - len(gap.lstrip())
    return s


def call_end(t: Template, d: Dialogue, j: int, text: str, s: int, limit: int) -> int:
    """Where calling message j's own text ends in `text`, before `limit` (a tool's output that the
    template writes inside the same turn): as far as `text` goes on like the rendering of the
    dialogue up to message j, which ends with what the template writes after a call when
    nothing follows (its end-of-call or end-of-turn markers), and never inside a special token."""
    try:
        upto = t.render(d.messages[:j + 1], False, d.tools, plain=False)
        a = common_prefix(text, upto)
    except InvalidRecord:
        a = 0
    return t.snap(text, s, min(a, limit) if a > s else limit)


def leaf_values(args) -> list[str]:
    """The argument values a rendered call must show: every string, number and boolean leaf."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return [args]
    if isinstance(args, dict):
        return [v for x in args.values() for v in leaf_values(x)]
    if isinstance(args, list):
        return [v for x in args for v in leaf_values(x)]
    return [] if args is None else [str(args) if not isinstance(args, bool) else str(args).lower()]
