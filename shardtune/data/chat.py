"""Conversation -> samples of (input_ids, labels): what the model learns from a chat.

The whole-conversation render of the tokenizer's chat template is the sample's `input_ids`. Only assistant
turns are trained; each trained span is the text the model generates in that turn (reasoning as rendered,
content, tool calls) plus the end-of-turn marker the render writes after it, never the role header or the
generation prompt, never another message's text, never whitespace printed after the end-of-turn token
(turns.py says how the spans are found, sentinels.py how message texts are located, markers.py how
`{% generation %}` blocks are used when the template has them).

Policies on top of the spans:
- end of turn: the last trained turn of a sample must end with a token that ends the turn; when the template
  writes none there (only before a following turn, only under a flag, or never), the tokenizer's EOS is
  appended and trained (`append_eos`: auto = only then, always, never);
- which turns: `train_on_turns` all or last; a message's own `train: true|false` overrides;
- weights (`weight_key`, data.message_weight_key): each trained token gets its turn's weight (1 when the message
  has none), the appended EOS the last turn's; untrained tokens 0. Masks decide what is trained, weights only
  scale it;
- `thinking_history: per_turn` makes one sample per trained turn, the conversation cut after that turn and
  only it trained, so every turn's reasoning is trained as the template renders a final turn.

`conversation_samples` also returns audit counts (see `AUDIT_KEYS`), summed per dataset.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import TemplateSyntaxError
from transformers.utils.chat_template_utils import _compile_jinja_template

from shardtune.batch import IGNORE_INDEX
from shardtune.config.schema import APPEND_EOS, THINKING_HISTORY, TRAIN_ON_TURNS
from shardtune.data.template import TemplateView
from shardtune.data.turns import Tokens, turn_spans
from shardtune.errors import DataError, TemplateMismatch

__all__ = ["IGNORE_INDEX", "MaskOptions", "TemplateMismatch", "Tokenized", "Weighted", "audit_totals",
           "conversation_samples", "make_sample", "tokenize_conversation", "weights_of"]
# rows, samples, per_turn_expansions, trained_turns, turns_without_end (as the template renders them),
# eos_appended (samples), closed_by_eos (turns without an end that the appended EOS closes), and how spans were
# found: method_markers, method_sentinels, method_assistant_sentinels, method_search (the last two fallbacks)
AUDIT_KEYS = ("rows", "samples", "per_turn_expansions", "trained_turns", "turns_without_end", "eos_appended",
              "closed_by_eos", "method_markers", "method_sentinels", "method_assistant_sentinels", "method_search")


def audit_totals(per_file: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The audit counts of a dataset's files summed, with the trained share of tokens (for the run's events)."""
    total: Counter = Counter()
    for counts in per_file.values():
        total.update(counts)
    out: dict[str, Any] = {k: total[k] for k in (*AUDIT_KEYS, "tokens", "trained_tokens") if total[k]}
    out["trained_share"] = round(total["trained_tokens"] / max(1, total["tokens"]), 4)
    return out


class Tokenized(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE_INDEX where not trained


class Weighted(NamedTuple):
    """A `Tokenized` sample of weighted data (data.message_weight_key)."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float]  # aligned with labels: each trained token's loss weight, 0 where nothing is trained


def weights_of(sample: Any) -> list[float] | None:
    """The per-token loss weights of a sample (None: unweighted data, every trained token weighs 1)."""
    return getattr(sample, "weights", None)


def make_sample(ids: list[int], labels: list[int], weights: list[float] | None) -> Tokenized | Weighted:
    """A `Tokenized` sample, or a `Weighted` one when it carries weights."""
    return Tokenized(ids, labels) if weights is None else Weighted(ids, labels, weights)


@dataclass(frozen=True)
class MaskOptions:
    append_eos: APPEND_EOS = "auto"
    train_on_turns: TRAIN_ON_TURNS = "all"
    thinking_history: THINKING_HISTORY = "as_rendered"

    @classmethod
    def from_config(cls, cfg: Any) -> MaskOptions:
        return cls(cfg.append_eos, cfg.train_on_turns, cfg.thinking_history)


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    tools: list[dict[str, Any]] | None = None,
    *,
    chat_template: str | None = None,
    append_eos: str = "auto",
    train_on_turns: str = "all",
    **template_kwargs: Any,
) -> Tokenized:
    """Render `messages` with the chat template and label the tokens of the trained assistant turns.

    Raises `TemplateMismatch` when the trained spans cannot be derived reliably."""
    samples, _ = conversation_samples(messages, tokenizer, tools, chat_template=chat_template,
                                      options=MaskOptions(append_eos, train_on_turns), **template_kwargs)
    return samples[0]


def conversation_samples(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    tools: list[dict[str, Any]] | None = None,
    *,
    chat_template: str | None = None,
    options: MaskOptions = MaskOptions(),
    weight_key: str | None = None,
    **template_kwargs: Any,
) -> tuple[list[Tokenized], Counter]:
    """The samples of one conversation (several with `thinking_history=per_turn`, none when it has no turn to
    train) and its audit counts. `weight_key`: the message field holding a turn's loss weight (checked by
    data/formats.py); the samples then carry per-token weights."""
    template = resolve_chat_template(chat_template, tokenizer)
    # the weight is the trainer's, not the template's: removed before rendering, like `train`
    msgs = [{k: v for k, v in m.items() if k not in ("train", weight_key) and v is not None} for m in messages]
    trained = _trained_turns(messages, options.train_on_turns)
    weights = None if weight_key is None else {i: float(messages[i].get(weight_key, 1.0)) for i in trained}
    view = TemplateView(tokenizer, template, tools, template_kwargs)
    audit: Counter = Counter(rows=1)
    if options.thinking_history == "per_turn":
        samples = [_sample(view, msgs[: i + 1], [i], options.append_eos, audit, weights) for i in trained]
        audit["per_turn_expansions"] += max(0, len(samples) - 1)
    else:
        samples = [_sample(view, msgs, trained, options.append_eos, audit, weights)]
    audit["samples"] += len(samples)
    return samples, audit


def resolve_chat_template(spec: str | None, tokenizer: Any) -> str:
    """The chat template to use: data.chat_template (a Jinja string or a path to a .jinja file), else the
    tokenizer's own."""
    if spec is None:
        template = tokenizer.chat_template
        if not template:
            raise DataError("The tokenizer has no chat template. Fix: set data.chat_template (a Jinja string or file).")
        template = template if isinstance(template, str) else template.get("default", next(iter(template.values())))
        origin = ("the tokenizer's chat template (tokenizer_config.json / chat_template.jinja of "
                  f"{tokenizer.name_or_path})")
    elif "{%" not in spec and "{{" not in spec:
        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            raise DataError(f"data.chat_template='{spec}' is neither a Jinja template nor an existing file.")
        template, origin = path.read_text(), f"the chat template {path} (data.chat_template)"
    else:
        template, origin = spec, "the chat template given in data.chat_template"
    try:  # a syntax error is the template's, not the first row's
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise DataError(f"{origin} is not valid Jinja: {e.message} (line {e.lineno}). Fix: correct the template, "
                        "or set data.chat_template to one that works.") from None
    return template


