"""Judge a loss mask from the render and the messages alone, independently of how shardtune found it.

The conversations use distinctive words, so each message's text is found in the render by plain search.
A mask is right when: the ids are the whole render (plus an appended EOS); every trained assistant text (its
visible part, reasoning and tool-call argument) is trained; no system, user or tool text is; no role header
is (the generation prompt's token before an assistant turn, the last token before another message's text);
every trained run ends with an end-of-turn token or the EOS, except a history turn of a template that writes
none; and no end-of-turn token right after a trained run is left out. With {% generation %} markers the
mask must be the marked blocks.

A reference built from other renders is compared case by case (mask_reference.check_reference), piece by piece (tokens,
token-like literals whether or not the tokenizer holds them, words), so that neither special tokens nor
whitespace decide: (a) after a turn's end-of-turn token nothing but further closing tokens is trained;
(b) no piece of the generation prompt (the prefix render with add_generation_prompt) found before the turn's
text, of the prompt's last header wherever the history writes it, or of another message's header is trained;
(c) a history turn's closing (what it is followed by before the next header, and what the final turn closes
with, where the history writes it too) is trained, whether or not it is a token. Templates that render the
conversation as a prompt about it (guard, reward and user-simulator models) are not judged.
"""

from __future__ import annotations

import re
from typing import Any

IGNORE = -100
TOKEN_RES = [r"<\|[^<>|\s]{1,48}\|>", r"<｜[^<>｜]{1,48}｜>", r"</?[A-Za-z_][\w:\-]{0,30}>", r"<\|[a-z_]{1,30}>",
             r"<[a-z_]{1,30}\|>", r"\[/?[A-Z][A-Z_]{1,30}\]", r"\[\|[a-z]+\|\]", r"\]~!?b[\[\]]|\[e~\["]
# (text in the template, bos, eos) as the released tokenizers of these families set them
FAMILIES = [
    ("<|return|>", "<|startoftext|>", "<|return|>"), ("[gMASK]", None, "<|endoftext|>"),
    ("<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"), ("<|eot_id|>", "<|begin_of_text|>",
                                                                        "<|eot_id|>"),
    ("<start_of_turn>", "<bos>", "<eos>"), ("<turn|>", "<bos>", "<eos>"), ("<|im_end|>", None, "<|im_end|>"),
    ("<|end|>", "<s>", "<|endoftext|>"), ("<end_of_utterance>", "<|begin_of_text|>", "<end_of_utterance>"),
    ("<SPECIAL_12>", None, "<SPECIAL_12>"), ("<seed:eos>", "<seed:bos>", "<seed:eos>"),
    ("<|message_sep|>", None, "<|message_sep|>"), ("<|header_start|>", "<|begin_of_text|>", "<|eot|>"),
    ("<|eom|>", "<|startoftext|>", "<|endoftext|>"), ("</longcat_s>", "<longcat_s>", "</longcat_s>"),
    ("<｜hy_place▁holder▁no▁2｜>", "<｜hy_begin▁of▁sentence｜>", "<｜hy_place▁holder▁no▁2｜>"),
]
END_RE = re.compile(r"(?i)((?<!header_)end(?!_header|_of_role)|eot|eos|eom\|>|return|calls?\|>|suffix\|>|^</s>$|"
                    r"^<sep>$|^<[a-z_]+\|>$|^<step>$|stop|^<\|tool_response>$|^<start_function_response>$|"
                    r"hy_place▁holder▁no▁2｜|^\[e~\[$)")


def template_tokens(text: str) -> list[str]:
    """Every token-like literal of a template (`<|...|>`, `<tag>`, `[TAG]`, ...): the family's added tokens."""
    return sorted({t for r in TOKEN_RES for t in re.findall(r, text)})


def tokenizer_for_template(template: str):
    """A byte-level tokenizer with the template's token-like literals as special tokens and its family's
    BOS/EOS."""
    from shardtune.tiny import byte_tokenizer

    bos, eos = next(((b, e) for marker, b, e in FAMILIES if marker in template), ("<s>", "</s>"))
    return byte_tokenizer(template, template_tokens(template) + ["<pad>"], eos_token=eos, pad_token="<pad>",
                          bos_token=bos)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city zebrafinch",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                         "required": ["city"]}}}]


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str, **kw: Any) -> dict:
    return {"role": "assistant", "content": text, **kw}


