"""Where each assistant turn starts and ends in a chat template's render.

A turn **starts** where the template's generation prompt ends. The prefix `messages[:i]` is rendered with
`add_generation_prompt=True` and compared with the whole render from the last text both share (a sentinel,
see sentinels.py): the common part is the previous turn's closing plus the role header (and any text the
prompt pre-fills, like `<think>\\n`), which the model is given at inference, so it is never trained. A
prompt that differs from the history header ("Here are my reasoning steps:" vs "Hello!") stops at the first
differing character of template text, never inside a message text.

A turn **ends** with what the template writes after it both when it is the final message (`messages[:i+1]`)
and when the conversation goes on; the turn-closing tokens a template writes only in history (Apriel's
`<|end|>`, gpt-oss's `<|end|>` vs the final `<|return|>`) follow, and never the next message's header. Which
added tokens close a turn is learned once per template from a probe conversation (`template_facts`).
"""

from __future__ import annotations

import re
import weakref
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any, NamedTuple

from shardtune.data.sentinels import Alignment, Occurrence, Sentinels, align, markup_pattern
from shardtune.errors import DataError

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateMismatch(DataError):
    """The chat template cannot be split into turns consistently with its whole-conversation render."""


class TurnSpan(NamedTuple):
    start: int  # character offsets in the real render
    end: int
    closed: bool  # the span ends with a token that ends the turn


class TemplateView:
    """The chat template bound to a tokenizer, tools and template arguments."""

    def __init__(self, tokenizer: Any, template: str, tools: Any, kwargs: dict[str, Any]):
        self.tokenizer, self.template, self.tools, self.kwargs = tokenizer, template, tools, kwargs
        self.added, self.added_ids, self.markup, self.added_re = _token_info(tokenizer)
        self.eos = tokenizer.eos_token
        # what apply_chat_template passes to the template
        self._variables = {**tokenizer.special_tokens_map, **kwargs}

    def render(self, msgs: list[dict[str, Any]], gen: bool = False) -> str:
        """The template's text for these messages, exactly as `tokenizer.apply_chat_template` renders it."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[msgs], tools=self.tools, chat_template=self.template,
                                                add_generation_prompt=gen, **self._variables)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise DataError(f"the chat template refused the conversation ({type(e).__name__}: {e}). Fix: "
                            "change the row to what the template accepts, or set data.chat_template") from None
        return rendered[0]

    def try_render(self, msgs: list[dict[str, Any]], gen: bool = False) -> str | None:
        if not msgs:
            return None
        try:
            return self.render(msgs, gen)
        except DataError:
            return None

    def tokens_in(self, text: str) -> set[str]:
        return set(self.added_re.findall(text))


_TOKEN_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_info(tokenizer: Any) -> tuple:
    """The tokenizer's added tokens (contents, ids) and the patterns built from them, cached per tokenizer."""
    size = len(tokenizer)
    cached = _TOKEN_INFO.get(tokenizer)
    if cached is None or cached[0] != size:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        added = tuple(sorted({t.content for t in decoder.values()} | set(tokenizer.all_special_tokens)))
        pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True) if t.strip())
        cached = (size, (added, frozenset(decoder), markup_pattern(added), re.compile(pattern or r"(?!)")))
        _TOKEN_INFO[tokenizer] = cached
    return cached[1]


# ----------------------------------------------------------------------------------------------------------
# What a template writes to close a turn, learned once per template


@dataclass(frozen=True)
class TemplateFacts:
    closers: frozenset[str]  # added tokens that end an assistant turn (EOS included)
    always: str  # text appended after the last message whatever add_generation_prompt says (Command-R7B)
    prompt: str = ""  # the generation prompt after a user message (the assistant header)


_FACTS: dict[tuple, TemplateFacts] = {}


def template_facts(view: TemplateView) -> TemplateFacts:
    key = (view.template, view.added, view.eos, view.tokenizer.bos_token, repr(sorted(view.kwargs.items())),
           bool(view.tools))
    if key not in _FACTS:
        _FACTS[key] = _probe(view)
    return _FACTS[key]


