"""Property tests: masks stay exact whatever the message texts are (unicode, whitespace, text that looks like
special tokens or like shardtune's own sentinels, the same text in several messages), on templates whose
trained text has a closed form."""

from __future__ import annotations

from conftest import TEMPLATES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mask_classes import trained

from shardtune.data.chat import tokenize_conversation
from shardtune.tiny import byte_tokenizer

FRAGMENTS = ["<|im_end|>", "<|im_start|>assistant\n", "<|eot_id|>", "<|end|>", "<think>", "</think>",
             "sNtL0LtNs", "\n", " ", "\t", "Hello", "é", "猫", "🐱", "{", '"', "\\", "<b>", "[INST]"]
text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=6).map("".join)
PLAIN = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>[]|"), max_size=20)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def conversation(texts: list[str]) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


def tok_for(name: str, specials: list[str], eos: str, bos: str | None = None):
    return byte_tokenizer((TEMPLATES / f"{name}.jinja").read_text(), specials + ["<pad>"], eos_token=eos,
                          pad_token="<pad>", bos_token=bos)


CHATML = tok_for("chatml", ["<|im_start|>", "<|im_end|>"], "<|im_end|>")
LLAMA3 = tok_for("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "<|eot_id|>", "<|begin_of_text|>")
PHI = tok_for("class1_final_eos", ["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], "<|endoftext|>")
GLM = tok_for("class2_header_only", ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
              "<|endoftext|>")


def check(tok, texts: list[str], expected: list[str]) -> None:
    msgs = conversation(texts)
    ids, labels = tokenize_conversation(msgs, tok)
    render = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) in (render, render + tok.eos_token)
    assert trained(tok, ids, labels) == [e for e in expected if e]


@SETTINGS
@given(st.lists(text, min_size=4, max_size=4))
def test_chatml(texts):
    check(CHATML, texts, [t + "<|im_end|>" for t in texts[1::2]])


@SETTINGS
@given(st.lists(text, min_size=4, max_size=4))
def test_llama3_trims_contents(texts):
    check(LLAMA3, texts, [t.strip() + "<|eot_id|>" for t in texts[1::2]])


@SETTINGS
@given(st.lists(text, min_size=4, max_size=4))
def test_final_turn_closed_with_eos(texts):
    check(PHI, texts, [texts[1] + "<|end|>", texts[3] + "<|end|>\n<|endoftext|>"])


@SETTINGS
@given(st.lists(PLAIN, min_size=4, max_size=4))
def test_no_end_of_turn_token(texts):
    # a history turn ends where the next header begins (whitespace before it untrained); the EOS the
    # template never writes is appended after the last one; the template's newline before a text is not
    # trained (a text of whitespace alone is not told apart from it)
    def own(t: str) -> str:
        return t if t.strip() else "\n" + t

    check(GLM, texts, [own(texts[1]).rstrip(), own(texts[3]) + "<|endoftext|>"])


@SETTINGS
@given(text)
def test_same_text_in_every_message(t):
    check(CHATML, [t, t, t, t], [t + "<|im_end|>", t + "<|im_end|>"])
