"""Where each assistant turn starts and ends in a chat template's render.

A turn **starts** where the template's generation prompt ends. The prefix `messages[:i]` is rendered with
`add_generation_prompt=True` and compared with the whole render from the last text both share (a sentinel,
see sentinels.py): the common part is the previous turn's closing plus the role header (and any text the
prompt pre-fills, like `<think>\\n`), which the model is given at inference, so it is never trained. A
prompt that differs from the history header ("Here are my reasoning steps:" vs "Hello!") stops where the
template texts differ, compared piece by piece with whitespace aside, never inside a message text; the last
assistant header before the turn's text is prompt wherever it is written (inside the previous message's
render included), and so is what the template writes after the last message whatever add_generation_prompt
says (template.py).

A turn **ends** with what the template writes after it both when it is the final message (`messages[:i+1]`)
and when the conversation goes on; the turn-closing tokens a template writes only in history (Apriel's
`<|end|>`, gpt-oss's `<|end|>` vs the final `<|return|>`) follow, and never the next message's header. Which
added tokens close a turn is learned once per template from a probe conversation (template.py), and so is a
closing the tokenizer holds only as text, which history turns then close with as well.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Any, NamedTuple

from shardtune.data.markers import marker_spans
from shardtune.data.sentinels import Located, Occurrence, Sentinels, locate, sentinel_avoid
from shardtune.data.template import (
    TemplateFacts,
    TemplateView,
    common_prefix,
    drop_suffix,
    markup_start,
    template_facts,
)
from shardtune.errors import TemplateMismatch

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Tokens(NamedTuple):
    """The real render's tokens: character offsets, their starts (for bisect), which ones are added tokens."""
    offsets: list[tuple[int, int]]
    starts: list[int]
    added: list[bool]


class TurnSpan(NamedTuple):
    start: int  # character offsets in the real render
    end: int
    closed: bool  # the span ends with a token that ends the turn
    holes: tuple[tuple[int, int], ...] = ()  # parts inside that are not trained (between generation blocks)


# ----------------------------------------------------------------------------------------------------------
# Turn boundaries from sentinel renders


def turn_spans(view: TemplateView, msgs: list[dict[str, Any]], real: str, tokens: Tokens,
               wanted: list[int]) -> tuple[dict[int, TurnSpan], str]:
    """Spans of the assistant turns `wanted` in the real render, and how they were found: `markers`
    ({% generation %} blocks), `sentinels`, `assistant_sentinels` (only assistant texts replaced, when the
    template branches on other messages' texts) or `search` (the real texts looked up: the last resort)."""
    if GENERATION_RE.search(view.template):
        raw = marker_spans(view, msgs, real, wanted)
        return {i: finalize(real, tokens, s, e, None)._replace(holes=holes)
                for i, (s, e, holes) in raw.items()}, "markers"
    facts = template_facts(view)
    avoid = sentinel_avoid(view, msgs)
    why = None  # the first failure (the most precise way of locating texts that got that far)
    for level, method in (("all", "sentinels"), ("assistant", "assistant_sentinels"), ("no_calls", "sentinels"),
                          ("search", "search")):
        loc = locate(view, msgs, real, level, avoid)
        if loc is None:
            continue
        foreign = _texts_left_in_place(view, loc, msgs) if level == "assistant" else []
        try:
            raw = {i: raw_turn_span(view, loc, i, facts, foreign) for i in wanted}
        except _Unsure as e:
            why = why or (e.turn, e.why)
            continue
        return {i: finalize(real, tokens, s, e, facts.closers) for i, (s, e) in raw.items()}, method
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


def _texts_left_in_place(view: TemplateView, loc: Located, msgs: list[dict[str, Any]]) -> list[int]:
    """Where the other messages' texts (not replaced by sentinels) start in the sentinel render, so that a turn
    that holds one (Gemma 4 writes tool results inside the assistant turn) is caught. A text the template or the
    tools or assistant messages also hold could be theirs: it is left out."""
    shared = view.template + repr(view.tools) + repr([m for m in msgs if m.get("role") == "assistant"])
    texts = {p.text for p in Sentinels(msgs, view.markup, "", roles=None, replace=False).pieces
             if msgs[p.message].get("role") != "assistant" and p.text not in shared}
    return sorted(m.start() for t in texts for m in re.finditer(re.escape(t), loc.text))