def _probe(view: TemplateView) -> TemplateFacts:
    """Render user, assistant, user, assistant (with a system message if the template needs one) and read
    off which tokens close a history turn and a final turn."""
    base = frozenset({view.eos} if view.eos else ())
    turns = [{"role": r, "content": f"probe {r} {k}"} for k, r in enumerate(["user", "assistant"] * 2)]
    for prefix in ([], [{"role": "system", "content": "probe system"}]):
        sent = Sentinels(prefix + turns, view.markup, view.template, roles=None)
        k, sm = len(prefix), sent.messages
        try:
            full, gen1, nogen1, fin2 = (view.render(sm), view.render(sm[:k + 1], True), view.render(sm[:k + 1]),
                                        view.render(sm[:k + 2]))
        except DataError:
            continue
        where = [{o.piece: o for o in sent.occurrences(t)} for t in (full, gen1, nogen1, fin2)]
        p1, p2, p3, p4 = range(len(sent.pieces) - 4, len(sent.pieces))
        if not (all(p in where[0] for p in (p1, p2, p3, p4)) and p1 in where[1] and p1 in where[2]
                and p2 in where[3]):
            continue
        t_gen, t_nogen = gen1[where[1][p1].end:], nogen1[where[2][p1].end:]
        prompt = t_gen[snap_back(view, t_gen, _lcp(t_gen, t_nogen, 0, len(t_nogen))):]
        header_start = view.added_re.search(prompt)
        g = full[where[0][p2].end: where[0][p3].start]
        always = _always_appended(view, full, t_gen, t_nogen, g, full[where[0][p1].end: where[0][p2].start])
        f = _drop_suffix(fin2[where[3][p2].end:], always)
        c = snap_back(view, g, _lcp(f, g, 0, len(g)))
        rest = g[c:]
        if header_start and header_start.group() in rest:
            h = rest.index(header_start.group())
        else:  # the next header is what the gap before the first user message ends with as well (if anything)
            shared = _common_suffix(rest, full[: where[0][p1].start])
            h = _snap_forward(view, rest, len(rest) - shared) if shared else 0
        final = _drop_suffix(full[where[0][p4].end:], always)
        closers = frozenset(view.tokens_in(g[:c] + rest[:h]) | view.tokens_in(final)) | base
        return TemplateFacts(closers, always, prompt if view.added_re.search(prompt) else "")
    return TemplateFacts(base, "")


def _always_appended(view, full, t_gen, t_nogen, gap_after, gap_before) -> str:
    """A template that ignores add_generation_prompt=False ends every render with the assistant header."""
    if t_gen != t_nogen:
        return ""
    suffix = full[len(full) - _common_suffix(full, t_nogen):]
    return suffix if suffix.strip() and suffix in gap_before and suffix not in gap_after else ""


# ----------------------------------------------------------------------------------------------------------
# Turn boundaries from sentinel renders


def turn_spans(view: TemplateView, msgs: list[dict[str, Any]], real: str, offsets: list[tuple[int, int]],
               added: list[bool], wanted: list[int]) -> tuple[dict[int, TurnSpan], str]:
    """Spans of the assistant turns `wanted` in the real render, and how they were found: `markers`
    ({% generation %} blocks), `sentinels`, `assistant_sentinels` (only assistant texts replaced, when the
    template branches on other messages' texts) or `search` (the real texts looked up: the last resort)."""
    if GENERATION_RE.search(view.template):
        from shardtune.data.markers import marker_spans

        raw = marker_spans(view, msgs, real, wanted)
        return {i: finalize(real, offsets, added, s, e, None) for i, (s, e) in raw.items()}, "markers"
    facts = template_facts(view)
    why = None  # the first failure (the most precise way of locating texts that got that far)
    for level, method in (("all", "sentinels"), ("assistant", "assistant_sentinels"), ("search", "search")):
        loc = locate(view, msgs, real, level)
        if loc is None:
            continue
        try:
            raw = {i: raw_turn_span(view, loc, i, facts) for i in wanted}
        except _Unsure as e:
            why = why or (e.turn, e.why)
            continue
        return {i: finalize(real, offsets, added, s, e, facts.closers) for i, (s, e) in raw.items()}, method
    why = why or (wanted[0] if wanted else 0, "the template renders the message texts in a way that cannot be "
                  "located (it rewrites or reorders them)")
    raise TemplateMismatch(
        f"Turn {why[0]} (assistant): {why[1]}, so its trained span cannot be derived reliably. Fix: use a template "
        "with {% generation %} markers, or set data.ignore_input_ids_mismatch=true to skip such rows.")


