"""One minimal template per failure class of masks found on real templates, with the exact trained text.

1. user text trained when the final turn ends differently from history turns (Phi-3's EOS, gpt-oss's
   <|return|> vs <|end|>);
2. end of turn not trained when it is written only before a following turn, or never;
3. boundaries off by characters when the generation prompt differs from a history turn's header;
4. several {% generation %} blocks in one turn;
5. refused though consistent: history rewritten (reasoning), system moved into the last user turn, tool use;
6. the closing token a tool-call turn writes after the usual end of turn (`<|im_end|><|stop|>`) left out;
7. a history header trained when it names the role otherwise than the generation prompt (`<s>assistant` vs
   `<s>bot`);
8. refused though consistent: the final form of a turn drops its tool calls (Llama-Nemotron), so it can only
   close as in history;
9. a tool result trained that the template writes inside the assistant turn (Gemma 4, when the call comes with
   text): refused without markers, left out between the generation blocks with them;
10. a tool-call turn cut inside its arguments when the template cannot render it as the final message and
    closes it with a token plain turns never write (gpt-oss's `<|call|>`).
"""

from __future__ import annotations

import pytest
from conftest import TEMPLATES
from mask_checks import check_mask

from shardtune.data.chat import IGNORE_INDEX, MaskOptions, conversation_samples, tokenize_conversation
from shardtune.tiny import byte_tokenizer

TWO_TURNS = [
    {"role": "user", "content": "U1?"},
    {"role": "assistant", "content": "A1."},
    {"role": "user", "content": "U2?"},
    {"role": "assistant", "content": "A2."},
]


def tokenizer(name: str, specials: list[str], eos: str = "</s>", bos: str | None = None):
    return byte_tokenizer((TEMPLATES / f"{name}.jinja").read_text(), specials + ["<pad>"], eos_token=eos,
                          pad_token="<pad>", bos_token=bos)


def trained(tok, ids, labels) -> list[str]:
    """The trained runs, decoded."""
    out, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            run.append(i)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out + ([tok.decode(run)] if run else [])


def masks(tok, msgs, tools=None, **kw) -> list[str]:
    ids, labels = tokenize_conversation(msgs, tok, tools, **kw)
    assert not check_mask(tok, tok.chat_template, msgs, tools, ids, labels)
    return trained(tok, ids, labels)


PHI = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"]


def test_class1_eos_after_the_final_turn_only():
    tok = tokenizer("class1_final_eos", PHI, eos="<|endoftext|>")
    assert masks(tok, TWO_TURNS) == ["A1.<|end|>", "A2.<|end|>\n<|endoftext|>"]


def test_class1_return_after_the_final_turn_end_after_history_turns():
    tok = tokenizer("class1_return_vs_end", ["<|start|>", "<|message|>", "<|end|>", "<|return|>"], eos="<|return|>")
    # the model generates from <|message|> on: the prompt ends with the role
    assert masks(tok, TWO_TURNS) == ["<|message|>A1.<|end|>", "<|message|>A2.<|return|>"]


def test_class2_end_token_written_only_before_a_following_turn():
    tok = tokenizer("class2_end_between_turns", PHI[:3])
    assert masks(tok, TWO_TURNS) == ["A1.</s>", "A2.</s>"]  # the last </s> is appended
    ids, labels = tokenize_conversation(TWO_TURNS, tok, append_eos="never")
    assert trained(tok, ids, labels) == ["A1.</s>", "A2."]
    assert ids == tok(tok.apply_chat_template(TWO_TURNS, tokenize=False), add_special_tokens=False)["input_ids"]


def test_class2_turn_ends_where_the_next_header_begins():
    tok = tokenizer("class2_header_only", ["[gMASK]", "<sop>", *PHI[:3]], eos="<|endoftext|>")
    # the history turn stops before <|user|>; the last one gets the EOS the template never writes
    assert masks(tok, TWO_TURNS) == ["A1.", "A2.<|endoftext|>"]


def test_class2_template_without_any_end_marker():
    tok = tokenizer("class2_no_end", [])
    assert masks(tok, TWO_TURNS) == ["A1.", "A2.\n\n</s>"]


