"""Failure classes 11-14 of masks, on released templates (or a minimal one in the style described), with the
exact trained text; each fixture trained text it must not (or left out a closing) before the rules they test:

11. a header the template writes after the last message whatever add_generation_prompt says (Command R7B and
    Command A: `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`; CodeLlama-70B: `Source: assistant\\nDestination:
    user`, which differs from its history header; a Llama-3-style template closing turns with <|im_end|>) is
    prompt: never trained, never a turn's closing;
12. the assistant header written inside the last user message (DeepSeek-V3 as a model registry ships it) is
    prompt;
13. a generation prompt that differs from the history header only in whitespace (DeepSeek-V3.2 as a model
    registry ships it): what it pre-fills (`</think>`) is not trained;
14. a closing the tokenizer holds no token for (Hy3's tokens built with `.format`, Nemotron-Nano-v2's
    `<SPECIAL_12>` in a tokenizer without it, a user's `### End`) closes history turns as the final one.
"""

from __future__ import annotations

import pytest
from conftest import TEMPLATES
from mask_checks import template_tokens
from test_mask_classes import TWO_TURNS, masks

from shardtune.tiny import byte_tokenizer

CALL = [TWO_TURNS[0],
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call12345", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Quitoville"}}}]},
        {"role": "tool", "content": "Ibex result", "tool_call_id": "call12345", "name": "get_weather"},
        TWO_TURNS[1]]


def tokenizer(name: str, eos: str, bos: str | None = None, not_tokens: str | None = None):
    """The template's token-like literals as added tokens (but those containing `not_tokens`)."""
    template = (TEMPLATES / f"{name}.jinja").read_text()
    specials = [t for t in template_tokens(template) if not (not_tokens and not_tokens in t)]
    return byte_tokenizer(template, specials + ["<pad>"], eos_token=eos, pad_token="<pad>", bos_token=bos)


@pytest.mark.parametrize(("name", "expected"), [
    # the model writes <|START_RESPONSE|> after the always-written header
    ("class11_command_r7b", ["<|START_RESPONSE|>A1.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
                             "<|START_RESPONSE|>A2.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]),
    # the generation prompt adds <|START_RESPONSE|> to it: pre-filled, not trained
    ("class11_command_a", ["A1.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "A2.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]),
])
def test_class11_header_always_written_after_the_last_message(name, expected):
    tok = tokenizer(name, "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>")
    assert masks(tok, TWO_TURNS) == expected
    render = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>" in render[render.rindex("A2."):]  # written, not trained


def test_class11_always_written_prompt_that_differs_from_the_history_header():
    tok = tokenizer("class11_codellama70b", "</s>", "<s>")
    # the history header `Source: assistant\n\n ` and its whitespace are prompt; ` <step> ` closes a turn
    assert masks(tok, TWO_TURNS) == ["A1. <step>", "A2. <step>"]
    assert tok.apply_chat_template(TWO_TURNS,
                                   tokenize=False).endswith("<step> Source: assistant\nDestination: user\n\n ")


@pytest.mark.parametrize("msgs", [TWO_TURNS, CALL], ids=["two_turns", "tool_call"])
def test_class11_im_end_closing_never_runs_into_the_next_header(msgs):
    tok = tokenizer("class11_llama3_im_end", "<|im_end|>", "<|begin_of_text|>")
    last = "A2.<|im_end|>" if msgs is TWO_TURNS else "A1.<|im_end|>"
    first = "A1.<|im_end|>" if msgs is TWO_TURNS else \
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Quitoville"}}</tool_call><|im_end|>'
    assert masks(tok, msgs) == [first, last]


def test_class12_assistant_header_inside_the_last_user_message():
    tok = tokenizer("class12_assistant_in_user", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>")
    prefix = tok.apply_chat_template(TWO_TURNS[:1], tokenize=False)
    assert prefix.rstrip().endswith("<｜Assistant｜>")  # written by the user message itself, not by the prompt
    assert prefix == tok.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    # the template's whitespace around its texts stays; the header never is trained; the final turn has no
    # end of turn in the template, so the EOS is appended
    assert masks(tok, TWO_TURNS) == ["A1.  <｜end▁of▁sentence｜>", "A2.     <｜end▁of▁sentence｜>"]


def test_class13_prompt_differs_from_the_history_header_only_in_whitespace():
    tok = tokenizer("class13_prompt_whitespace", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>")
    prompt = tok.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    render = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    header = "<｜Assistant｜>" + " " * 6 + "</think>"  # the history writes 8 spaces
    assert header in prompt and header not in render and "</think>" in render
    # the history's whitespace after `</think>` is template text (the prompt ends before it): never trained
    assert masks(tok, TWO_TURNS) == ["A1.<｜end▁of▁sentence｜>", "A2.<｜end▁of▁sentence｜>"]


@pytest.mark.parametrize(("name", "closer", "msgs", "expected"), [
    # Hy3 writes <｜hy_eos:opensource｜> after history turns only, built by '<｜hy_eos{}｜>'.format(...)
    ("class14_text_closer", "<｜hy_eos:opensource｜>", TWO_TURNS, ["A1.<｜hy_eos:opensource｜>", "A2.</s>"]),
    ("class14_special_12_as_text", "<SPECIAL_12>", CALL,
     ['<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Quitoville"}}]</TOOLCALL>\n<SPECIAL_12>',
      "A1.\n<SPECIAL_12>\n</s>"]),
    ("class14_end_text", "### End", TWO_TURNS, ["A1.\n### End", "A2.</s>"]),
])
def test_class14_closing_text_that_is_not_a_token(name, closer, msgs, expected):
    tok = tokenizer(name, "</s>", not_tokens=closer.strip("<>"))
    assert closer not in {t.content for t in tok.added_tokens_decoder.values()}
    assert masks(tok, msgs) == expected
