"""Pictures under the chat templates the vision-language families are released with (not reduced stand-ins).

Each tests/fixtures/templates/vl_*.jinja is a released `chat_template` verbatim after a one-line `{#- -#}` header
naming where it came from (the header renders nothing); the copies are those huggingface/trl keeps in
trl/chat_templates/ (trl 1.16.0), which its CI checks against the Hub repositories named in each header:
Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct (one template), Qwen3-VL-2B-Instruct, Qwen3.5-0.8B (thinking off by
default) and Qwen3.5-4B (on), gemma-3-4b-it, gemma-4-E2B-it (kept for the Gemma 4 tests).

For each template on its family's tiny model: a sample is the family's processor's own tokens for the chat as
the template renders it with image parts (verl's `<image>` placeholders split into parts, as verl does); no
picture token is trained, every assistant turn's end is, no role header is; the mask checker passes; render
shows each picture as one placeholder with its token count.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_parquet
from mask_checks import check_mask
from test_images import png, verl_rows

from shardtune.batch import IGNORE_INDEX
from shardtune.config import DataConfig, ModelConfig
from shardtune.data.chat import resolve_chat_template
from shardtune.data.media import IMAGE_PLACEHOLDER, decode
from shardtune.data.readers import Row
from shardtune.data.tokenize import row_samples
from shardtune.data.vision import image_processing
from shardtune.model import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
# case -> (tiny family, template fixture)
CASES = {"qwen2_vl": ("qwen2_vl", "vl_qwen2_vl"), "qwen2_5_vl": ("qwen2_5_vl", "vl_qwen2_vl"),
         "qwen3_vl": ("qwen3_vl", "vl_qwen3_vl"), "qwen3_5_nothink": ("qwen3_5", "vl_qwen3_5_nothink"),
         "qwen3_5_think": ("qwen3_5", "vl_qwen3_5_think"), "gemma3": ("gemma3", "vl_gemma3")}
QWEN = {"picture": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"), "header": "<|im_start|>",
        "end": "<|im_end|>"}
GEMMA3 = {"picture": ("<start_of_image>", "<image_soft_token>", "<end_of_image>"), "header": "<start_of_turn>",
          "end": "<end_of_turn>"}
# Qwen3's tokenizers hold these as added tokens (the byte tokenizer of the tiny models does not)
QWEN3_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from shardtune.tiny import save_tiny_vlm

    out = {}
    for family in dict.fromkeys(f for f, _ in CASES.values()):
        folder = save_tiny_vlm(tmp_path_factory.mktemp(family) / "model", family=family)
        if family.startswith("qwen3"):
            tok = load_tokenizer(ModelConfig(path=str(folder)))
            tok.add_tokens(QWEN3_TOKENS)
            tok.save_pretrained(folder)
        out[family] = folder
    return out


def setup(case: str, folders) -> tuple[Path, object, str, str]:
    family, name = CASES[case]
    tok = load_tokenizer(ModelConfig(path=str(folders[family])))
    spec = str(FIXTURES / f"{name}.jinja")
    return folders[family], tok, spec, resolve_chat_template(spec, tok)


def test_the_fixtures_are_trls_copies_and_tiny_gemma3_is_the_release_before_the_string_system_fix():
    from shardtune.tiny import GEMMA3_TEMPLATE

    body = {p.stem: p.read_text().split("\n", 1) for p in FIXTURES.glob("vl_*.jinja")}
    assert all(re.fullmatch(r"\{#- .+ -#\}", header) for header, _ in body.values())
    trl = importlib.util.find_spec("trl")
    if trl is not None:  # byte for byte the copies trl keeps
        theirs = Path(trl.origin).parent / "chat_templates"
        for name, their in (("vl_qwen2_vl", "qwen2_5_vl"), ("vl_qwen3_vl", "qwen3_vl"), ("vl_gemma3", "gemma3"),
                            ("vl_qwen3_5_think", "qwen3_5_think"), ("vl_qwen3_5_nothink", "qwen3_5_nothink"),
                            ("vl_gemma4", "gemma4_v5")):
            assert body[name][1] == (theirs / f"{their}.jinja").read_text(), name
    # tiny.py's Gemma 3 template lacks only the released one's branch for a system message given as a string
    prefix = "{%- set first_user_prefix = messages[0]['content']"
    branch = (f"    {{%- if messages[0]['content'] is string -%}}\n        {prefix} + '\n\n' -%}}\n"
              f"    {{%- else -%}}\n        {prefix}[0]['text'] + '\n\n' -%}}\n    {{%- endif -%}}\n")
    assert branch in body["vl_gemma3"][1]
    assert body["vl_gemma3"][1].replace(branch, f"    {prefix}[0]['text'] + '\n\n' -%}}\n") == GEMMA3_TEMPLATE


def rows_for(template: str) -> list[dict]:
    """verl's rows (one or two pictures), a system message and pictures in two user turns (the final answer with
    reasoning where the template writes it), and TRL's layout with text around a picture."""
    final = {"role": "assistant", "content": "Wombat answer two."}
    if "reasoning_content" in template:
        final["reasoning_content"] = "Platypus musing two."
    multi = {"messages": [{"role": "system", "content": "Narwhal system rules."},
                          {"role": "user", "content": "<image>Quokka question one?"},
                          {"role": "assistant", "content": "Wombat answer one."},
                          {"role": "user", "content": "Quokka question two? <image> Which?"}, final],
             "images": [{"bytes": png(7, 56, 56), "path": None}, {"bytes": png(8, 84, 56), "path": None}]}
    trl = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                                     {"type": "text", "text": " what is it?"}]},
                        {"role": "assistant", "content": "Wombat a picture."}],
           "images": [png(9, 56, 84)]}
    return verl_rows(3) + [multi, trl]