class _Unsure(Exception):
    """These renders do not determine the turn; try the next way of locating texts."""

    def __init__(self, turn: int, why: str):
        super().__init__(turn, why)
        self.turn, self.why = turn, why


class Located(NamedTuple):
    sent: Sentinels
    text: str  # the render the occurrences refer to (sentinel render, or the real one)
    occ: list[Occurrence]
    alignment: Alignment


def locate(view: TemplateView, msgs: list[dict[str, Any]], real: str, level: str) -> Located | None:
    """Message texts in the whole render: `all` texts as sentinels, `assistant` texts only, or `search`."""
    avoid = view.template + repr(msgs) + repr(view.tools)
    if level == "search":
        sent = Sentinels(msgs, view.markup, avoid, roles=None, replace=False)
        occ = sent.occurrences(real)
        if len(occ) < len(sent.pieces):  # a text not found in order: the search cannot be trusted
            return None
        return Located(sent, real, occ, Alignment(occ, [(o.start, o.end) for o in occ]))
    sent = Sentinels(msgs, view.markup, avoid, roles=None if level == "all" else {"assistant"})
    text = view.try_render(sent.messages)
    if text is None:
        return None
    occ = sent.occurrences(text)
    alignment = align(text, real, occ, sent.pieces)
    return Located(sent, text, occ, alignment) if alignment else None


def raw_turn_span(view: TemplateView, loc: Located, i: int, facts: TemplateFacts) -> tuple[int, int]:
    """Turn i's (start, end) in the real render, before snapping to tokens; raises _Unsure."""
    text, occ, sm = loc.text, loc.occ, loc.sent.messages
    owner = [loc.sent.pieces[o.piece].message for o in occ]
    mine = [o for o, m in zip(occ, owner) if m == i]
    anchor = _anchor(view.try_render(sm[:i], gen=True), loc)
    if anchor is not None:
        tail, base = anchor
        limit = _next_text(occ, base, len(text))
        start = _markup_start(view, text, base + _lcp(tail, text, base, limit))
        # the assistant header further on: the previous message closes differently when it is not the last
        # one (Hermes' tool results), or the prompt after it announces no header (after a tool result)
        if facts.prompt and not text.endswith(facts.prompt, 0, start):
            closer = next((m.start() for m in view.added_re.finditer(text, start, limit) if m.group() in facts.closers),
                          limit)
            header = text.find(facts.prompt, start, mine[0].start if mine else closer)
            start = header + len(facts.prompt) if header >= 0 else start
    elif mine:  # no generation prompt to compare with (the turn opens the conversation): start at its text
        start = mine[0].start
    else:
        raise _Unsure(i, "the conversation before this turn cannot be rendered on its own")
    if i == len(sm) - 1:
        base = occ[-1].end if occ else 0
        end = base + len(_drop_suffix(text[base:], facts.always))
    else:
        anchor = _anchor(view.try_render(sm[: i + 1]), loc)
        if anchor is not None:
            tail, base = anchor
            limit = _next_text(occ, base, len(text))
            end = base + _lcp(_drop_suffix(tail, facts.always), text, base, limit)
            # closing tokens of this turn: not those of a message before it (when the turn has no text itself)
            closers = [m for m in view.added_re.finditer(text, max(base, start), limit) if m.group() in facts.closers]
            common = [m for m in closers if m.end() <= end]
            if common:  # both forms close the turn the same way: up to the last closing token they share
                end = common[-1].end()
            elif closers:  # the history form writes more (an id after a tool call) up to its closing token
                end = closers[0].end()
        elif mine:
            end = mine[-1].end
        else:
            raise _Unsure(i, "the conversation up to this turn cannot be rendered on its own")
    end = max(_markup_start(view, text, end), start)
    if any(o.start < start or o.end > end for o in mine):
        raise _Unsure(i, "its text lies outside the place where the template opens and closes the turn")
    if any(start < o.start < end for o, m in zip(occ, owner) if m != i):
        raise _Unsure(i, "another message's text lies between where the template opens and closes the turn")
    return loc.alignment.to_real(start), loc.alignment.to_real(end)


