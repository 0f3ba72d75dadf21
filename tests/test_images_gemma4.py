"""Pictures on Gemma 4: samples are its processor's tokens and pixels (its processor needs torchvision to load, so
shardtune counts the tokens by its image processor's rule), packed = padded = 2 processes with its picture
tokens attending both ways on the sliding-window layers, other pictures give another loss, and the export keeps
the vision tower."""

from __future__ import annotations

import glob
import json

import pytest
import torch
from conftest import TRAIN_RUNS, torchrun, train_runs, write_parquet
from test_images import samples_of, verl_rows
from test_images_families import image_run, losses, same, swapped_pictures

from shardtune.batch import IGNORE_INDEX
from shardtune.config import ModelConfig
from shardtune.data.chat import resolve_chat_template
from shardtune.data.vision import image_processing, pixels_for
from shardtune.model import load_tokenizer
from shardtune.tiny import save_tiny_vlm


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("gemma4") / "model", family="gemma4")


def own_processor(folder, monkeypatch):
    """transformers' Gemma4Processor on the folder's tokenizer and image processor (its expansion of each image
    token, its pixels and mm_token_type_ids). Its constructor insists on a video processor, a class that cannot
    be defined without torchvision: the class check is skipped for that one missing argument."""
    from transformers import AutoImageProcessor, AutoTokenizer, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    config = json.loads((folder / "processor_config.json").read_text())
    return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                           image_processor=AutoImageProcessor.from_pretrained(folder),
                           tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                           image_seq_length=config["image_seq_length"])


def as_parts(messages: list[dict]) -> list[dict]:
    """A verl row's messages with each `<image>` placeholder as an image part (how verl and TRL hand them to a
    chat template)."""
    out = []
    for m in messages:
        pieces = m["content"].split("<image>")
        parts = [p for k, text in enumerate(pieces)
                 for p in ([{"type": "image"}] if k else []) + ([{"type": "text", "text": text}] if text else [])]
        out.append({**m, "content": parts})
    return out


def test_gemma4_samples_are_its_processors_own_tokens_and_pixels_and_train_no_picture(gemma4, monkeypatch):
    from shardtune.data.media import decode

    tok = load_tokenizer(ModelConfig(path=str(gemma4)))
    vision = image_processing(tok, resolve_chat_template(None, tok))
    assert vision.processor is None  # AutoProcessor cannot load it here (no torchvision): the image rule serves
    assert vision.marker == "\n\n<|image|>\n\n"  # Gemma 4's template, whose text trim would eat the newlines
    processor = own_processor(gemma4, monkeypatch)
    picture_ids = {tok.image_token_id, tok.boi_token_id, tok.eoi_token_id}
    for row in verl_rows(4):
        (sample,), audit = samples_of(row, tok)
        pictures = [decode(im["bytes"]) for im in row["images"]]
        text = tok.apply_chat_template(as_parts(row["messages"]), tokenize=False)
        own = processor(text=[text], images=[pictures], add_special_tokens=False, return_tensors="pt")
        assert sample.input_ids == own["input_ids"][0].tolist()
        pixels = pixels_for(tok)([im["bytes"] for im in row["images"]])
        for key in ("pixel_values", "image_position_ids"):
            assert torch.equal(pixels[key], own[key]), key
        # the model's bidirectional blocks come from these types (shardtune/vision.py): the processor's own
        assert own["mm_token_type_ids"][0].tolist() == [int(t == tok.image_token_id) for t in sample.input_ids]
        n = sample.input_ids.count(tok.image_token_id)
        assert audit["image_tokens"] == n == int(pixels["num_soft_tokens_per_image"].sum()) > 0
        assert all(lab == IGNORE_INDEX for t, lab in zip(sample.input_ids, sample.labels) if t in picture_ids)
        # the text rules of the same chat without pictures: the same tokens trained
        bare = {"messages": [{**m, "content": m["content"].replace("<image>", "")} for m in row["messages"]]}
        (plain,), _ = samples_of(bare, tok)
        trained = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
        assert trained == [t for t, lab in zip(plain.input_ids, plain.labels) if lab != IGNORE_INDEX] != []