def with_parts(messages: list[dict]) -> list[dict]:
    """The messages as a processor's chat takes them: each `<image>` placeholder an image part between text
    parts (verl's own split), content lists as they are."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            pieces = content.split(IMAGE_PLACEHOLDER)
            content = [p for k, piece in enumerate(pieces) for p in ([{"type": "image"}] if k else [])
                       + ([{"type": "text", "text": piece}] if piece else [])]
        out.append({**m, "content": content})
    return out


def processor_ids(folder: Path, family: str, text: str, pictures: list, tok) -> list[int]:
    """The family's processor's tokens of a rendered chat: AutoProcessor where it loads; Qwen-VL's need
    torchvision for their video processor, and then their own image-token rule (`replace_image_token`) runs on
    the image processor's patch grids."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except ImportError:
        processor = None
    if processor is not None:
        out = processor(text=[text], images=[pictures] if family == "gemma3" else pictures, add_special_tokens=False)
        return list(out["input_ids"][0])
    cls = getattr(transformers, {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(
        family, "Qwen3VLProcessor"))
    stub = SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(folder), image_token="<|image_pad|>")
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(pictures) + 1
    grids = [stub.image_processor(images=[p], return_tensors="pt") for p in pictures]
    text = pieces[0] + "".join(cls.replace_image_token(stub, g, 0) + piece for g, piece in zip(grids, pieces[1:]))
    return tok(text, add_special_tokens=False)["input_ids"]


def unexpanded(ids: list[int], labels: list[int], images: tuple[bytes, ...], vision) -> tuple[list[int], list[int]]:
    """A sample with each picture's tokens back as the template's marker: the tokens of the rendered text."""
    marker = vision.tokenizer(vision.marker, add_special_tokens=False)["input_ids"]
    out_ids, out_labels, at = [], [], 0
    for image in images:
        tokens = vision.image_tokens(image)
        start = next(k for k in range(at, len(ids)) if ids[k:k + len(tokens)] == tokens)
        assert all(lab == IGNORE_INDEX for lab in labels[start:start + len(tokens)])  # no picture token trained
        out_ids += ids[at:start] + marker
        out_labels += labels[at:start] + [IGNORE_INDEX] * len(marker)
        at = start + len(tokens)
    return out_ids + ids[at:], out_labels + labels[at:]