def _anchor(prefix: str | None, loc: Located) -> tuple[str, int] | None:
    """The text of a prefix render after its last located message text, and where that text ends in the whole
    render (0 and the whole prefix when the prefix has none)."""
    if prefix is None:
        return None
    occ = loc.sent.occurrences(prefix)
    if not occ:
        return prefix, 0
    last = occ[-1]
    ordinal = sum(o.piece == last.piece for o in occ)
    same = [o for o in loc.occ if o.piece == last.piece]
    return (prefix[last.end:], same[ordinal - 1].end) if len(same) >= ordinal else None


def _next_text(occ: list[Occurrence], pos: int, default: int) -> int:
    return next((o.start for o in occ if o.start >= pos), default)


def _lcp(a: str, b: str, b_start: int, b_end: int) -> int:
    """Length of the common prefix of a and b[b_start:b_end]."""
    n = min(len(a), b_end - b_start)
    lo = 0
    while lo + 64 <= n and a[lo:lo + 64] == b[b_start + lo: b_start + lo + 64]:
        lo += 64
    while lo < n and a[lo] == b[b_start + lo]:
        lo += 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _drop_suffix(text: str, suffix: str) -> str:
    return text[: len(text) - len(suffix)] if suffix and text.endswith(suffix) else text


def _markup_start(view: TemplateView, text: str, pos: int) -> int:
    """A boundary that falls inside a tag or an added token (the prompt's `<think>` vs the history's
    `</think>`) moves to where that markup starts: a token is never split."""
    for m in view.markup.finditer(text, max(0, pos - 64), pos + 64):
        if m.start() < pos < m.end():
            return m.start()
    return pos


def _snap_forward(view: TemplateView, text: str, n: int) -> int:
    """Move position n forward to the end of an added token it falls inside."""
    for m in view.added_re.finditer(text):
        if m.start() < n < m.end():
            return m.end()
    return n


def snap_back(view: TemplateView, text: str, n: int) -> int:
    """Move position n back to the start of an added token it falls inside."""
    for m in view.added_re.finditer(text):
        if m.start() >= n:
            break
        if n < m.end():
            return m.start()
    return n


# ----------------------------------------------------------------------------------------------------------
# Snapping to tokens


def finalize(real: str, offsets: list[tuple[int, int]], added: list[bool], start: int, end: int,
             closers: frozenset[str] | None) -> TurnSpan:
    """Snap a turn to token boundaries (an added token is never split), add the turn-closing tokens that
    follow it (`closers`; None: the span is final, as generation markers set it) and drop the whitespace the
    template prints after it."""
    starts = [a for a, _ in offsets]
    k = bisect_right(starts, start) - 1
    if 0 <= k and offsets[k][0] < start < offsets[k][1] and added[k]:
        start = offsets[k][0]  # the prompt stopped inside a token the model must generate
    k = bisect_right(starts, end) - 1
    if 0 <= k and offsets[k][0] < end < offsets[k][1] and added[k]:
        end = offsets[k][0]
    if closers is not None:
        k = bisect_left(starts, end)
        while k < len(offsets):
            j = k
            while j < len(offsets) and not added[j] and not real[offsets[j][0]:offsets[j][1]].strip():
                j += 1  # whitespace before a closing token is generated with it
            if j < len(offsets) and added[j] and real[offsets[j][0]:offsets[j][1]] in closers:
                end, k = offsets[j][1], j + 1
            else:
                break
    end = max(start, start + len(real[start:end].rstrip()))
    k = bisect_left(starts, end) - 1
    last = real[offsets[k][0]:offsets[k][1]] if 0 <= k < len(offsets) and offsets[k][1] <= end else ""
    closed = 0 <= k < len(offsets) and added[k] and offsets[k][1] == end and (closers is None or last in closers)
    return TurnSpan(start, end, closed)
