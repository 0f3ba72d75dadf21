"""Sentinel renders: where each message's text lies in a chat template's render.

The conversation is rendered once more with a unique *sentinel* in place of every message text: content
(or each text part), reasoning, and the string values of tool-call arguments. Markup inside a text (the
tokenizer's added tokens, `<think>`-like tags, `[TAGS]`) and its leading/trailing whitespace stay as they
are, so a template that strips, splits on `</think>` or branches on a tag sees the same structure. The
template text between sentinels is then the same in both renders, and `align` maps sentinel positions onto
the real render (checking that the template text in between really is identical); a template that
transforms a text (tojson, trim, split) is handled by matching the transformed text against the original.
When sentinels cannot be aligned, `search_occurrences` finds the real texts instead (the last resort).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # template.py builds on this module
    from shardtune.data.template import TemplateView

REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
_TAGS = r"</?[A-Za-z][\w:.\-]*>|\[/?[A-Z][A-Z_ ]{2,}\]"


class Occurrence(NamedTuple):
    start: int
    end: int
    piece: int  # index into Sentinels.pieces


class Piece(NamedTuple):
    message: int  # index of the message the text belongs to
    text: str  # the text (without its leading/trailing whitespace) that the sentinel stands for
    lead: int = 0  # how much leading whitespace of the message's text goes before it


@lru_cache(maxsize=32)
def markup_pattern(added_tokens: tuple[str, ...]) -> re.Pattern:
    """Text kept as is inside messages: the tokenizer's added tokens and tag-like markup."""
    tokens = "|".join(re.escape(t) for t in sorted(added_tokens, key=len, reverse=True) if t.strip())
    return re.compile(f"({tokens + '|' if tokens else ''}{_TAGS})")


class Sentinels:
    """Message texts replaced by unique markers (`replace=False` keeps the texts and only lists them)."""

    def __init__(self, messages: list[dict[str, Any]], markup: re.Pattern, avoid: str, roles: set[str] | None,
                 replace: bool = True, calls: bool = True):
        salt = "sNtL"
        while salt in avoid:
            salt += "q"
        self.open, self.close = salt, salt[::-1]
        self.regex = re.compile(re.escape(self.open) + r"(\d+)" + re.escape(self.close))
        self.markup, self.replace, self.calls = markup, replace, calls
        self.pieces: list[Piece] = []
        self.messages = [self._message(i, m) if roles is None or m.get("role") in roles else m
                         for i, m in enumerate(messages)]

    def occurrences(self, text: str) -> list[Occurrence]:
        if self.replace:
            return [Occurrence(m.start(), m.end(), int(m.group(1))) for m in self.regex.finditer(text)]
        return search_occurrences(text, self.pieces)

    def _message(self, i: int, m: dict[str, Any]) -> dict[str, Any]:
        out = dict(m)
        content = m.get("content")
        if isinstance(content, str):
            out["content"] = self._text(i, content)
        elif isinstance(content, list):
            out["content"] = [{**p, "text": self._text(i, p["text"])} if isinstance(p, dict) and
                              isinstance(p.get("text"), str) else p for p in content]
        for key in REASONING_FIELDS:
            if isinstance(m.get(key), str):
                out[key] = self._text(i, m[key])
        if self.calls and isinstance(m.get("tool_calls"), list):
            out["tool_calls"] = [self._call(i, c) for c in m["tool_calls"]]
        return out

    def _call(self, i: int, call: Any) -> Any:
        if not isinstance(call, dict):
            return call
        fn = call.get("function")
        if isinstance(fn, dict) and "arguments" in fn:
            return {**call, "function": {**fn, "arguments": self._value(i, fn["arguments"])}}
        if "arguments" in call:
            return {**call, "arguments": self._value(i, call["arguments"])}
        return call

    def _value(self, i: int, v: Any) -> Any:
        if isinstance(v, str):
            return self._text(i, v)
        if isinstance(v, dict):
            return {k: self._value(i, x) for k, x in v.items()}
        if isinstance(v, list):
            return [self._value(i, x) for x in v]
        return v

    def _text(self, i: int, text: str) -> str:
        out = []
        for k, part in enumerate(self.markup.split(text)):
            core = part.strip()
            if k % 2 or not core:  # odd parts are markup
                out.append(part)
                continue
            lead = part[: len(part) - len(part.lstrip())]
            trail = part[len(part.rstrip()):]
            self.pieces.append(Piece(i, core, len(lead)))
            out.append(f"{lead}{self.open}{len(self.pieces) - 1}{self.close}{trail}" if self.replace else part)
        return "".join(out)


