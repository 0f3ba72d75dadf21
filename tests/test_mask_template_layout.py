"""Failure classes 15-17 of masks, on released templates (tests/fixtures/templates, sources in
bench/template_sources.md), with the exact trained text; each trained template text (or refused) before the
rules they test:

15. a template that writes every message alike, whatever its role (BGE-VL's `[INST] <instruct> SYSTEM <query>
    TEXT [/INST]`): the header the first user message's text is preceded by, and another message's text the
    turn restates before its own, are prompt;
16. a block the template opens before the turn and closes only after the conversation's last message
    (Hy-Embodied's `</tool_responses>`): a final turn ends with its end-of-turn token, never with that;
17. tool-call arguments the template rewrites (a pythonic Llama 3.2 template slices a JSON string into
    `name(city: value)`): the turn is found from the other texts, the rewritten call trained as rendered.
18. a template that writes the user header twice (llama-cpp-python's LLaVA-style format: a string is
    iterable, so both branches print `USER: `): the repeated header is not a closing of the user message that
    history turns close with.
Also class 13's whitespace: what the template writes between the prompt and the turn's text is not trained.
"""

from __future__ import annotations

import pytest
from conftest import TEMPLATES
from mask_checks import SHAPES, check_mask, tokenizer_for_template
from test_mask_classes import trained

from shardtune.data import tokenize_conversation


def masks(name: str, shape: str) -> list[str]:
    template = (TEMPLATES / f"{name}.jinja").read_text()
    tok = tokenizer_for_template(template)
    msgs, tools = SHAPES[shape]
    ids, labels = tokenize_conversation(msgs, tok, tools, chat_template=template)
    assert not check_mask(tok, template, msgs, tools, ids, labels)
    return trained(tok, ids, labels)


@pytest.mark.parametrize("shape", ["two_turns", "system_one_turn"])
def test_class15_every_role_written_alike(shape):
    texts = ["Wombat answer one."] if shape == "system_one_turn" else ["Wombat answer one.", "Wombat answer two."]
    # `[INST] ` (and the restated system text with `<instruct>` and `<query>`) is the header; ` \n [/INST]`
    # closes every message
    assert masks("class15_roles_alike", shape) == [f"{t} \n [/INST]" for t in texts]


def test_class16_block_closed_after_the_last_message_is_not_the_final_turns():
    template = (TEMPLATES / "class16_block_closed_after_last.jinja").read_text()
    msgs, tools = SHAPES["tool_call"]
    render = tokenizer_for_template(template).apply_chat_template(msgs, tools=tools, chat_template=template,
                                                                  tokenize=False)
    assert render.endswith("</answer></s></tool_responses>")
    assert masks("class16_block_closed_after_last", "tool_call") == [
        '<tool_calls><tool_call>get_weather\n```json\n{"city": "Quitoville"}\n```</tool_call></tool_calls></s>',
        "<answer>\nWombat it is sunny.\n</answer></s>"]


@pytest.mark.parametrize(("shape", "call"), [("tool_call_json_args", "[get_weather(city: Quitoville)]"),
                                             ("tool_call", "[get_weather(city=Quitoville)]")])
def test_class17_tool_call_arguments_rewritten_by_the_template(shape, call):
    assert masks("class17_rewritten_arguments", shape) == [f"{call}<|eot_id|>", "Wombat it is sunny.<|eot_id|>"]


def test_class13_template_whitespace_before_the_text_is_not_trained():
    # the history writes `</think>` and 4 spaces of the template's indentation before the text
    assert masks("class13_prompt_whitespace", "two_turns") == ["Wombat answer one.<｜end▁of▁sentence｜>",
                                                              "Wombat answer two.<｜end▁of▁sentence｜>"]


def test_class18_user_header_written_twice_is_no_closing():
    template = (TEMPLATES / "class18_header_written_twice.jinja").read_text()
    msgs, _ = SHAPES["two_turns"]
    assert "Quokka question one?USER: ASSISTANT: " in tokenizer_for_template(template).apply_chat_template(
        msgs, chat_template=template, tokenize=False)
    # no end-of-turn token: the history turn ends at its text, the final one with the appended EOS
    assert masks("class18_header_written_twice", "two_turns") == ["Wombat answer one.", "Wombat answer two.</s>"]