@pytest.mark.slow
@pytest.mark.dist
def test_gemma4_packed_equals_padded_equals_two_processes_and_the_pictures_matter(gemma4, tmp_path):
    """Packed rows (the per-sequence kernel; picture tokens both ways on the sliding-window layers) = padded
    rows (transformers' own Gemma 4 masks from mm_token_type_ids, sdpa) = 2 processes (data parallel; Ulysses
    SP 2, each rank handed its part of the whole row's embeddings and per-layer inputs), fp32, 3 steps; other
    pictures, other loss."""
    rows = verl_rows(18, text_every=4)
    data = write_parquet(tmp_path / "train.parquet", rows)
    other = write_parquet(tmp_path / "swapped.parquet", swapped_pictures(rows))
    one = train_runs([image_run(tmp_path, "packed", gemma4, data),
                      image_run(tmp_path, "padded", gemma4, data, "model.use_remove_padding=false"),
                      image_run(tmp_path, "swapped", gemma4, data, f"data.train_files=[{other}]")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, json.dumps([image_run(tmp_path, "dp2", gemma4, data),
                                  image_run(tmp_path, "sp2", gemma4, data, "engine.ulysses_sequence_parallel_size=2")]),
                   script=str(TRAIN_RUNS), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    packed = losses(tmp_path / "packed")
    # measured at step 3: padded 1.1e-6, 2 processes 3e-8, SP 2 1.2e-7 relative (the fp32 rounding that Gemma 4
    # text's training grows, README, stays this small here); packed rows without the picture blocks were 3.5e-4
    # off at step 1 and 1e-2 at step 3, so rel 1e-5 tells the blocks' presence apart; swapped pictures: 5e-4
    for name in ("padded", "dp2", "sp2"):
        assert same(losses(tmp_path / name), packed), (name, losses(tmp_path / name), packed)
    assert abs(losses(tmp_path / "swapped")[0] - packed[0]) > 1e-4 * packed[0]


def test_gemma4_export_keeps_the_tower_and_gives_the_live_models_logits_on_a_picture(gemma4, tmp_path):
    """One training step on pictures (in-process); the export is Gemma 4's architecture with every tensor, the
    frozen tower and embedder bit for bit; read back with its own Auto class (sdpa, transformers' masks from
    mm_token_type_ids) it gives the live model's logits on a chat with pictures (the per-sequence kernel with the
    picture blocks shardtune/vision.py passes)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from shardtune import vision
    from shardtune.config import load_config, validate
    from shardtune.export import export_checkpoint
    from shardtune.trainer import Trainer

    rows = verl_rows(4)
    data = write_parquet(tmp_path / "train.parquet", rows)
    trainer = Trainer(validate(load_config(None, image_run(tmp_path, "run", gemma4, data, "data.train_batch_size=4",
                                                           "trainer.total_training_steps=1"))))
    trainer.fit()
    tok = load_tokenizer(ModelConfig(path=str(gemma4)))
    (sample,), _ = samples_of(rows[1], tok)  # two pictures
    ids = torch.tensor([sample.input_ids])
    pixels = pixels_for(tok)([im["bytes"] for im in rows[1]["images"]])
    types = (ids == tok.image_token_id).int()
    inputs = dict(input_ids=ids, pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"],
                  mm_token_type_ids=types, use_cache=False)
    with torch.no_grad():
        live = trainer.engine.model.eval()(**inputs, image_blocks=vision.image_blocks(types),
                                           image_blocks_on="sliding").logits
    out = export_checkpoint(str(tmp_path / "run" / "global_step_1"), str(tmp_path / "hf"), dtype="fp32")
    before = {k: v for f in glob.glob(str(gemma4 / "*.safetensors")) for k, v in load_file(f).items()}
    after = {k: v for f in glob.glob(str(out / "*.safetensors")) for k, v in load_file(f).items()}
    assert before.keys() == after.keys()
    tower = {k for k in before if vision.part_of(k) != "language"}
    assert any("vision_tower" in k for k in tower) and any("embed_vision" in k for k in tower)
    assert all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before.keys() - tower)  # the language model trained
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, live, rtol=1e-5, atol=1e-5)