def _call(args: Any) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": args}}]}


_TOOL_RESULT = {"role": "tool", "content": "Ibex sunny result", "tool_call_id": "call12345", "name": "get_weather"}
SHAPES: dict[str, tuple[list[dict], list | None]] = {
    "one_turn": ([_u("Quokka question one?"), _a("Wombat answer one.")], None),
    "system_one_turn": ([{"role": "system", "content": "Narwhal system rules."}, _u("Quokka question one?"),
                         _a("Wombat answer one.")], None),
    "two_turns": ([_u("Quokka question one?"), _a("Wombat answer one."), _u("Quokka question two?"),
                   _a("Wombat answer two.")], None),
    "three_turns": ([_u("Quokka question one?"), _a("Wombat answer one."), _u("Quokka question two?"),
                     _a("Wombat answer two."), _u("Quokka question three?"), _a("Wombat answer three.")], None),
    "think_blocks": ([_u("Quokka question one?"), _a("<think>\nPlatypus musing one.\n</think>\n\nWombat answer one."),
                      _u("Quokka question two?"), _a("<think>\nPlatypus musing two.\n</think>\n\nWombat answer two.")],
                     None),
    "reasoning_field": ([_u("Quokka question one?"), _a("Wombat answer one.", reasoning_content="Platypus musing one."),
                         _u("Quokka question two?"), _a("Wombat answer two.",
                                                        reasoning_content="Platypus musing two.")],
                        None),
    "tool_call": ([_u("Quokka weather in Quito?"), _call({"city": "Quitoville"}), _TOOL_RESULT,
                   _a("Wombat it is sunny.")], TOOLS),
    "tool_call_json_args": ([_u("Quokka weather in Quito?"), _call('{"city": "Quitoville"}'), _TOOL_RESULT,
                             _a("Wombat it is sunny.")], TOOLS),
    "empty_history_turn": ([_u("Quokka question one?"), _a(""), _u("Quokka question two?"), _a("Wombat answer two.")],
                           None),
    "train_false": ([_u("Quokka question one?"), _a("Wombat answer one.", train=False), _u("Quokka question two?"),
                     _a("Wombat answer two.")], None),
    "text_parts": ([{"role": r, "content": [{"type": "text", "text": t}]} for r, t in
                    (("user", "Quokka question one?"), ("assistant", "Wombat answer one."),
                     ("user", "Quokka question two?"), ("assistant", "Wombat answer two."))], None),
}