def search_occurrences(text: str, pieces: list[Piece]) -> list[Occurrence]:
    """The message texts found in order in a render of the real messages (texts the template drops are
    skipped); used when sentinels cannot be aligned."""
    out, pos = [], 0
    for k, piece in enumerate(pieces):
        p = text.find(piece.text, pos)
        if p >= 0:
            out.append(Occurrence(p, p + len(piece.text), k))
            pos = p + len(piece.text)
    return out


def _encodings(text: str) -> list[str]:
    """How a template may print a text: as is, or escaped as a JSON string (tojson)."""
    return list(dict.fromkeys((text, json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1])))


class Alignment:
    """Maps positions of a sentinel render onto the real render: `ranges[k]` is where occurrence k's text lies
    in the real render, and template text in between keeps its length."""

    def __init__(self, occurrences: list[Occurrence], ranges: list[tuple[int, int]]):
        self.occurrences, self.ranges = occurrences, ranges
        self._starts = [0] + [o.end for o in occurrences]
        self._real = [0] + [r[1] for r in ranges]

    def to_real(self, pos: int) -> int:
        k = bisect_right(self._starts, pos) - 1
        return self._real[k] + pos - self._starts[k]


def align(sentinel_text: str, real: str, occ: list[Occurrence], pieces: list[Piece]) -> Alignment | None:
    """Align a sentinel render with the real one; None when their template text differs (the template
    branched on a text, or changed it beyond stripping and JSON escaping)."""
    ranges, ps, pr = [], 0, 0
    for k, o in enumerate(occ):
        seg = sentinel_text[ps:o.start]
        if not real.startswith(seg, pr):
            return None
        pr += len(seg)
        nxt = sentinel_text[o.end: occ[k + 1].start] if k + 1 < len(occ) else sentinel_text[o.end:]
        end = _match(real, pr, pieces[o.piece].text, nxt, k + 1 == len(occ))
        if end is None:
            return None
        ranges.append((pr, end))
        pr, ps = end, o.end
    if real[pr:] != sentinel_text[ps:]:
        return None
    return Alignment(occ, ranges)


def _match(real: str, pos: int, text: str, nxt: str, last: bool) -> int | None:
    """End of the rendered form of `text` at `pos`, followed by the template text `nxt`."""
    encodings = _encodings(text)
    for enc in encodings:
        end = pos + len(enc)
        if real.startswith(enc, pos) and (real[end:] == nxt if last else real.startswith(nxt, end)):
            return end
    if not nxt:
        return len(real) if last and any(real[pos:] in e for e in encodings) else None
    # transformed text (a part of it, e.g. split on a marker, or stripped further): the next template text
    # must follow a piece of the original
    p = real.find(nxt, pos)
    for _ in range(64):
        if p < 0:
            return None
        if any(real[pos:p] in e for e in encodings) and (not last or real[p:] == nxt):
            return p
        p = real.find(nxt, p + 1)
    return None


class Located(NamedTuple):
    sent: Sentinels
    text: str  # the render the occurrences refer to (sentinel render, or the real one)
    occ: list[Occurrence]
    alignment: Alignment


def sentinel_avoid(view: TemplateView, msgs: list[dict[str, Any]]) -> str:
    """All text a sentinel must not occur in."""
    return view.template + repr(msgs) + repr(view.tools)


def locate(view: TemplateView, msgs: list[dict[str, Any]], real: str, level: str, avoid: str) -> Located | None:
    """Message texts in the whole render: `all` texts as sentinels, `assistant` texts only, `no_calls` (all but
    tool-call arguments, which the template may rewrite: a pythonic call made of a JSON string's slice), or
    `search`."""
    if level == "search":
        sent = Sentinels(msgs, view.markup, avoid, roles=None, replace=False)
        occ = sent.occurrences(real)
        if len(occ) < len(sent.pieces):  # a text not found in order: the search cannot be trusted
            return None
        return Located(sent, real, occ, Alignment(occ, [(o.start, o.end) for o in occ]))
    sent = Sentinels(msgs, view.markup, avoid, roles={"assistant"} if level == "assistant" else None,
                     calls=level != "no_calls")
    text = view.try_render(sent.messages)
    if text is None:
        return None
    occ = sent.occurrences(text)
    alignment = align(text, real, occ, sent.pieces)
    return Located(sent, text, occ, alignment) if alignment else None
