"""A chat template bound to a tokenizer, and what it writes to close a turn (learned once per template).

`TemplateView` renders exactly as `tokenizer.apply_chat_template` does. `template_facts` renders a probe
conversation (user, assistant, user, assistant) once per template and reads off which added tokens close an
assistant turn, in history and as the final message (Apriel writes `<|end|>` only after history turns,
gpt-oss `<|end|>` in history and `<|return|>` at the end), the assistant header that the generation prompt
opens, the token a header opens with, the closing when it is plain text, and any text the template appends
whatever `add_generation_prompt` says (Command R7B's and Command A's header, CodeLlama-70B's prompt).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from shardtune.data.sentinels import Sentinels, markup_pattern
from shardtune.errors import DataError


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
        return self.render_tracked(msgs, gen)[0]

    def render_tracked(self, msgs: list[dict[str, Any]], gen: bool = False,
                       generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The render, and with `generation` the character spans of its `{% generation %}` blocks. Whatever
        the template raises on a conversation becomes a DataError, so the bad-row policy applies."""
        try:
            rendered, blocks = render_jinja_template(conversations=[msgs], tools=self.tools,
                                                     chat_template=self.template, add_generation_prompt=gen,
                                                     return_assistant_tokens_mask=generation, **self._variables)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise DataError(f"the chat template refused the conversation ({type(e).__name__}: {e}). Fix: "
                            "change the row to what the template accepts, or set data.chat_template") from None
        return rendered[0], (list(blocks[0]) if generation else [])

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
    prompt: str = ""  # the generation prompt's last header after a user message (the assistant header)
    openers: frozenset[str] = frozenset()  # added tokens that open a header: a turn's closing never runs into one
    enders: frozenset[str] = frozenset()  # the closing tokens a turn ends with (EOS, the last of its closing)
    closing_text: str = ""  # a history turn's closing when it holds no added token (a closer the tokenizer
    # does not hold as a special token: `<｜hy_eos｜>` built by `.format`, a user's `### End`)


_FACTS: dict[tuple, TemplateFacts] = {}


def template_facts(view: TemplateView) -> TemplateFacts:
    key = (view.template, view.added, view.eos, view.tokenizer.bos_token, repr(sorted(view.kwargs.items())),
           bool(view.tools))
    if key not in _FACTS:
        _FACTS[key] = _probe(view)
    return _FACTS[key]


def _probe(view: TemplateView) -> TemplateFacts:
    """Render user, assistant, user, assistant (with a system message if the template needs one; as text parts
    if it renders only those) and read off which tokens close a history turn and a final turn."""
    base = frozenset({view.eos} if view.eos else ())
    for parts, prefix in ((False, []), (False, [{"role": "system", "content": "probe system"}]), (True, [])):
        turns = [{"role": r, "content": [{"type": "text", "text": f"probe {r} {k}"}] if parts else f"probe {r} {k}"}
                 for k, r in enumerate(["user", "assistant"] * 2)]
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
        prelude, g = full[: where[0][p1].start], full[where[0][p2].end: where[0][p3].start]
        opener = _opener(view, prelude)
        tail = full[where[0][p4].end:]
        always = _always_after_header(tail, g, t_gen, t_nogen, opener)
        if always:  # the prompt is the header the template always writes, and what add_generation_prompt adds
            prompt = t_gen[len(t_nogen) - len(always):]
        else:
            prompt = t_gen[snap_back(view, t_gen, common_prefix(t_gen, t_nogen, 0, len(t_nogen))):]
            always = _always_appended(view, full, t_gen, t_nogen, g, full[where[0][p1].end: where[0][p2].start]) \
                or _always_after_all(view, tail, g, t_gen, t_nogen)
        header_start = view.added_re.search(prompt)
        c = snap_back(view, g, common_prefix(drop_suffix(fin2[where[3][p2].end:], always), g, 0, len(g)))
        h = _next_header(view, g[c:], header_start.group() if header_start else None, prelude,
                         drop_suffix(t_nogen, always))
        final, closing = drop_suffix(tail, always), g[:c + h]
        # a BOS opens what follows, it never closes a turn
        closers = frozenset(view.tokens_in(closing) | view.tokens_in(final)) - {view.tokenizer.bos_token} | base
        openers = {t for t in (header_start.group() if header_start else None, opener) if t in view.added} - closers
        text_closer = closing.strip() if closing.strip() and not view.added_re.search(closing) else ""
        header = prompt[prompt.rfind(opener):] if opener and opener in prompt else prompt  # its last header
        enders = {t[-1] for t in (view.added_re.findall(closing), view.added_re.findall(final)) if t} | base
        return TemplateFacts(closers, always, header if view.added_re.search(header) else "", frozenset(openers),
                             frozenset(enders & closers), text_closer)
    return TemplateFacts(base, "")


