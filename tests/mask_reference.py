"""The reference half of tests/mask_checks.py: prefix renders and the template's own repetitions, compared
piece by piece (added tokens, token-like literals whether or not the tokenizer holds them, words), so that
neither special tokens nor whitespace decide (checks (a)-(c) of mask_checks' docstring).
"""

from __future__ import annotations

import re

from mask_checks import END_RE, TOKEN_RES, render, text_of, visible

# ----------------------------------------------------------------------------------------------------------
# The reference: prefix renders and the template's own repetitions, compared piece by piece (added tokens and
# runs of other non-whitespace text), so that neither the tokenizer's special tokens nor whitespace decide


def _piece_re(added: list[str]) -> re.Pattern:
    """Added tokens, token-like literals the tokenizer does not hold, and runs of other non-whitespace text."""
    alt = "|".join([re.escape(t) for t in added if t.strip()] + TOKEN_RES)
    return re.compile(f"{alt}|(?:(?!{alt})\\S)+")


def _pieces(rx: re.Pattern, text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in rx.finditer(text, lo, hi)]


def _texts(m: dict) -> list[str]:
    if m["role"] != "assistant":
        return [t for t in (text_of(m["content"]).strip(),) if t]
    return [t for t in (*visible(m)[::-1], "Quitoville" if m.get("tool_calls") else "") if t]


def _locate(text: str, msgs: list[dict]) -> list[tuple[int, int] | None]:
    """(first start, last end) of each message's texts, searched in order; None for a message without text."""
    out, cursor = [], 0
    for m in msgs:
        spans = [(q, q + len(t)) for t in _texts(m) for q in (text.find(t, cursor),) if q >= 0]
        out.append((min(spans)[0], max(e for _, e in spans)) if spans else None)
        cursor = out[-1][1] if spans else cursor
    return out


def _is_end(tok, t: str) -> bool:
    return bool(END_RE.search(t)) or t == tok.eos_token


def check_reference(tok, template, msgs, tools, full, trained, added, kwargs) -> list[str]:
    """(a) after a turn's end-of-turn token only closing tokens are trained (never the next header, nor what
    the template always writes after the conversation); (b) no piece of the generation prompt (the prefix
    render with add_generation_prompt, from the last text on) found before the turn's text, and no piece of
    another message's header (what its gap shares with an earlier message of that role) is trained; (c) the
    closing a history turn is followed by, before the next message's header, is trained."""
    rx, problems = _piece_re(added), []
    loc = _locate(full, msgs)
    piece = lambda a, b: full[a:b]  # noqa: E731
    located = [i for i, x in enumerate(loc) if x]
    # tokens written only after the conversation's end in this render (a final-only closing, Phi-3's
    # <|endoftext|>), not by the generation-prompt render
    last_end = loc[located[-1]][1] if located else 0
    gen = render(tok, template, msgs, tools, True, **kwargs)
    final_only = {full[a:b] for a, b in _pieces(rx, full, last_end, len(full))} - set(rx.findall(gen[last_end:]))
    headers = _role_headers(tok, rx, full, msgs, loc)
    # the closing the final turn is trained with (after its last text), as pieces
    last = located[-1] if located else None
    closing = [full[a:b] for a, b in _pieces(rx, full, loc[last][1], len(full)) if all(trained[a:b])] \
        if last is not None and msgs[last]["role"] == "assistant" and msgs[last].get("train", True) else []
    for i in located:
        m = msgs[i]
        prev = max((j for j in located if j < i), default=None)
        if m["role"] == "assistant" and prev is not None:
            problems += _check_prompt(tok, template, msgs, tools, full, trained, added, kwargs, rx, loc, i, prev)
        if m["role"] != "assistant" or not m.get("train", True):
            continue
        nxt = min((loc[j][0] for j in located if j > i), default=len(full))
        after = _pieces(rx, full, loc[i][1], nxt)
        end = next((k for k, (a, b) in enumerate(after) if piece(a, b) in added and _is_end(tok, piece(a, b))), None)
        if end is not None:
            for a, b in after[end + 1:]:
                t = piece(a, b)
                if any(trained[a:b]) and not (t in added and (_is_end(tok, t) or t in final_only)):
                    problems.append(f"{t!r} trained after the end-of-turn token")
                    break
        # (c) a history turn closes as the final one does wherever the template writes that closing too,
        # whether or not the tokenizer holds it as a token
        if i != last and closing:
            k, hits = 0, []
            for c in closing:
                k = next((h for h in range(k, len(after)) if piece(*after[h]) == c), None)
                if k is None:
                    break
                hits.append(after[k])
                k += 1
            if k is not None and any(not all(trained[a:b]) for a, b in hits):
                problems.append(f"closing {' '.join(closing)!r} of the final turn not trained after a history turn")
        j = next((j for j in located if j > i), None)
        if j is not None and headers.get(j):
            closing = [(a, b) for a, b in after if a < headers[j][0][0]]
            ends = [k for k, (a, b) in enumerate(closing) if _is_end(tok, full[a:b])]
            closing = closing[:ends[-1] + 1] if ends else closing  # what follows the last end opens the header
            # (LongCat's `[Round 1]`)
            if any(not all(trained[a:b]) for a, b in closing):
                problems.append(f"history closing {full[closing[0][0]:closing[-1][1]]!r} not (wholly) trained")
    for j, pieces in headers.items():
        if any(any(trained[a:b]) for a, b in pieces):
            problems.append(f"header {full[pieces[0][0]:pieces[-1][1]]!r} of a {msgs[j]['role']} message trained")
    return problems


