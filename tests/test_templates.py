"""Masks on real chat templates: every template TRL ships (read from the installed package at test time) times
conversation shapes (system or not, 1-3 turns, tool calls and results, reasoning in history and in the last
turn, empty content, `train: false`, text parts), judged by `mask_checks` from the render alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from mask_checks import SHAPES, applicable, check_mask, tokenizer_for_template

from shardtune.data.chat import conversation_samples

trl = pytest.importorskip("trl", reason="trl (in the dev extra) ships the real templates")
TRL_TEMPLATES = sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))


def test_the_corpus_is_there():
    assert len(TRL_TEMPLATES) >= 60, "trl's chat_templates folder moved or shrank"


@pytest.mark.parametrize("path", TRL_TEMPLATES, ids=lambda p: p.stem)
def test_masks_right_on_every_shape(path: Path):
    template = path.read_text()
    tok = tokenizer_for_template(template)
    judged, not_applicable, wrong = 0, {}, {}
    for shape, (msgs, tools) in SHAPES.items():
        why = applicable(tok, template, msgs, tools)
        if why:
            not_applicable[shape] = why
            continue
        (sample,), _ = conversation_samples(msgs, tok, tools, chat_template=template)  # raises if refused
        problems = check_mask(tok, template, msgs, tools, sample.input_ids, sample.labels)
        if problems:
            wrong[shape] = problems
        judged += 1
    assert not wrong, wrong
    assert judged >= 1, f"no shape applies to {path.stem}: {not_applicable}"