def _next_header(view: TemplateView, rest: str, header_token: str | None, prelude: str, user_closing: str) -> int:
    """Where the next message's header starts in what a history turn is followed by (past the part both forms
    share): the latest of where the prompt's first token is, where the text the first user message's header
    ends with as well begins, and after the closing a user message ends with (when the turn's starts alike:
    the template closes every role the same way, Apriel's `\n<|end|>\n`)."""
    at = [rest.index(header_token)] if header_token and header_token in rest else []
    shared = common_suffix(rest, prelude)
    if rest[len(rest) - shared:].strip():
        at.append(_snap_forward(view, rest, len(rest) - shared))
    # (not the header the first user message's text is preceded by: a template that writes it twice)
    if user_closing.strip() and rest.startswith(user_closing) and \
            not prelude.rstrip().endswith(user_closing.strip()):
        at.append(len(user_closing))
    return max(at, default=0)


def _opener(view: TemplateView, prelude: str) -> str:
    """What the first header of a conversation opens with (after the BOS): an added token, else its first word
    (`<|START_OF_TURN_TOKEN|>`, `<|im_start|>`, `Source:`); "" when nothing comes before the first text."""
    bos = view.tokenizer.bos_token
    text = prelude[len(bos):] if bos and prelude.startswith(bos) else prelude
    text = text.lstrip()
    m = view.added_re.match(text)
    if m:
        return m.group()
    word = re.match(r"\S+", text)
    return word.group() if word else ""


def _always_after_header(final: str, history: str, t_gen: str, t_nogen: str, opener: str) -> str:
    """A header the template writes after the last message whatever add_generation_prompt says (Cohere's
    `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`, CodeLlama-70B's `Source: assistant\nDestination: user`): the
    text both no-prompt renders (after an assistant and after a user message) end with, from the header's
    opening on, which the prompt render writes at the same place (add_generation_prompt may add to it) and
    the history form after the turn does not (it is not the turn's own closing, a user's `### End`)."""
    if not opener:
        return ""
    shared = final[len(final) - common_suffix(final, t_nogen):]
    k = shared.find(opener)
    if k < 0:
        return ""
    always = shared[k:]
    if history.startswith(always, len(final) - len(always)):
        return ""
    return always if t_gen.startswith(always, len(t_nogen) - len(always)) else ""


def _always_after_all(view: TemplateView, final: str, history: str, t_gen: str, t_nogen: str) -> str:
    """Text every render ends with after its last message, with or without the prompt, which the history form
    does not write after a turn (InternLM2-reward's `<|reward|>`); it starts where markup does, never inside."""
    n = min(common_suffix(final, t_nogen), common_suffix(final, t_gen))
    k = len(final) - n
    for m in view.markup.finditer(final, max(0, k - 64), k + 64):
        if m.start() < k < m.end():
            k = m.end()
    always = final[k:].lstrip()
    if not always or history.startswith(always, len(final) - len(always)):
        return ""
    return always


def _always_appended(view, full, t_gen, t_nogen, gap_after, gap_before) -> str:
    """A template that ignores add_generation_prompt=False ends every render with the assistant header."""
    if t_gen != t_nogen:
        return ""
    suffix = full[len(full) - common_suffix(full, t_nogen):]
    return suffix if suffix.strip() and suffix in gap_before and suffix not in gap_after else ""


# ----------------------------------------------------------------------------------------------------------
# Text helpers


def common_prefix(a: str, b: str, b_start: int, b_end: int) -> int:
    """Length of the common prefix of a and b[b_start:b_end]."""
    n = min(len(a), b_end - b_start)
    lo = 0
    while lo + 64 <= n and a[lo:lo + 64] == b[b_start + lo: b_start + lo + 64]:
        lo += 64
    while lo < n and a[lo] == b[b_start + lo]:
        lo += 1
    return lo


def common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def drop_suffix(text: str, suffix: str) -> str:
    return text[: len(text) - len(suffix)] if suffix and text.endswith(suffix) else text


def markup_start(view: TemplateView, text: str, pos: int) -> int:
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