def test_class3_prompt_prefills_text_the_history_turn_does_not_have():
    tok = tokenizer("class3_prompt_differs", PHI[:4], eos="<|end|>")
    msgs = [TWO_TURNS[0], {"role": "assistant", "content": "Here are my answers: yes."}, *TWO_TURNS[2:]]
    # the generation prompt "Here are my reasoning steps:" shares "Here are my " with the content: kept
    assert masks(tok, msgs) == ["Here are my answers: yes.\n<|end|>", "A2.\n<|end|>"]


def test_class3_indented_plain_text_headers():
    tok = tokenizer("class3_indented_prompt", [])
    assert masks(tok, TWO_TURNS) == ["A1.</s>", "A2.</s>"]


@pytest.mark.parametrize("think_is_a_token", [True, False])
def test_class3_prompt_think_block_vs_history_end_of_think(think_is_a_token):
    tok = tokenizer("class3_think_prompt", PHI[:3] + (["<think>", "</think>"] if think_is_a_token else []),
                    eos="<|endoftext|>")
    assert masks(tok, TWO_TURNS) == ["</think>A1.", "</think>A2.<|endoftext|>"]


def test_class4_generation_blocks_merged_per_turn():
    tok = tokenizer("class4_split_generation", PHI[:4], eos="<|end|>")
    assert masks(tok, TWO_TURNS) == ["A1.<|end|>", "A2.<|end|>"]


def test_class5_reasoning_kept_only_after_the_last_user_message():
    tok = tokenizer("class5_history_rewrite", PHI[:3] + ["<think>", "</think>"], eos="<|endoftext|>")
    msgs = [TWO_TURNS[0], {"role": "assistant", "content": "<think>R1</think>A1."}, TWO_TURNS[2],
            {"role": "assistant", "content": "<think>R2</think>A2."}]
    assert masks(tok, msgs) == ["<think></think>A1.", "<think>R2</think>A2.<|endoftext|>"]


def test_class5_system_prompt_moved_into_the_last_user_message():
    tok = tokenizer("class5_system_in_last_user", ["[INST]", "[/INST]", "<s>"], bos="<s>")
    msgs = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    ids, labels = tokenize_conversation(msgs, tok)
    assert "[INST]Be brief.\n\nU2?[/INST]" in tok.decode(ids)
    assert masks(tok, msgs) == ["A1.</s>", "A2.</s>"]


def test_class5_tool_use_template():
    tok = tokenizer("class5_tool_use", ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"], eos="<|im_end|>")
    msgs = [{"role": "user", "content": "Weather in Quito?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Quitoville"}}}]},
            {"role": "tool", "content": "Ibex result"},
            {"role": "assistant", "content": "It is sunny."}]
    # the prompt "<|im_start|>assistant\n" already holds the newline before <tool_call>
    assert masks(tok, msgs, tools=None) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Quitoville"}}\n</tool_call><|im_end|>',
        "It is sunny.<|im_end|>"]


TOOL_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Quitoville"}}}]}


def test_class6_tool_call_turn_closes_with_one_more_token():
    tok = tokenizer("class6_tool_call_stop", ["<|im_start|>", "<|im_end|>", "<|stop|>"], eos="<|im_end|>")
    msgs = [TWO_TURNS[0], TOOL_CALL, {"role": "tool", "content": "Ibex result"}, TWO_TURNS[1]]
    # the prompt "<|im_start|>assistant" stops before the newline or the call marker the model writes
    assert masks(tok, msgs) == [' -> call\nget_weather {"city": "Quitoville"}<|im_end|><|stop|>', "A1.<|im_end|>"]
    # as the final turn (one sample per turn) it is closed by the template: no EOS appended
    samples, audit = conversation_samples(msgs, tok, options=MaskOptions(thinking_history="per_turn"))
    assert trained(tok, *samples[0]) == [' -> call\nget_weather {"city": "Quitoville"}<|im_end|><|stop|>']
    assert audit["eos_appended"] == 0 and audit["turns_without_end"] == 0