def _trained_turns(messages: list[dict[str, Any]], train_on_turns: str) -> list[int]:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = assistant[-1] if assistant else -1
    return [i for i in assistant if messages[i].get("train", train_on_turns == "all" or i == last)]


def _sample(view: TemplateView, msgs: list[dict[str, Any]], turns: list[int], append_eos: str,
            audit: Counter, weights: dict[int, float] | None = None) -> Tokenized:
    tokenizer = view.tokenizer
    real = view.render(msgs)
    enc = tokenizer(real, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    tokens = Tokens(offsets, [a for a, _ in offsets], [i in view.added_ids for i in ids])
    spans, method = turn_spans(view, msgs, real, tokens, turns)
    audit[f"method_{method}"] += 1
    audit["trained_turns"] += len(spans)
    audit["turns_without_end"] += sum(not s.closed for s in spans.values())
    ranges = {i: _pieces(s.start, s.end, s.holes) for i, s in spans.items()}
    eos = tokenizer.eos_token_id
    if spans and eos is not None and append_eos != "never":
        last = max(spans)
        at_end = not real[spans[last].end:].strip()  # nothing but whitespace after the last trained turn
        # `always` adds the EOS where the turn ends with another token (e.g. a distinct end-of-turn token), never
        # a second one after a turn that already ends with it
        ends_with_eos = real[: spans[last].end].endswith(tokenizer.eos_token)
        if at_end and (not spans[last].closed or (append_eos == "always" and not ends_with_eos)):
            ranges[last] = _pieces(spans[last].start, len(real), spans[last].holes)
            audit["eos_appended"] += 1
            audit["closed_by_eos"] += not spans[last].closed
            labels = _label_tokens(ids, tokens, [r for rs in ranges.values() for r in rs])
            token_weights = _weigh_tokens(len(ids), tokens, ranges, weights)
            return make_sample(ids + [eos], labels + [eos],
                              None if token_weights is None else token_weights + [weights[last]])
    return make_sample(ids, _label_tokens(ids, tokens, [r for rs in ranges.values() for r in rs]),
                      _weigh_tokens(len(ids), tokens, ranges, weights))


def _pieces(start: int, end: int, holes: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """A trained span without its holes."""
    out, pos = [], start
    for a, b in holes:
        out.append((pos, a))
        pos = b
    return out + [(pos, end)]


def _label_tokens(input_ids: list[int], tokens: Tokens, spans: list[tuple[int, int]]) -> list[int]:
    """Label the tokens of the trained spans."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for t in _covered(tokens, spans):
        labels[t] = input_ids[t]
    return labels


def _weigh_tokens(n: int, tokens: Tokens, ranges: dict[int, list[tuple[int, int]]],
                  weights: dict[int, float] | None) -> list[float] | None:
    """Each trained token's weight: its turn's (the tokens `_label_tokens` labels, turn by turn); 0 elsewhere."""
    if weights is None:
        return None
    out = [0.0] * n
    for turn, spans in ranges.items():
        for t in _covered(tokens, spans):
            out[t] = weights[turn]
    return out


def _covered(tokens: Tokens, spans: list[tuple[int, int]]) -> Iterator[int]:
    """The tokens that overlap a trained span (a zero-width token: that start inside one)."""
    offsets, starts = tokens.offsets, tokens.starts
    for s, e in spans:
        for t in range(max(0, bisect_left(starts, s) - 1), len(offsets)):
            a, b = offsets[t]
            if a >= e:
                break
            if (b > a and b > s) or (a == b and s <= a):
                yield t
