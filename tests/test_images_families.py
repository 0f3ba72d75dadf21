"""Pictures on families beyond Qwen-VL: Gemma 3 (its processor loads through AutoProcessor; its picture tokens
attend both ways, which packed rows keep per sequence) and the processor fallback of Qwen-VL."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_RUNS, read_metrics, torchrun, train_runs, write_parquet
from test_images import samples_of, verl_rows

from shardtune.batch import IGNORE_INDEX
from shardtune.config import ModelConfig
from shardtune.data.chat import resolve_chat_template
from shardtune.data.vision import image_processing, pixels_for
from shardtune.model import load_tokenizer
from shardtune.tiny import GEMMA3_IMAGE_TOKENS, save_tiny_vlm


def image_run(root: Path, name: str, model: Path | str, data: Path, *extra: str) -> list[str]:
    """The overrides of one small training on picture data (batches of 6 in micro-batches of 2, 3 steps) that
    writes root/name; `extra` (`key=value`) replace the defaults."""
    keys = {"model.path": str(model), "data.train_files": f"[{data}]", "data.cache_dir": "null", "data.num_proc": "1",
            "data.train_batch_size": "6", "data.micro_batch_size_per_gpu": "2", "trainer.total_training_steps": "3",
            "optim.lr": "2e-3", "optim.lr_warmup_steps": "0", "trainer.logger": "[jsonl]",
            "trainer.progress_bar": "false", "trainer.default_local_dir": f"{root}/{name}"}
    keys.update(item.split("=", 1) for item in extra)
    return [f"{k}={v}" for k, v in keys.items()]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("gemma3") / "model", family="gemma3")


def test_gemma3_samples_are_its_processors_own_tokens_and_pixels_and_train_no_picture(gemma3, capsys):
    from transformers import AutoProcessor

    from shardtune.data.media import decode

    tok = load_tokenizer(ModelConfig(path=str(gemma3)))
    vision = image_processing(tok, resolve_chat_template(None, tok))
    assert vision.processor is not None  # the AutoProcessor path
    processor = AutoProcessor.from_pretrained(gemma3)
    picture_ids = {tok.image_token_id, tok.boi_token_id, tok.eoi_token_id}
    for row in verl_rows(4):
        (sample,), audit = samples_of(row, tok)
        pictures = [decode(im["bytes"]) for im in row["images"]]
        # the whole rendered chat through Gemma's processor: the same tokens, the same pixels
        chat = [{**m, "content": m["content"].replace("<image>", "<start_of_image>")} for m in row["messages"]]
        text = tok.apply_chat_template(chat, tokenize=False)
        own = processor(text=[text], images=[pictures], add_special_tokens=False, return_tensors="pt")
        assert sample.input_ids == own["input_ids"][0].tolist()
        assert torch.equal(pixels_for(tok)([im["bytes"] for im in row["images"]])["pixel_values"],
                           own["pixel_values"])
        n = sample.input_ids.count(tok.image_token_id)
        assert audit["image_tokens"] == GEMMA3_IMAGE_TOKENS * len(pictures) == n
        assert all(lab == IGNORE_INDEX for t, lab in zip(sample.input_ids, sample.labels) if t in picture_ids)
        # the text rules of the same chat without pictures: the same tokens trained
        bare = {"messages": [{**m, "content": m["content"].replace("<image>", "")} for m in row["messages"]]}
        (plain,), _ = samples_of(bare, tok)
        trained = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
        assert trained == [t for t, lab in zip(plain.input_ids, plain.labels) if lab != IGNORE_INDEX] != []


def test_render_shows_gemma3_pictures_with_their_token_counts(gemma3, tmp_path, capsys):
    from shardtune.config import load_config, validate
    from shardtune.preview import render_sample

    path = write_parquet(tmp_path / "train.parquet", verl_rows(3))
    render_sample(validate(load_config(None, [f"model.path={gemma3}", f"data.train_files=[{path}]"])), 1, "never")
    out = capsys.readouterr().out
    assert out.count(f"<start_of_image><image: {GEMMA3_IMAGE_TOKENS} tokens><end_of_image>") == 2
    assert "<image_soft_token>" not in out and "2 images, 32 image tokens, 0 of them trained" in out


def test_qwen_vl_falls_back_to_the_image_processor_where_its_processor_needs_torchvision(tmp_path):
    from transformers import AutoProcessor

    vlm = save_tiny_vlm(tmp_path / "qwen", family="qwen2_vl")
    tok = load_tokenizer(ModelConfig(path=str(vlm)))
    try:
        AutoProcessor.from_pretrained(vlm)
        loads = True
    except ImportError as e:  # Qwen2-VL's processor builds a video processor, which imports torchvision
        assert "torchvision" in str(e).lower()
        loads = False
    vision = image_processing(tok, resolve_chat_template(None, tok))
    assert (vision.processor is not None) == loads
    (sample,), audit = samples_of(verl_rows(2)[1], tok)
    assert audit["images"] == 2 and audit["image_tokens"] > 0 and audit["trained_image_tokens"] == 0


def losses(run_dir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir)]


def same(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) == 3 and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


def swapped_pictures(rows: list[dict]) -> list[dict]:
    """Each row with the next picture row's pictures (as many as it had)."""
    with_pictures = [i for i, r in enumerate(rows) if r["images"]]
    out = [dict(r) for r in rows]
    for a, b in zip(with_pictures, with_pictures[1:] + with_pictures[:1]):
        out[a]["images"] = (rows[b]["images"] * 2)[: len(rows[a]["images"])]
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_gemma3_packed_equals_padded_equals_two_processes_and_the_pictures_matter(gemma3, tmp_path):
    """Packed rows (the per-sequence kernel, picture tokens both ways) = padded rows (transformers' own Gemma 3
    mask from token_type_ids) = 2 processes (data parallel; Ulysses SP 2), fp32; other pictures, other loss."""
    rows = verl_rows(18, text_every=4)
    data = write_parquet(tmp_path / "train.parquet", rows)
    other = write_parquet(tmp_path / "swapped.parquet", swapped_pictures(rows))
    one = train_runs([image_run(tmp_path, "packed", gemma3, data),
                      image_run(tmp_path, "padded", gemma3, data, "model.use_remove_padding=false"),
                      image_run(tmp_path, "swapped", gemma3, data, f"data.train_files=[{other}]")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, json.dumps([image_run(tmp_path, "dp2", gemma3, data),
                                  image_run(tmp_path, "sp2", gemma3, data, "engine.ulysses_sequence_parallel_size=2")]),
                   script=str(TRAIN_RUNS), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    packed = losses(tmp_path / "packed")
    for name in ("padded", "dp2", "sp2"):
        assert same(losses(tmp_path / name), packed), (name, losses(tmp_path / name), packed)
    assert abs(losses(tmp_path / "swapped")[0] - packed[0]) > 1e-4 * packed[0]


@pytest.mark.slow
def test_qwen3_vl_moe_and_qwen3_5_packed_equal_padded_and_the_pictures_matter(tmp_path):
    """Qwen3-VL MoE (experts in the language model) and Qwen3.5 (Gated DeltaNet layers beside attention, its
    own tower): packed rows with per-sequence 3-D rope positions = padded rows, fp32; other pictures, other loss."""
    rows = verl_rows(18, text_every=4)
    data = write_parquet(tmp_path / "train.parquet", rows)
    other = write_parquet(tmp_path / "swapped.parquet", swapped_pictures(rows))
    models = {f: save_tiny_vlm(tmp_path / f, family=f) for f in ("qwen3_vl_moe", "qwen3_5")}
    runs = [image_run(tmp_path, f"{f}_{kind}", path, data, *extra) for f, path in models.items()
            for kind, extra in (("packed", ()), ("padded", ("model.use_remove_padding=false",)))]
    runs.append(image_run(tmp_path, "qwen3_5_swapped", models["qwen3_5"], data, f"data.train_files=[{other}]"))
    r = train_runs(runs)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in models:
        assert same(losses(tmp_path / f"{f}_padded"), losses(tmp_path / f"{f}_packed")), f
    packed = losses(tmp_path / "qwen3_5_packed")
    # further apart than the parity tolerance (the tiny tower's features move the loss by ~1e-4 relative)
    assert not math.isclose(losses(tmp_path / "qwen3_5_swapped")[0], packed[0], rel_tol=1e-5)


def test_videos_are_refused_by_file_row_and_key_and_a_missing_pillow_says_how_to_install_it(gemma3, chatml_tok,
                                                                                           tmp_path, monkeypatch):
    """Videos (a column, or a <video> placeholder without one) are refused by file, row and key."""
    from shardtune.config import DataConfig
    from shardtune.data.dataset import build_dataset
    from shardtune.errors import ConfigError, DataError

    tok = load_tokenizer(ModelConfig(path=str(gemma3)))
    rows = verl_rows(4)
    rows[2]["messages"][0]["content"] = "<video>" + rows[2]["messages"][0]["content"]
    rows[2]["videos"] = [[{"bytes": b"frame", "path": "f.png"}]]
    for r in rows[:2] + rows[3:]:
        r["videos"] = []
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError, match=f"{path}, row 2, key 'videos': the row has videos.*Fix: "):
        build_dataset([str(path)], DataConfig(train_files=[str(path)], cache_dir=None), tok)
    # a <video> placeholder with no videos: refused by file, row and message, or skipped and counted
    rows = verl_rows(4)
    rows[1]["messages"][0]["content"] = "<video>" + rows[1]["messages"][0]["content"]
    path = write_parquet(tmp_path / "placeholder.parquet", rows)
    with pytest.raises(DataError, match=rf"{path}, row 1, key 'messages\[0\].content': a <video> placeholder, "
                                        "and the row has no videos.*Fix: "):
        build_dataset([str(path)], DataConfig(train_files=[str(path)], cache_dir=None), tok)
    skipped = build_dataset([str(path)], DataConfig(train_files=[str(path)], cache_dir=None, on_bad_row="skip"), tok)
    assert len(skipped) == 3 and sum(skipped.stats["dropped"].values()) == 1
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "See <video> here."}]},
                          {"role": "assistant", "content": "A video."}]}
    with pytest.raises(DataError, match=r"row 0, key 'messages\[0\].content': a <video> placeholder"):
        samples_of(parts, tok)
    html = {"messages": [{"role": "user", "content": "What does <video> do in HTML?"},
                         {"role": "assistant", "content": "It embeds a video."}]}
    (text_sample,), _ = samples_of(html, chatml_tok)  # to a text model '<video>' is only text
    assert "<video>" in chatml_tok.decode(text_sample.input_ids)
    with pytest.raises(DataError, match="a <video> placeholder"):
        samples_of(html, tok)
    row = verl_rows(1)[0]
    monkeypatch.setitem(sys.modules, "PIL", None)  # as without Pillow: `import PIL` raises ImportError
    with pytest.raises(ConfigError, match=r"needs Pillow.*pip install 'shardtune\[vision\]'"):
        samples_of(row, tok)