def raw_turn_span(view: TemplateView, loc: Located, i: int, facts: TemplateFacts,
                  foreign: list[int] = ()) -> tuple[int, int]:
    """Turn i's (start, end) in the real render, before snapping to tokens; raises _Unsure. `foreign`: where
    texts of other messages that are not among the located ones start."""
    owner = [loc.sent.pieces[o.piece].message for o in loc.occ]
    mine = [o for o, m in zip(loc.occ, owner) if m == i]
    start = _turn_start(view, loc, i, facts, mine)
    if mine:  # whitespace the template writes before the turn's first text (not the text's own) is template
        # text, never generated: DeepSeek-V3.2's indentation after the `</think>` its prompt ends with
        own = loc.sent.pieces[mine[0].piece].lead
        gap = loc.text[start:mine[0].start - own]
        if not gap.strip():
            start += len(gap)
    end = max(markup_start(view, loc.text, _turn_end(view, loc, i, facts, mine, start)), start)
    if any(o.start < start or o.end > end for o in mine):
        raise _Unsure(i, "its text lies outside the place where the template opens and closes the turn")
    if any(start < o.start < end for o, m in zip(loc.occ, owner) if m != i) or any(start < q < end for q in foreign):
        raise _Unsure(i, "another message's text lies between where the template opens and closes the turn")
    return loc.alignment.to_real(start), loc.alignment.to_real(end)


def _turn_start(view: TemplateView, loc: Located, i: int, facts: TemplateFacts, mine: list[Occurrence]) -> int:
    """Where the generation prompt of the conversation before the turn ends in the whole render."""
    text, occ = loc.text, loc.occ
    anchor = _anchor(view.try_render(loc.sent.messages[:i], gen=True), loc)
    if anchor is None:  # no generation prompt to compare with: the assistant header before the turn's text
        if not mine:
            raise _Unsure(i, "the conversation before this turn cannot be rendered on its own")
        before = max((o.end for o in occ if o.end <= mine[0].start), default=0)
        header = text.rfind(facts.prompt, before, mine[0].start) if facts.prompt else -1
        return header + len(facts.prompt) if header >= 0 else mine[0].start
    tail, base = anchor
    limit = _next_text(occ, base, len(text))
    start = markup_start(view, text, base + common_prefix(tail, text, base, limit))
    start, whole = _prompt_pieces_end(view, tail, text, base, start, limit)
    # the assistant header further on: the previous message closes differently when it is not the last one
    # (Hermes' tool results), or the prompt after it announces no header (after a tool result)
    if facts.prompt and not whole and not text.endswith(facts.prompt, 0, start):
        closer = next((m.start() for m in view.added_re.finditer(text, start, limit) if m.group() in facts.closers),
                      limit)
        bound = mine[0].start if mine else closer
        # the last one before the turn's text, wherever it is written (inside the previous message's render:
        # a DeepSeek-V3 variant writes it in the last user message)
        header = text.rfind(facts.prompt, base, bound)
        start = max(start, header + len(facts.prompt) if header >= 0 else _renamed_header_end(view, text, base, bound,
                                                                                                facts.prompt))
    if mine and loc.sent.calls:  # another message's text written in the turn before its own (a template that
        # restates the system text in every message's header) is prompt, as the header around it; only where
        # the turn's tool calls are located too (a tool result written after the call is not before the turn)
        k = occ.index(mine[0]) - 1  # the texts before the turn's first one, back to the turn's start
        while k >= 0 and occ[k].start > start:
            if loc.sent.pieces[occ[k].piece].message != i:
                start = occ[k].end
                break
            k -= 1
        if not facts.prompt:
            start = max(start, _user_header_end(loc, start, mine[0].start))
    return start


def _user_header_end(loc: Located, start: int, text_start: int) -> int:
    """A template that announces no assistant header and writes every message alike (`[INST] ... [/INST]`
    whatever the role): the text before the turn's own text that the first user message's text is also
    preceded by (from the text before it) is a header, not generated, when the turn opens with it; where it
    ends (`start` when there is none)."""
    owner = [loc.sent.pieces[o.piece].message for o in loc.occ]
    first_user = next((k for k, m in enumerate(owner) if loc.sent.messages[m].get("role") == "user"), None)
    if first_user is None:
        return start
    lo = loc.occ[first_user - 1].end if first_user else 0
    header = loc.text[lo:loc.occ[first_user].start].strip()
    k = loc.text.find(header, start, text_start) if header else -1
    return k + len(header) if k >= 0 and not loc.text[start:k].strip() else start