def _role_headers(tok, rx, full, msgs, loc) -> dict[int, list[tuple[int, int]]]:
    """Per non-assistant message after the first of its role: its header, the pieces its gap ends with in
    common with the gap before the first message of that role, after the last end-of-turn token among them."""
    out, first, gaps = {}, {}, {}
    cursor = 0
    for j, x in enumerate(loc):
        if x is None:
            continue
        gaps[j] = _pieces(rx, full, cursor, x[0])
        cursor = x[1]
        role = msgs[j]["role"]
        if role == "assistant":
            continue
        if role not in first:
            first[role] = j
            continue
        mine, theirs = gaps[j], gaps[first[role]]
        n = 0
        while n < min(len(mine), len(theirs)) and full.__getitem__(slice(*mine[-1 - n])) == \
                full.__getitem__(slice(*theirs[-1 - n])):
            n += 1
        common = mine[len(mine) - n:]
        ends = [k for k, (a, b) in enumerate(common) if _is_end(tok, full[a:b])]
        common = common[ends[-1] + 1:] if ends else common
        if common:
            out[j] = common
    return out


def _check_prompt(tok, template, msgs, tools, full, trained, added, kwargs, rx, loc, i, prev) -> list[str]:
    """(b) for assistant message i after message prev: no piece the generation prompt shares with the history
    (from prev's text on, whatever the whitespace) and no piece of the prompt's last header is trained."""
    problems = []
    prefix = render(tok, template, msgs[:i], tools, True, **kwargs)
    ploc = _locate(prefix, msgs[:i])[prev]
    if not ploc:
        return problems
    want = [prefix[a:b] for a, b in _pieces(rx, prefix, ploc[1], len(prefix))]
    have = _pieces(rx, full, loc[prev][1], loc[i][0])
    for w, (a, b) in zip(want, have):
        if w != full[a:b]:
            break
        if any(trained[a:b]):
            problems.append(f"generation prompt text {w!r} trained")
    # the prompt's last header (after its last end token), wherever the history writes it: its first copy after
    # message prev (later copies are segments the model writes inside its own turn, functionary v2's
    # `<|from|>assistant` before each tool call)
    ends = [k for k, w in enumerate(want) if w in added and _is_end(tok, w)]
    header = want[ends[-1] + 1:] if ends else want
    texts = [full[a:b] for a, b in have]
    at = min((k for k in range(len(have) - len(header) + 1) if texts[k:k + len(header)] == header),
             default=None) if header else None
    if at is not None and any(any(trained[a:b]) for a, b in have[at:at + len(header)]):
        problems.append(f"assistant header {' '.join(header)!r} trained")
    return problems
