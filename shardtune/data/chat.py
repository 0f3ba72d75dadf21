"""Conversation -> (input_ids, labels) with assistant-only labels, from the tokenizer's own chat template.

The whole-conversation render is the source of truth for `input_ids`. Which characters are trained
comes from `{% generation %}` markers when the template has them; otherwise from rendering the
conversation incrementally: assistant turn i starts where `render(messages[:i], add_generation_prompt)`
ends and ends where `render(messages[:i+1])` ends, each checked to be a prefix of the whole render.
Templates that rewrite history (Qwen3 strips the reasoning of turns before the last user message) break
the second check; then the turn ends at the first occurrence of the turn's closing text (e.g.
`<|im_end|>`) in the whole render, and the turn's content must be found inside. Anything else is a
`TemplateMismatch` that names the template problem and the turn.

A trained span keeps the end-of-turn token and drops whitespace the template prints after it (the
newline after `<|im_end|>`), which the model never has to generate.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from transformers.utils.chat_template_utils import render_jinja_template

from shardtune.errors import DataError

IGNORE_INDEX = -100
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateMismatch(DataError):
    """The chat template cannot be split into turns consistently with its whole-conversation render."""


class Tokenized(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE_INDEX where not trained


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    tools: list[dict[str, Any]] | None = None,
    *,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> Tokenized:
    """Render `messages` with the chat template and label the tokens of the trained assistant turns.

    Every assistant turn is trained unless its message says `train: false`; system, user and tool turns
    never are. Raises `TemplateMismatch` when the trained spans cannot be derived reliably.
    """
    template = chat_template or tokenizer.chat_template
    if not template:
        raise DataError("The tokenizer has no chat template. Fix: set data.chat_template to a Jinja template "
                        "(a string or a .jinja file).")
    msgs = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    trained = [m["role"] == "assistant" and m.get("train", True) for m in messages]
    renderer = _Renderer(tokenizer, template, tools, template_kwargs)
    specials = _special_strings(tokenizer)
    full = renderer(msgs, add_generation_prompt=False)
    if _GENERATION_RE.search(template):
        spans = renderer.generation_spans(msgs, full)
    else:
        spans = _spans_by_prefix(renderer, msgs, full, specials)
    spans = [_trim_after_end_token(full, s, specials) for i, s in spans.items() if trained[i]]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = _label_tokens(input_ids, enc["offset_mapping"], spans)
    return Tokenized(input_ids, labels)


class _Renderer:
    def __init__(self, tokenizer: Any, template: str, tools: Any, kwargs: dict[str, Any]):
        self.tokenizer, self.template, self.tools, self.kwargs = tokenizer, template, tools, kwargs

    def __call__(self, msgs: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                msgs, tools=self.tools, chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **self.kwargs,
            )
        except TemplateError as e:
            raise DataError(f"the chat template refused the conversation ({type(e).__name__}: {e}). Fix: "
                            "change the row to what the template accepts, or set data.chat_template") from None

    def generation_spans(self, msgs: list[dict[str, Any]], full: str) -> dict[int, tuple[int, int]]:
        """Character spans of `{% generation %}` blocks, matched to the assistant messages in order."""
        kwargs = {**self.tokenizer.special_tokens_map, **self.kwargs}
        rendered, indices = render_jinja_template(
            conversations=[msgs], tools=self.tools, chat_template=self.template,
            return_assistant_tokens_mask=True, **kwargs,
        )
        if rendered[0] != full:
            raise TemplateMismatch("The chat template renders differently with generation tracking on. "
                                   "Fix: report this template; set data.ignore_input_ids_mismatch=true to skip such rows.")
        assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        spans = indices[0]
        if len(spans) != len(assistant):
            raise TemplateMismatch(
                f"The chat template marks {len(spans)} {{% generation %}} block(s) but the conversation has "
                f"{len(assistant)} assistant turn(s). Fix: the template must wrap each assistant turn once.")
        return dict(zip(assistant, spans))


def _spans_by_prefix(
    render: _Renderer, msgs: list[dict[str, Any]], full: str, specials: list[str]
) -> dict[int, tuple[int, int]]:
    spans = {}
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateMismatch("Assistant turn 0 has no prompt before it. Fix: start the conversation "
                                   "with a system or user message.")
        start = _turn_start(render, msgs, i, full)
        spans[i] = (start, _turn_end(render, msgs, i, full, start, specials))
    return spans


def _turn_start(render: _Renderer, msgs: list[dict[str, Any]], i: int, full: str) -> int:
    with_prompt = render(msgs[:i], add_generation_prompt=True)
    if full.startswith(with_prompt):
        return len(with_prompt)
    # The generation prompt may differ from a history turn's header (Qwen3 with enable_thinking=false adds an
    # empty think block): take the longest part of the generation prompt that the whole render repeats.
    history = render(msgs[:i], add_generation_prompt=False)
    if not (full.startswith(history) and with_prompt.startswith(history)):
        raise TemplateMismatch(
            f"Turn {i} (assistant): the conversation up to this turn, rendered alone, is not a prefix of the "
            f"whole conversation's render, so the template is not prefix-stable here. "
            f"Fix: use a template with {{% generation %}} markers, or data.ignore_input_ids_mismatch=true to "
            f"skip such rows.")
    prompt = with_prompt[len(history):]
    n = 0
    while n < len(prompt) and len(history) + n < len(full) and prompt[n] == full[len(history) + n]:
        n += 1
    if n == 0:
        raise TemplateMismatch(f"Turn {i} (assistant): the whole render does not start this turn with the "
                               f"template's generation prompt {prompt!r}.")
    return len(history) + n


def _turn_end(
    render: _Renderer, msgs: list[dict[str, Any]], i: int, full: str, start: int, specials: list[str]
) -> int:
    upto = render(msgs[: i + 1], add_generation_prompt=False)
    if full.startswith(upto):
        return len(upto)
    # History rewritten (e.g. reasoning stripped from earlier turns): end at the turn's closing text.
    alone = upto[start:] if upto.startswith(full[:start]) else ""
    closing = _closing_text(alone, specials)
    content = msgs[i].get("content")
    answer = content.split("</think>")[-1].strip() if isinstance(content, str) else ""
    end = full.find(closing, start) if closing else -1
    if end < 0 or answer not in full[start:end]:
        raise TemplateMismatch(
            f"Turn {i} (assistant): the template renders this turn differently once later turns follow "
            f"(it rewrites history), and its end could not be located in the whole render. Fix: use a template "
            f"with {{% generation %}} markers, or data.ignore_input_ids_mismatch=true to skip such rows.")
    return end + len(closing)


def _closing_text(turn: str, specials: list[str]) -> str:
    """The text that closes a rendered turn: from its last special token on (e.g. `<|im_end|>\\n`)."""
    last = max((turn.rfind(s) for s in specials), default=-1)
    return turn[last:] if last >= 0 else ""


def _special_strings(tokenizer: Any) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    out = {t.content for t in added.values() if getattr(t, "special", False)}
    out.update(tokenizer.all_special_tokens)
    return sorted((s for s in out if s), key=len, reverse=True)


def _trim_after_end_token(full: str, span: tuple[int, int], specials: list[str]) -> tuple[int, int]:
    """Drop whitespace that follows the span's last special token (it is never generated)."""
    start, end = span
    stripped = len(full[start:end].rstrip())
    if stripped == end - start:
        return span
    text = full[start : start + stripped]
    if any(text.endswith(s) for s in specials):
        return start, start + stripped
    return span


def _label_tokens(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Label a token when it overlaps a trained span (a zero-width token: when it starts inside one)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    spans = sorted(spans)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        s, e = spans[k]
        if (b > a and a < e and b > s) or (a == b and s <= a < e):
            labels[t] = input_ids[t]
    return labels