def _prompt_pieces_end(view: TemplateView, prompt: str, text: str, base: int, start: int,
                       limit: int) -> tuple[int, bool]:
    """The prompt compared with the history text as text, past the first differing character: piece by piece
    (added tokens, tags, words), whitespace aside (DeepSeek-V3.2's `<｜Assistant｜>      </think>` prompt vs
    its history's `<｜Assistant｜>        </think>`). Returns where the match ends and whether it went past the
    first differing character to the prompt's end. When the prompt holds more than the history header
    (CodeLlama-70B's `Destination: user`) and ends with whitespace, the whitespace left before the turn's text is
    the header's."""
    p, q = start - base, start
    while True:
        rest = prompt[p:]
        p2 = p + len(rest) - len(rest.lstrip())
        seg = text[q:limit]
        q2 = q + len(seg) - len(seg.lstrip())
        if p2 >= len(prompt):
            break
        piece = _piece_at(view, prompt, p2)
        if q2 + len(piece) > limit or not text.startswith(piece, q2):
            break
        p, q = p2 + len(piece), q2 + len(piece)
    whole = q > start and not prompt[p:].strip()  # matched past the first differing character, to the end
    if whole:  # the prompt's last whitespace, as far as the history writes it too
        q += common_prefix(prompt[p:], text, q, limit)
    elif prompt[p:].strip() and prompt[-1:].isspace() and q < limit and not text[q:limit].strip():
        q = limit
    return q, whole


def _piece_at(view: TemplateView, text: str, pos: int) -> str:
    """The markup (added token, tag) or the word that starts at `pos`."""
    m = view.markup.match(text, pos)
    if m:
        return m.group()
    end = pos
    while end < len(text) and not text[end].isspace():
        end += 1
    inner = view.markup.search(text, pos + 1, end)
    return text[pos: inner.start() if inner else end]


def _renamed_header_end(view: TemplateView, text: str, lo: int, hi: int, prompt: str) -> int:
    """A history header that opens with the prompt's first token but names the role otherwise (the turn
    writes `<s>assistant`, the prompt `<s>bot`): where that header ends (after its line, or where markup
    or the turn's text begins); `lo` when there is none."""
    first = view.added_re.search(prompt)
    q = text.rfind(first.group(), lo, hi) if first else -1
    if q < 0:
        return lo
    p = q + len(first.group())
    line, markup = text.find("\n", p, hi), view.markup.search(text, p, hi)
    return min(line + 1 if line >= 0 else hi, markup.start() if markup else hi)


def _turn_end(view: TemplateView, loc: Located, i: int, facts: TemplateFacts, mine: list[Occurrence],
              start: int) -> int:
    """Where the turn's closing ends: what it is followed by both as the final message and in history, up to
    the closing tokens the history form writes."""
    text, occ = loc.text, loc.occ
    if i == len(loc.sent.messages) - 1:
        base = occ[-1].end if occ else 0
        end = base + len(drop_suffix(text[base:], facts.always))
        if not mine:
            return end
        # the turn ends with its end-of-turn token and the added tokens right after it; a closing tag whose
        # opening is not in the turn closes something else (a tool-results block left open across the turn)
        # (the last one: the turn's own text may hold such tokens)
        ender = next((m for m in reversed(list(view.added_re.finditer(text, mine[-1].end, end)))
                      if m.group() in facts.enders), None)
        return _token_run_end(view, text, ender.end(), end, facts.openers, start) if ender else end
    anchor = _anchor(view.try_render(loc.sent.messages[: i + 1]), loc)
    if anchor is None:  # the template cannot render the turn as the final message (gpt-oss, a call with text
        # parts): it closes as in history
        if not mine:
            raise _Unsure(i, "the conversation up to this turn cannot be rendered on its own")
        return _closed_as_in_history(view, loc, facts, mine)
    tail, base = anchor
    if mine and base < mine[-1].end:  # the final form drops the turn's text (Llama-Nemotron renders a final
        # turn's content, never its tool calls)
        return _closed_as_in_history(view, loc, facts, mine)
    limit = _next_text(occ, base, len(text))
    end = base + common_prefix(drop_suffix(tail, facts.always), text, base, limit)
    # closing tokens of this turn: not those of a message before it (when the turn has no text itself)
    closers = [m for m in view.added_re.finditer(text, max(base, start), limit) if m.group() in facts.closers]
    ender = next((m for m in closers if m.group() in facts.enders), None)
    if ender:  # both forms may go on with a header after the turn's last closing token (the turn of an empty
        # text the template writes after the calls): never trained
        end = min(end, next((m.start() for m in view.added_re.finditer(text, ender.end(), end)
                             if m.group() in facts.openers), end))
    common = [m for m in closers if m.end() <= end]
    if common:  # both forms close the turn the same way: up to the last closing token they share, and the
        # added tokens both write right after it (`<|im_end|><|stop|>` after a tool call, which the probe
        # conversation never shows), never a header's opening token
        return _token_run_end(view, text, common[-1].end(), end, facts.openers)
    if closers:  # the history form writes more (an id after a tool call) up to its closing token
        return closers[0].end()
    return _text_closer_end(facts, text, end, limit)