def text_of(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def visible(message: dict) -> tuple[str, str]:
    """(visible content, reasoning) of an assistant message."""
    content = text_of(message.get("content", ""))
    reasoning = message.get("reasoning_content", "")
    if "</think>" in content:
        reasoning, content = content.split("</think>", 1)
        reasoning = reasoning.replace("<think>", "")
    return content.strip(), reasoning.strip()


def render(tok, template: str, msgs: list[dict], tools, gen: bool = False, **kwargs) -> str:
    msgs = [{k: v for k, v in m.items() if k != "train"} for m in msgs]
    return tok.apply_chat_template(msgs, tools=tools, chat_template=template, tokenize=False,
                                   add_generation_prompt=gen, **kwargs)


def applicable(tok, template: str, msgs: list[dict], tools, **kwargs) -> str | None:
    """Why the template cannot be judged on this conversation (it rejects it, or drops an assistant's text or
    tool call), or None."""
    try:
        full = render(tok, template, msgs, tools, **kwargs)
    except Exception as e:  # the template's own raise_exception or a type error on this shape
        return f"rejects it ({type(e).__name__})"
    if any(m["role"] == "assistant" and visible(m)[0] not in full for m in msgs):
        return "drops an assistant text"
    if any(m["role"] in ("user", "tool") and text_of(m["content"]).strip() not in full for m in msgs):
        return "drops a user text or tool result (the conversation is not rendered as turns)"
    if tools and "Quitoville" not in full:
        return "drops the tool call"
    if re.search(r"""['"]type['"]: ['"]text['"]""", full):
        return "prints the content parts list as it is"
    return _not_a_chat(tok, template, msgs, tools, full, kwargs)


def _not_a_chat(tok, template, msgs, tools, full, kwargs) -> str | None:
    """Why the template renders the conversation as a prompt about it (a guard or reward model that classifies
    it, a user simulator) rather than as turns the model generates, or None: the header its generation prompt
    opens (after the prompt's last end token: its opening piece and the role named after it) is not written
    before an assistant text."""
    from mask_reference import _is_end, _locate, _piece_re, _pieces

    added = sorted({t.content for t in tok.added_tokens_decoder.values()}, key=len, reverse=True)
    rx = _piece_re(added)
    loc = _locate(full, msgs)
    for i, m in enumerate(msgs):
        prev = max((j for j in range(i) if loc[j]), default=None)
        if m["role"] != "assistant" or not loc[i] or prev is None or msgs[prev]["role"] == "assistant":
            continue
        try:
            prefix = render(tok, template, msgs[:i], tools, True, **kwargs)
        except Exception:  # the template renders no conversation ending there: judged as it renders
            continue
        ploc = _locate(prefix, msgs[:i])[prev]
        if not ploc:
            return "renders no generation prompt after the conversation before an assistant's turn"
        want = [prefix[a:b] for a, b in _pieces(rx, prefix, ploc[1], len(prefix))]
        ends = [k for k, w in enumerate(want) if w in added and _is_end(tok, w)]
        header = (want[ends[-1] + 1:] if ends else want)[:2]
        if len(header) == 2 and (header[1] in added or any(re.fullmatch(r, header[1]) for r in TOKEN_RES)):
            header = header[:1]  # the role is the opening token's own (`<｜Assistant｜>`), not a name after it
        have = [full[a:b] for a, b in _pieces(rx, full, loc[prev][1], loc[i][0])]
        if header and not any(have[k:k + len(header)] == header for k in range(len(have))):
            return f"writes no {' '.join(header)!r} header before the assistant's text"
    return None


def check_mask(tok, template: str, msgs: list[dict], tools, ids: list[int], labels: list[int], **kwargs) -> list[str]:
    import mask_reference

    full = render(tok, template, msgs, tools, **kwargs)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if list(ids[:n]) != list(enc["input_ids"]) or len(labels) != len(ids):
        return ["the ids are not the whole render"]
    extra = list(ids[n:])
    if extra not in ([], [tok.eos_token_id]) or (extra and labels[-1] != tok.eos_token_id):
        return [f"unexpected ids after the render: {extra}"]
    if any(lab not in (IGNORE, i) for i, lab in zip(ids, labels)):
        return ["a label differs from its input id"]
    trained = [False] * len(full)
    for (s, e), lab in zip(enc["offset_mapping"], labels[:n]):
        for c in range(s, e):
            trained[c] |= lab != IGNORE
    added = sorted({t.content for t in tok.added_tokens_decoder.values()}, key=len, reverse=True)
    if re.search(r"\{%-?\s*generation\s*-?%\}", template):
        return _check_markers(tok, template, msgs, tools, full, trained, added, kwargs)
    problems: list[str] = []

    def is_trained(text: str) -> bool | None:
        p = full.find(text) if text else -1
        return None if p < 0 else all(trained[p:p + len(text)])

    def any_trained(text: str) -> bool:
        return any(any(trained[p:p + len(text)]) for p in _find_all(full, text)) if text else False

    for m in msgs:
        if m["role"] != "assistant":
            if any_trained(text_of(m["content"]).strip()):
                problems.append(f"{m['role']} text trained")
        elif m.get("train", True):
            content, reasoning = visible(m)
            if is_trained(content) is False or is_trained(reasoning) is False:
                problems.append(f"assistant text not trained: {content[:30]!r}")
            if m.get("tool_calls") and not any(trained[p] for p in _find_all(full, "Quitoville")):
                problems.append("tool call not trained")
        elif any_trained(visible(m)[0]):
            problems.append("assistant text with train: false trained")
    if tools and any_trained("Weather of a city zebrafinch"):
        problems.append("tool schema trained")
    closing = _final_only(tok, template, msgs, tools, full, added, kwargs) | _after_every_turn(msgs, full, added)
    problems += _check_headers(tok, template, msgs, tools, full, trained, added, kwargs, closing)
    gen = render(tok, template, msgs, tools, True, **kwargs)
    n = 0
    while n < min(len(full), len(gen)) and full[-1 - n] == gen[-1 - n]:
        n += 1
    # what every render ends with, with or without the prompt, is the template's text after the conversation
    problems += _check_ends(tok, msgs, full, trained, added, bool(extra), closing, len(full) - n if gen != full else 0)
    problems += mask_reference.check_reference(tok, template, msgs, tools, full, trained, added, kwargs)
    return problems


def _find_all(text: str, needle: str) -> list[int]:
    out, p = [], text.find(needle)
    while needle and p >= 0:
        out.append(p)
        p = text.find(needle, p + 1)
    return out


def _check_headers(tok, template, msgs, tools, full, trained, added, kwargs, closing=frozenset()) -> list[str]:
    from mask_reference import _is_end

    problems = []
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    head = prompt = None
    if first:
        with_prompt = render(tok, template, msgs[:first], tools, True, **kwargs)
        without = render(tok, template, msgs[:first], tools, **kwargs)
        k = next((j for j, (x, y) in enumerate(zip(with_prompt, without)) if x != y), len(without))
        found = [(with_prompt.find(t, k), t) for t in added if with_prompt.find(t, k) >= 0]
        head = min(found)[1] if found else None
        prompt = with_prompt[min(found)[0]:] if found else None  # the prompt from its first token on
    cursor = 0
    for m in msgs:
        found = [(q, q + len(t)) for t in (visible(m) if m["role"] == "assistant" else (text_of(m["content"]).strip(),))
                 if t for q in (full.find(t, cursor),) if q >= 0]
        if not found:
            continue
        p = min(found)[0]
        before = full[cursor:p]
        if m["role"] == "assistant":
            # the first copy of the prompt's text after the previous message: later copies are segments the model
            # writes inside its own turn (functionary v2's `<|from|>assistant` before each tool call); without
            # the prompt, the last head token (the same token may open markup the model generates further on,
            # Kimi K3's `<|open|>response`)
            q = before.find(prompt) if prompt and prompt in before else before.rfind(head) if head else -1
            if q >= 0 and any(trained[cursor + q: cursor + q + len(head)]):
                problems.append(f"assistant header {head!r} trained")
        else:
            last = max(((before.rfind(t), t) for t in added if t in before), default=(-1, None))
            span = trained[cursor + last[0]: cursor + last[0] + len(last[1])] if last[1] else []
            if last[1] and not _is_end(tok, last[1]) and last[1] not in closing and any(span):
                problems.append(f"header {last[1]!r} of a {m['role']} message trained")
        cursor = max(e for _, e in found)
    return problems


def _final_only(tok, template, msgs, tools, full, added, kwargs) -> set[str]:
    """Tokens written only after the conversation's end of this render, not by the generation-prompt render
    (Phi-3's and Hunyuan's closing of the final turn): they close it."""
    from mask_reference import _texts

    last = max((full.find(t) + len(t) for m in msgs for t in _texts(m) if full.find(t) >= 0), default=0)
    gen = render(tok, template, msgs, tools, True, **kwargs)
    return {t for t in added if t in full[last:] and t not in gen[last:]}


def _after_every_turn(msgs, full, added) -> set[str]:
    """The token the template writes right after every assistant message's text, the final one's included (a
    role suffix such as `</assistant>`, `</longcat_s>`): it closes the turn."""
    from mask_reference import _locate

    loc = _locate(full, msgs)
    after = {next((t for t in added if full.startswith(t, x[1] + len(full[x[1]:]) - len(full[x[1]:].lstrip()))),
                  None) for m, x in zip(msgs, loc) if m["role"] == "assistant" and x}
    return set(after) - {None} if len(after) == 1 else set()


def _check_ends(tok, msgs, full, trained, added, eos_appended, closing=frozenset(), always_from=None) -> list[str]:
    problems = []
    texts = [t for m in msgs for t in (text_of(m["content"]).strip(),) if t]
    runs, c = [], 0
    while c < len(full):
        if trained[c]:
            s = c
            while c < len(full) and trained[c]:
                c += 1
            runs.append((s, c))
        c += 1
    for s, e in runs:
        text, after = full[s:e], full[e:]
        last = not after.strip()
        nxt = min([q for q in (after.find(t) for t in texts) if q >= 0] or [len(after)])
        gap = after[:nxt]
        is_end = [t for t in added if text.endswith(t) and (END_RE.search(t) or t == tok.eos_token or t in closing)]
        leading = _leading_ends(tok, added, full, e, e + len(gap))
        missed = [t for t, a in leading if not all(trained[a:a + len(t)]) and (always_from is None or a < always_from)]
        if missed and not (last and eos_appended):
            problems.append(f"end-of-turn token {missed[0]!r} after a trained run left out")
        writes_no_end = not last and not leading  # an end token further on closes the next header (VAETKI's
        # `<|role_start|>user<|role_end|>`)
        if not is_end and not writes_no_end and not (last and eos_appended):
            problems.append(f"a trained run ends without an end-of-turn token: ...{text[-25:]!r}")
        if text != text.rstrip() and not (last and eos_appended):
            problems.append("a trained run ends with whitespace")
    return problems


def _leading_ends(tok, added: list[str], full: str, pos: int, limit: int) -> list[tuple[str, int]]:
    """The end-of-turn tokens (and where) right after a trained run, whitespace and other end tokens between
    them; one further on closes something else (a header, the template's text after the conversation)."""
    out = []
    while pos < limit:
        if full[pos].isspace():
            pos += 1
            continue
        t = next((t for t in added if full.startswith(t, pos)), None)
        if t is None or not (END_RE.search(t) or t == tok.eos_token):
            break
        out.append((t, pos))
        pos += len(t)
    return out


def _check_markers(tok, template, msgs, tools, full, trained, added, kwargs) -> list[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    # the region of a turn with train: false: between the texts of the messages around it
    texts = sorted(p for m in msgs if m.get("train", True) for t in (visible(m)[0] if m["role"] == "assistant"
                   else text_of(m["content"]).strip(),) if t for p in (full.find(t), full.find(t) + len(t)) if p >= 0)
    skipped = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant" or m.get("train", True):
            continue
        # an empty turn lies right after the text of the message before it
        previous = msgs[k - 1] if k else None
        before = ("" if previous is None else visible(previous)[0] if previous["role"] == "assistant"
                  else text_of(previous["content"]).strip())
        p = full.find(visible(m)[0]) if visible(m)[0] else full.find(before) + len(before) if before in full else -1
        if p >= 0:
            skipped.append((max([q for q in texts if q <= p], default=0), min([q for q in texts if q > p],
                                                                              default=len(full))))
    msgs = [{k: v for k, v in m.items() if k != "train"} for m in msgs]
    _, blocks = render_jinja_template([msgs], tools=tools, chat_template=template, return_assistant_tokens_mask=True,
                                      **{**tok.special_tokens_map, **kwargs})
    want = [False] * len(full)
    for s, e in blocks[0]:
        seg = full[s:e]
        if any(lo <= s and e <= hi for lo, hi in skipped):
            continue  # a block of a turn with train: false
        if any(seg.rstrip().endswith(t) for t in added):
            e = s + len(seg.rstrip())  # whitespace after the block's last token is never generated
        for c in range(s, e):
            want[c] = True
    bad = next((c for c in range(len(full)) if want[c] != trained[c] and full[c].strip()), None)
    return [] if bad is None else [f"mask differs from the generation markers at {full[max(0, bad - 20):bad + 20]!r}"]
