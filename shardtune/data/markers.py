"""`{% generation %}` markers: the template itself says which characters the model generates.

The blocks are authoritative. A template may mark several blocks in one assistant turn (TRL's
phi3_training.jinja marks the content and, at the end, the EOS separately); each block is given to the
assistant turn it lies in (or right after, or right before), located with sentinel renders when the block
count differs from the turn count, and the blocks of a turn are merged into one span; what lies between
two blocks is trained only when it is whitespace (it is a hole of the span otherwise).
"""

from __future__ import annotations

from typing import Any

from shardtune.data.sentinels import locate, sentinel_avoid
from shardtune.data.template import TemplateView
from shardtune.errors import TemplateMismatch


def marker_spans(view: TemplateView, msgs: list[dict[str, Any]], real: str,
                 wanted: list[int]) -> dict[int, tuple[int, int, tuple[tuple[int, int], ...]]]:
    """Per wanted turn: (start, end, holes), holes being the text between its blocks that is not marked and
    not only whitespace (Gemma 4 writes a tool result between the call and the rest of the turn)."""
    rendered, marked = view.render_tracked(msgs, generation=True)
    if rendered != real:
        raise TemplateMismatch("The chat template renders differently with generation tracking on. Fix: report "
                               "this template; set data.ignore_input_ids_mismatch=true to skip such rows.")
    blocks = sorted(b for b in marked if b[1] > b[0])
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    owners = assistant if len(blocks) == len(assistant) else _owners(view, msgs, real, blocks, assistant)
    per_turn: dict[int, list[tuple[int, int]]] = {}
    for block, i in zip(blocks, owners):
        per_turn.setdefault(i, []).append(block)
    out = {}
    for i in wanted:
        if i in per_turn:
            mine = sorted(per_turn[i])
            holes = tuple((a[1], b[0]) for a, b in zip(mine, mine[1:]) if real[a[1]:b[0]].strip())
            out[i] = (mine[0][0], max(e for _, e in mine), holes)
    return out


def _owners(view: TemplateView, msgs: list[dict[str, Any]], real: str, blocks: list[tuple[int, int]],
            assistant: list[int]) -> list[int]:
    """The assistant message each block belongs to: the one whose text it contains, else the message text
    right before it (a closing block) or right after it (an opening block) when that is an assistant's."""
    avoid = sentinel_avoid(view, msgs)
    loc = next((x for level in ("all", "assistant", "search") if (x := locate(view, msgs, real, level, avoid))), None)
    if loc is None:
        raise TemplateMismatch("The chat template marks more {% generation %} blocks than assistant turns, and "
                               "the message texts cannot be located to tell which turn each belongs to.")
    texts = sorted((r[0], r[1], loc.sent.pieces[o.piece].message) for o, r in zip(loc.occ, loc.alignment.ranges))
    owners = []
    for s, e in blocks:
        inside = [m for a, b, m in texts if a < e and b > s and msgs[m]["role"] == "assistant"]
        left = next((m for a, b, m in reversed(texts) if b <= s), None)
        right = next((m for a, b, m in texts if a >= e), None)
        if inside:
            owners.append(inside[0])
        elif left is not None and msgs[left]["role"] == "assistant":
            owners.append(left)
        elif right is not None and msgs[right]["role"] == "assistant":
            owners.append(right)
        else:
            between = [i for i in assistant if (left is None or i > left) and (right is None or i < right)]
            if len(between) != 1:
                raise TemplateMismatch(f"A {{% generation %}} block at characters {s}-{e} lies between messages "
                                       f"{left} and {right}, not in an assistant turn.")
            owners.append(between[0])
    return owners