def test_class7_history_header_names_the_role_otherwise_than_the_prompt():
    tok = tokenizer("class7_renamed_role", ["<s>"], bos="<s>")
    # the prompt "<s>bot" differs from "<s>assistant" (and in the whitespace before it): the header is not
    # trained, from its opening token to the end of its line
    assert masks(tok, TWO_TURNS) == ["A1.</s>", "A2.</s>"]


def test_class8_final_form_drops_the_tool_calls():
    tok = tokenizer("class8_final_drops_calls", ["<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<call>",
                                                  "</call>"], eos="<|end|>")
    msgs = [TWO_TURNS[0], TOOL_CALL, {"role": "tool", "content": "Ibex result"}, TWO_TURNS[1]]
    assert masks(tok, msgs) == ['<call>get_weather {"city": "Quitoville"}</call>\n<|end|>', "A1.\n<|end|>"]


CALL_WITH_TEXT = [TWO_TURNS[0], {**TOOL_CALL, "content": "Checking."}, {"role": "tool", "content": "Ibex result"},
                  TWO_TURNS[1]]
CLASS9_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>", "<call>", "</call>", "<result>", "</result>"]


def test_class9_tool_result_inside_the_turn_is_refused_without_markers():
    from shardtune.data.chat import TemplateMismatch

    tok = tokenizer("class9_result_inside_turn", CLASS9_TOKENS, eos="<|end|>")
    with pytest.raises(TemplateMismatch, match="another message's text lies between"):
        tokenize_conversation(CALL_WITH_TEXT, tok)


def test_class9_tool_result_between_generation_blocks_is_not_trained():
    tok = tokenizer("class9_result_inside_turn_generation", CLASS9_TOKENS, eos="<|end|>")
    assert masks(tok, CALL_WITH_TEXT) == ['<call>get_weather {"city": "Quitoville"}</call>', "Checking.<|end|>",
                                          "A1.<|end|>"]


def test_class10_call_that_cannot_be_final_closes_before_the_next_header():
    tok = tokenizer("class10_call_not_final", ["<|start|>", "<|message|>", "<|end|>", "<|call|>"], eos="<|end|>")
    msgs = [TWO_TURNS[0], TOOL_CALL, {"role": "tool", "content": "Ibex result"}, TWO_TURNS[1]]
    assert masks(tok, msgs) == ['<|message|>get_weather {"city": "Quitoville"}<|call|>', "<|message|>A1.<|end|>"]


def test_a_header_closing_token_is_not_an_end_of_turn():
    # the checker once took `<|header_end|>` for an end-of-turn token left out of every history turn
    tok = tokenizer("header_end_token", ["<|header_start|>", "<|header_end|>", "<|eot|>"], eos="<|eot|>",
                    bos="<|begin_of_text|>")
    assert masks(tok, TWO_TURNS) == ["A1.<|eot|>", "A2.<|eot|>"]


def test_the_header_token_may_open_markup_the_model_writes():
    # the checker once took the `<|open|>` of `<|open|>answer` (generated) for the role header's
    tok = tokenizer("header_token_reused", ["<|open|>", "<|sep|>", "<|close|>", "<|end_of_msg|>"], eos="<|end_of_msg|>")
    assert masks(tok, TWO_TURNS) == ["<|open|>answer<|sep|>A1.<|close|><|end_of_msg|>",
                                     "<|open|>answer<|sep|>A2.<|close|><|end_of_msg|>"]


def test_an_empty_turn_with_train_false_under_generation_markers():
    # the checker once expected the marked block of an empty `train: false` turn to be trained
    tok = tokenizer("chatml_generation", ["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    msgs = [TWO_TURNS[0], {"role": "assistant", "content": "", "train": False}, *TWO_TURNS[2:]]
    assert masks(tok, msgs) == ["A2.<|im_end|>"]


def test_refusal_names_the_turn_and_the_template_behaviour():
    newest_first = ("{% for m in messages | reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = byte_tokenizer(newest_first)
    from shardtune.data.chat import TemplateMismatch

    with pytest.raises(TemplateMismatch, match=r"Turn 1 \(assistant\): .* so its trained span cannot be derived"):
        conversation_samples(TWO_TURNS, tok)
