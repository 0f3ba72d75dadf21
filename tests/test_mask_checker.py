"""The independent checker of tests/mask_checks.py sees the classes of wrong masks it once passed: a right mask
is changed where the old code went wrong (a header trained after an end-of-turn token, the generation prompt
trained, a history turn's closing left out) and the checker must name it."""

from __future__ import annotations

import re

import pytest
from mask_checks import END_RE, FAMILIES, check_mask, tokenizer_for_template
from test_mask_classes import TWO_TURNS
from test_mask_template_text import tokenizer

from shardtune.data.chat import IGNORE_INDEX, tokenize_conversation


def relabel(tok, msgs, ids, labels, text: str, nth: int, train: bool) -> list[int]:
    """The labels with the tokens of the nth occurrence of `text` in the render trained or not."""
    render = tok.apply_chat_template(msgs, tokenize=False)
    start = [m.start() for m in re.finditer(re.escape(text), render)][nth]
    enc = tok(render, add_special_tokens=False, return_offsets_mapping=True)
    out = list(labels)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if a < start + len(text) and b > start:
            out[k] = ids[k] if train else IGNORE_INDEX
    return out


@pytest.mark.parametrize(("name", "eos", "bos", "text", "nth", "train", "problem"), [
    # (a) the next header's opening token trained after the end of turn (Command R7B)
    ("class11_command_r7b", "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", -1,
     True, "trained after the end-of-turn token"),
    # (b) the assistant header written inside the last user message trained (DeepSeek-V3 variant)
    ("class12_assistant_in_user", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜Assistant｜>", 1, True,
     "generation prompt text '<｜Assistant｜>' trained"),
    # (b) what the prompt pre-fills, whatever the whitespace around it (DeepSeek-V3.2 variant)
    ("class13_prompt_whitespace", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "</think>", 0, True,
     "generation prompt text '</think>' trained"),
    # (c) a history turn's closing that is not a token left out (Hy3)
    ("class14_text_closer", "</s>", None, "<｜hy_eos:opensource｜>", 0, False, "history closing"),
    # the same for a user's text closer
    ("class14_end_text", "</s>", None, "### End", 1, False, "history closing '### End'"),
])
def test_checker_names_the_wrong_part(name, eos, bos, text, nth, train, problem):
    tok = tokenizer(name, eos, bos)
    ids, labels = tokenize_conversation(TWO_TURNS, tok)
    assert not check_mask(tok, tok.chat_template, TWO_TURNS, None, ids, labels)
    wrong = relabel(tok, TWO_TURNS, ids, labels, text, nth, train)
    assert wrong != labels
    assert any(problem in p for p in check_mask(tok, tok.chat_template, TWO_TURNS, None, ids, wrong))


def test_families_and_end_tokens_of_jamba_and_hunyuan():
    assert END_RE.search("<|eom|>") and END_RE.search("<｜hy_place▁holder▁no▁2｜>")
    assert not END_RE.search("<｜hy_place▁holder▁no▁3｜>") and not END_RE.search("<|bom|>")
    hunyuan = ("<｜hy_begin▁of▁sentence｜>{% for m in messages %}{{ m['content'] }}"
               "<｜hy_place▁holder▁no▁2｜>{% endfor %}")
    tok = tokenizer_for_template(hunyuan)
    assert (tok.bos_token, tok.eos_token) == ("<｜hy_begin▁of▁sentence｜>", "<｜hy_place▁holder▁no▁2｜>")
    assert ("<|eom|>", "<|startoftext|>", "<|endoftext|>") in FAMILIES


def test_a_header_the_assistant_writes_inside_its_own_turn_is_not_the_prompt():
    """functionary v2 writes an assistant turn as segments, each opened by `<|from|>assistant` (an empty text,
    then the tool call): the model writes the later ones itself, so training them is right; the first copy,
    the header its generation prompt writes, must not be trained."""
    from mask_checks import SHAPES

    msgs, tools = SHAPES["tool_call_json_args"]
    tok = tokenizer("class19_segments_in_turn", "<|stop|>")
    ids, labels = tokenize_conversation(msgs, tok, tools=tools)
    assert not check_mask(tok, tok.chat_template, msgs, tools, ids, labels)
    render = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    header = "<|from|>assistant\n<|recipient|>"
    first_answer = render.index(header, render.index("Quokka weather in Quito?"))
    nth = [m.start() for m in re.finditer(re.escape(header), render)].index(first_answer)
    wrong = relabel(tok, msgs, ids, labels, header, nth, True)
    assert wrong != labels
    assert any("assistant header" in p or "generation prompt text" in p
               for p in check_mask(tok, tok.chat_template, msgs, tools, ids, wrong))
