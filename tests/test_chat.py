"""Assistant-only masks from chat templates: exact trained text, whole-render parity, hard cases."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TEMPLATE_TOKENS, template_tokenizer

from shardtune.data.chat import (
    IGNORE_INDEX,
    MaskOptions,
    TemplateMismatch,
    conversation_samples,
    tokenize_conversation,
)
from shardtune.errors import DataError

MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, since 2+2=4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6\nDone."},
]
# What each family renders around an assistant turn's content: the trained text is prefix+content+end.
TURN_FORMAT = {
    "chatml_generation": "{c}<|im_end|>", "chatml": "{c}<|im_end|>", "qwen25_default_system": "{c}<|im_end|>",
    "llama3": "{c}<|eot_id|>", "gemma_no_system": "{c}<end_of_turn>", "mistral_inst": "{c}</s>",
    "phi3": "{c}<|end|>", "qwen3_thinking": "{c}<|im_end|>",
}


def trained_texts(tok, ids, labels) -> list[str]:
    out, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i, "labels must be aligned with input_ids"
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def whole_render_ids(tok, msgs, tools=None, **kw) -> list[int]:
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, **kw)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(TEMPLATE_TOKENS))
def test_masks_exact_on_every_template(name):
    tok = template_tokenizer(name)
    msgs = MULTI[1:] if name == "gemma_no_system" else MULTI
    ids, labels = tokenize_conversation(msgs, tok)
    assert ids == whole_render_ids(tok, msgs)
    expected = [TURN_FORMAT[name].format(c=m["content"]) for m in msgs if m["role"] == "assistant"]
    if name == "qwen3_thinking":  # Qwen3 gives the turn after the last user message an (empty) think block
        expected[-1] = "<think>\n\n</think>\n\n" + expected[-1]
    assert trained_texts(tok, ids, labels) == expected
    # the end-of-turn token is trained for every assistant turn
    assert sum(1 for i, lab in zip(ids, labels) if lab != IGNORE_INDEX and i == tok.eos_token_id) == 2


def test_generation_markers_agree_with_prefix_diffs():
    marked, plain = template_tokenizer("chatml_generation"), template_tokenizer("chatml")
    assert tokenize_conversation(MULTI, marked) == tokenize_conversation(MULTI, plain)


def test_default_system_prompt_is_rendered_not_trained():
    tok = template_tokenizer("qwen25_default_system")
    msgs = MULTI[1:]
    ids, labels = tokenize_conversation(msgs, tok)
    assert "You are a helpful assistant." in tok.decode(ids)
    assert trained_texts(tok, ids, labels) == ["4, since 2+2=4.<|im_end|>", "6\nDone.<|im_end|>"]


def test_per_message_train_flag():
    tok = template_tokenizer("chatml")
    msgs = [dict(m) for m in MULTI]
    msgs[2]["train"] = False
    ids, labels = tokenize_conversation(msgs, tok)
    assert trained_texts(tok, ids, labels) == ["6\nDone.<|im_end|>"]
    assert ids == whole_render_ids(tok, MULTI)  # the flag never reaches the template


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny."},
]


@pytest.mark.parametrize("name", ["qwen25_default_system", "qwen3_thinking"])
def test_tools_and_tool_calls(name):
    tok = template_tokenizer(name)
    ids, labels = tokenize_conversation(TOOL_CONV, tok, tools=TOOLS)
    assert ids == whole_render_ids(tok, TOOL_CONV, tools=TOOLS)
    texts = trained_texts(tok, ids, labels)
    assert len(texts) == 2
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in texts[0]
    assert texts[1].endswith("It is 18C and sunny.<|im_end|>")
    decoded_untrained = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "18C, sunny" in decoded_untrained and "get_weather" in decoded_untrained  # tool result + schema


def test_qwen3_history_reasoning_is_stripped_as_the_template_does():
    tok = template_tokenizer("qwen3_thinking")
    msgs = [dict(m) for m in MULTI]
    msgs[2]["reasoning_content"] = "two plus two"
    msgs[4]["reasoning_content"] = "three and three"
    ids, labels = tokenize_conversation(msgs, tok)
    assert ids == whole_render_ids(tok, msgs)
    assert trained_texts(tok, ids, labels) == [
        "4, since 2+2=4.<|im_end|>", "<think>\nthree and three\n</think>\n\n6\nDone.<|im_end|>"]


def test_qwen3_enable_thinking_false():
    tok = template_tokenizer("qwen3_thinking")
    ids, labels = tokenize_conversation(MULTI, tok, enable_thinking=False)
    assert ids == whole_render_ids(tok, MULTI, enable_thinking=False)
    texts = trained_texts(tok, ids, labels)
    assert texts[0] == "4, since 2+2=4.<|im_end|>"
    assert texts[1].endswith("6\nDone.<|im_end|>")


def test_template_that_raises_gives_a_data_error():
    tok = template_tokenizer("gemma_no_system")
    with pytest.raises(DataError, match="System role not supported"):
        tokenize_conversation(MULTI, tok)


def test_template_that_counts_messages_is_split_right():
    """A header that depends on the whole conversation (the message count) makes no prefix render a prefix of
    the whole render; the turns are still found from the texts around them."""
    from shardtune.tiny import CHATML_TEMPLATE, byte_tokenizer

    tok = byte_tokenizer("{{ messages | length }} messages\n" + CHATML_TEMPLATE)
    ids, labels = tokenize_conversation(MULTI, tok)
    assert ids == whole_render_ids(tok, MULTI)
    assert trained_texts(tok, ids, labels) == ["4, since 2+2=4.<|im_end|>", "6\nDone.<|im_end|>"]


def test_template_that_cannot_be_split_is_refused_naming_the_turn():
    """Newest message first: no turn can be opened by the generation prompt before it."""
    from shardtune.tiny import byte_tokenizer

    newest_first = ("{% for m in messages | reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateMismatch, match="Turn 2 \\(assistant\\)"):
        tokenize_conversation(MULTI, byte_tokenizer(newest_first))


def test_no_template_is_a_clear_error():
    from shardtune.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversation(MULTI, tok)


def test_unicode_content_round_trips():
    tok = template_tokenizer("chatml")
    msgs = [{"role": "user", "content": "Übersetze: 猫"}, {"role": "assistant", "content": "cat 🐱 — Katze"}]
    ids, labels = tokenize_conversation(msgs, tok)
    assert trained_texts(tok, ids, labels) == ["cat 🐱 — Katze<|im_end|>"]


# ----------------------------------------------------------------------------------------------------------
# Policies: end of turn, which turns, one sample per turn


def _glm_like():
    from shardtune.tiny import byte_tokenizer

    template = (Path(__file__).parent / "fixtures" / "templates" / "class2_header_only.jinja").read_text()
    return byte_tokenizer(template, ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_append_eos_where_the_template_writes_no_end_of_turn():
    tok = _glm_like()
    msgs = MULTI[1:]
    render_ids = whole_render_ids(tok, msgs)
    (sample,), audit = conversation_samples(msgs, tok)
    assert sample.input_ids == render_ids + [tok.eos_token_id]
    assert trained_texts(tok, *sample) == ["4, since 2+2=4.", "6\nDone.<|endoftext|>"]
    assert audit["eos_appended"] == 1 and audit["turns_without_end"] == 2 and audit["trained_turns"] == 2
    assert audit["closed_by_eos"] == 1  # the last turn; the history turn stays as the template renders it
    (never,), audit = conversation_samples(msgs, tok, options=MaskOptions(append_eos="never"))
    assert never.input_ids == render_ids and audit["eos_appended"] == 0
    assert trained_texts(tok, *never) == ["4, since 2+2=4.", "6\nDone."]


def test_append_eos_auto_keeps_the_templates_own_end_and_always_adds_one():
    tok = template_tokenizer("chatml")
    (auto,), audit = conversation_samples(MULTI, tok)
    assert auto.input_ids == whole_render_ids(tok, MULTI) and audit["eos_appended"] == 0
    assert audit["turns_without_end"] == 0
    (always,), audit = conversation_samples(MULTI, tok, options=MaskOptions(append_eos="always"))
    assert always == auto and audit["eos_appended"] == 0  # the turn already ends with the EOS: never a second
    # an end-of-turn token that is not the EOS: `always` appends the EOS after it, `auto` does not
    from shardtune.tiny import byte_tokenizer

    other = byte_tokenizer(tok.chat_template, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (auto,), audit = conversation_samples(MULTI, other)
    assert auto.input_ids == whole_render_ids(other, MULTI) and audit["eos_appended"] == 0
    (always,), audit = conversation_samples(MULTI, other, options=MaskOptions(append_eos="always"))
    assert always.input_ids == whole_render_ids(other, MULTI) + [other.eos_token_id] and audit["eos_appended"] == 1
    assert audit["closed_by_eos"] == 0 and audit["turns_without_end"] == 0  # the turn was closed already
    assert trained_texts(other, *always)[-1] == "6\nDone.<|im_end|>\n<|endoftext|>"


def test_no_eos_is_appended_after_an_untrained_last_turn():
    tok = _glm_like()
    msgs = [dict(m) for m in MULTI[1:]]
    msgs[-1]["train"] = False
    (sample,), audit = conversation_samples(msgs, tok)
    assert sample.input_ids == whole_render_ids(tok, MULTI[1:])  # EOS after an untrained turn would be wrong
    assert trained_texts(tok, *sample) == ["4, since 2+2=4."] and audit["eos_appended"] == 0


def test_train_on_last_turn_and_per_message_override():
    tok = template_tokenizer("chatml")
    (last,), _ = conversation_samples(MULTI, tok, options=MaskOptions(train_on_turns="last"))
    assert trained_texts(tok, *last) == ["6\nDone.<|im_end|>"]
    msgs = [dict(m) for m in MULTI]
    msgs[2]["train"] = True
    (both,), _ = conversation_samples(msgs, tok, options=MaskOptions(train_on_turns="last"))
    assert trained_texts(tok, *both) == ["4, since 2+2=4.<|im_end|>", "6\nDone.<|im_end|>"]


def test_per_turn_samples_train_each_turns_reasoning_as_a_final_turn():
    tok = template_tokenizer("qwen3_thinking")
    msgs = [dict(m) for m in MULTI]
    msgs[2]["reasoning_content"] = "two plus two"
    msgs[4]["reasoning_content"] = "three and three"
    samples, audit = conversation_samples(msgs, tok, options=MaskOptions(thinking_history="per_turn"))
    assert [s.input_ids for s in samples] == [whole_render_ids(tok, msgs[:3]), whole_render_ids(tok, msgs)]
    assert [trained_texts(tok, *s) for s in samples] == [
        ["<think>\ntwo plus two\n</think>\n\n4, since 2+2=4.<|im_end|>"],  # its reasoning, as a final turn
        ["<think>\nthree and three\n</think>\n\n6\nDone.<|im_end|>"]]  # the first turn is context only
    assert audit["samples"] == 2 and audit["per_turn_expansions"] == 1 and audit["rows"] == 1


def test_per_turn_without_a_turn_to_train_gives_no_sample():
    tok = template_tokenizer("chatml")
    msgs = [dict(m) for m in MULTI]
    msgs[2]["train"] = msgs[4]["train"] = False
    samples, audit = conversation_samples(msgs, tok, options=MaskOptions(thinking_history="per_turn"))
    assert samples == [] and audit["samples"] == 0


def test_markers_and_fallbacks_are_counted():
    _, audit = conversation_samples(MULTI, template_tokenizer("chatml_generation"))
    assert audit["method_markers"] == 1
    _, audit = conversation_samples(MULTI, template_tokenizer("chatml"))
    assert audit["method_sentinels"] == 1