def _text_closer_end(facts: TemplateFacts, text: str, end: int, limit: int) -> int:
    """A history turn closed by text the tokenizer does not hold as a token (the probe's closing,
    `<｜hy_eos｜>` built by `.format`): the turn ends after it, as the final turn's appended EOS closes it."""
    closing = facts.closing_text
    seg = text[end:limit]
    q = end + len(seg) - len(seg.lstrip())
    return q + len(closing) if closing and text.startswith(closing, q) and q + len(closing) <= limit else end


def _closed_as_in_history(view: TemplateView, loc: Located, facts: TemplateFacts, mine: list[Occurrence]) -> int:
    """The end of the first closing token after the turn's last text (before the next message's text); without
    one (a call closed by gpt-oss's `<|call|>`, which the probe conversation never shows), where the next header
    opens with the prompt's first token; else the end of that text."""
    limit = _next_text(loc.occ, mine[-1].end, len(loc.text))
    closer = next((m for m in view.added_re.finditer(loc.text, mine[-1].end, limit) if m.group() in facts.closers),
                  None)
    if closer:
        return closer.end()
    closed = _text_closer_end(facts, loc.text, mine[-1].end, limit)
    if closed > mine[-1].end:
        return closed
    opener = view.added_re.search(facts.prompt)
    header = loc.text.find(opener.group(), mine[-1].end, limit) if opener else -1
    return header if header >= 0 else mine[-1].end


def _token_run_end(view: TemplateView, text: str, pos: int, limit: int, openers: frozenset[str],
                   opened_from: int | None = None) -> int:
    """The end of the added tokens that follow `pos` one after another (whitespace between them allowed) and
    end before `limit`, up to a header's opening token (and, with `opened_from`, up to a closing tag that closes
    no tag opened since then); `pos` when none does."""
    for m in view.added_re.finditer(text, pos, limit):
        t = m.group()
        if m.end() > limit or text[pos:m.start()].strip() or t in openers:
            break
        if opened_from is not None and t.startswith("</") and "<" + t[2:] not in text[opened_from:pos]:
            break
        pos = m.end()
    return pos


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


# ----------------------------------------------------------------------------------------------------------
# Snapping to tokens


def finalize(real: str, tokens: Tokens, start: int, end: int, closers: frozenset[str] | None) -> TurnSpan:
    """Snap a turn to token boundaries (an added token is never split), add the turn-closing tokens that
    follow it (`closers`; None: the span is final, as generation markers set it) and drop the whitespace the
    template prints after it."""
    offsets, starts, added = tokens
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
    return TurnSpan(start, end, _closed(real, tokens, start, end, closers))


def _closed(real: str, tokens: Tokens, start: int, end: int, closers: frozenset[str] | None) -> bool:
    """The span ends with added tokens (whitespace between them allowed), one of which closes a turn."""
    offsets, starts, added = tokens
    k = bisect_left(starts, end) - 1
    if not (0 <= k < len(offsets) and added[k] and offsets[k][1] == end):
        return False
    if closers is None:
        return True
    while k >= 0 and offsets[k][0] >= start:
        piece = real[offsets[k][0]:offsets[k][1]]
        if added[k] and piece in closers:
            return True
        if not added[k] and piece.strip():
            return False
        k -= 1
    return False