def as_strings(chat: list[dict], marker: str, tok, template: str) -> list[dict]:
    """The chat with each content list as the one string that renders the same (the mask checker finds a
    message's text in the render): its texts and markers joined as they are, or each trimmed where the template
    trims every part (Gemma 3)."""
    for trim in (False, True):
        out = [{**m, "content": "".join(marker if p["type"] == "image" else p["text"].strip() if trim else p["text"]
                                        for p in m["content"])} if isinstance(m["content"], list) else m
               for m in chat]
        if tok.apply_chat_template(out, chat_template=template, tokenize=False) == \
                tok.apply_chat_template(chat, chat_template=template, tokenize=False):
            return out
    raise AssertionError("no string content renders as the parts do")


@pytest.mark.parametrize("case", CASES)
def test_samples_are_the_processors_tokens_and_train_every_answer_and_its_end_only(case, folders):
    folder, tok, spec, template = setup(case, folders)
    family = CASES[case][0]
    names = GEMMA3 if family == "gemma3" else QWEN
    ids_of = {k: tok.convert_tokens_to_ids(v) for k, v in (("header", names["header"]), ("end", names["end"]))}
    picture_ids = set(tok.convert_tokens_to_ids(list(names["picture"])))
    vision = image_processing(tok, template)
    for i, row in enumerate(rows_for(template)):
        (sample,), audit = row_samples(Row("rows.jsonl", i, row), None, tok, DataConfig(chat_template=spec),
                                       template)
        chat = with_parts(row["messages"])
        text = tok.apply_chat_template(chat, chat_template=template, tokenize=False)
        pictures = [decode(im["bytes"] if isinstance(im, dict) else im) for im in row["images"]]
        assert sample.input_ids == processor_ids(folder, family, text, pictures, tok), (case, i)
        assert len(sample.images) == len(pictures) == audit["images"] and audit["trained_image_tokens"] == 0
        trained = [(t, lab != IGNORE_INDEX) for t, lab in zip(sample.input_ids, sample.labels)]
        assert not any(on for t, on in trained if t in picture_ids or t == ids_of["header"]), (case, i)
        answers = sum(m["role"] == "assistant" for m in row["messages"])
        assert sum(on for t, on in trained if t == ids_of["end"]) == answers, (case, i)
        # the mask checker judges the text-level sample against the render of the same chat, each image part as
        # a text part of the marker (it renders the same) so that every user text is found in the render
        ids, labels = unexpanded(sample.input_ids, sample.labels, sample.images, vision)
        marked = as_strings(chat, vision.marker, tok, template)
        assert tok.apply_chat_template(marked, chat_template=template, tokenize=False) == text
        assert not check_mask(tok, template, marked, None, ids, labels), (case, i)


@pytest.mark.parametrize("case", ["qwen2_vl", "qwen3_5_think", "gemma3"])
def test_render_shows_each_picture_as_one_placeholder_with_its_token_count(case, folders, tmp_path, capsys):
    from shardtune.config import load_config, validate
    from shardtune.preview import render_sample

    folder, tok, spec, template = setup(case, folders)
    rows = verl_rows(3)  # row 1 holds two pictures
    path = write_parquet(tmp_path / "train.parquet", rows)
    render_sample(validate(load_config(None, [f"model.path={folder}", f"data.train_files=[{path}]",
                                              f"data.chat_template={spec}"])), 1, "never")
    out = capsys.readouterr().out
    vision = image_processing(tok, template)
    counts = [vision.image_tokens(im["bytes"]).count(vision.image_token_id) for im in rows[1]["images"]]
    opening, pad, closing = (GEMMA3 if case == "gemma3" else QWEN)["picture"]
    for n in counts:
        assert out.count(f"{opening}<image: {n} tokens>{closing}") == counts.count(n), out
    assert pad not in out and f"2 images, {sum(counts)} image tokens, 0 of them trained" in out
