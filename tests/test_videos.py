"""Videos in SFT rows: <video> placeholders without videos refused (or skipped), videos as lists of frames on
tiny Qwen2-VL and Qwen2.5-VL (the patch layout against the image processor, tokens never trained, render),
Qwen3-VL refused by name, and training (packed = padded; other frames, other loss)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from conftest import read_metrics, train_runs, write_parquet

from shardtune.batch import IGNORE_INDEX
from shardtune.config import DataConfig, ModelConfig
from shardtune.data.chat import resolve_chat_template
from shardtune.data.dataset import build_dataset
from shardtune.data.readers import Row
from shardtune.data.tokenize import row_samples
from shardtune.data.video import frames_of, pack
from shardtune.data.vision import image_processing, pixels_for
from shardtune.errors import DataError
from shardtune.model import load_tokenizer
from shardtune.tiny import byte_tokenizer


def png(seed: int, width: int = 56, height: int = 84) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rgb = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def answer(i: int = 0) -> dict:
    return {"role": "assistant", "content": f"It shows {'dots ' * (i % 3)}moving."}


def samples_of(row: dict, tokenizer, **keys):
    template = resolve_chat_template(None, tokenizer)
    return row_samples(Row("rows.jsonl", 2, row), None, tokenizer, DataConfig(cache_dir=None, **keys), template)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from shardtune.tiny import save_tiny_vlm

    return {family: save_tiny_vlm(tmp_path_factory.mktemp(family) / "model", seed=0, family=family)
            for family in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="module")
def tokenizer(models):
    return load_tokenizer(ModelConfig(path=str(models["qwen2_vl"])))


# ----------------------------------------------------------------------------------------------------------
# <video> placeholders and videos that do not match (checked before anything is read)


@pytest.mark.parametrize("row,key,needle", [
    ({"messages": [{"role": "user", "content": "See <video> here"}, answer()]}, "messages[0].content",
     "a <video> placeholder, and the row has no videos"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}, answer()]},
     "messages[0].content", "and the row has no videos"),
    ({"messages": [{"role": "user", "content": "<video><video> twice"}, answer()], "videos": [[b"x"]]},
     "videos", "1 videos but 2 placeholders"),
    ({"messages": [{"role": "user", "content": "no placeholder"}, answer()], "videos": [[b"x"]]},
     "videos", "1 videos but 0 placeholders"),
])
def test_video_placeholders_without_their_videos_name_the_row_and_key(tokenizer, row, key, needle):
    with pytest.raises(DataError) as e:
        samples_of(row, tokenizer)
    msg = str(e.value)
    assert msg.startswith(f"rows.jsonl, row 2, key '{key}': ") and needle in msg and "Fix:" in msg, msg


def test_rows_with_unmatched_video_placeholders_are_counted_and_skipped_and_are_text_to_a_text_model(tokenizer,
                                                                                                   tmp_path):
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, answer(i)]} for i in range(3)]
    bad = [{"messages": [{"role": "user", "content": "a <video> clip"}, answer()]}]
    path = write_parquet(tmp_path / "d.parquet", good + bad)
    ds = build_dataset([str(path)], DataConfig(cache_dir=None, num_proc=1, on_bad_row="skip"), tokenizer)
    assert len(ds) == 3 and ds.stats["dropped"] == {"bad_row": 1}
    assert len(build_dataset([str(path)], DataConfig(cache_dir=None, num_proc=1), byte_tokenizer())) == 4


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL: tokens and tensors


def video_row(i: int, frames: int = 3, seed: int = 0) -> dict:
    clip = [{"bytes": png(seed + 10 * i + k), "path": f"f{k}.png"} for k in range(frames)]
    return {"messages": [{"role": "user", "content": f"Clip {i}: <video> what happens?"}, answer(i)],
            "videos": [clip]}


def test_a_video_of_temporal_patch_size_copies_of_a_frame_is_that_frame_through_the_image_processor(tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from shardtune.data.media import decode

    pixels = pixels_for(tokenizer)
    assert isinstance(pixels.image_processor, Qwen2VLImageProcessorPil)
    frame, t = png(7, 70, 98), pixels.videos.temporal
    image = pixels.image_processor(images=[decode(frame)], return_tensors="pt")
    video = pixels([pack([frame] * t)])
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])
    assert torch.equal(video["video_grid_thw"], image["image_grid_thw"])
    # three frames: two groups, the last frame repeated; group 0 holds frames 0 and 1 along time
    frames = [png(k, 70, 98) for k in range(3)]
    video = pixels([pack(frames)])
    g = video["video_grid_thw"][0]
    assert g.tolist() == [2, *image["image_grid_thw"][0, 1:].tolist()]
    rows = video["pixel_values_videos"].view(2, -1, 3, t, 14, 14)
    one = [pixels.image_processor(images=[decode(f)], return_tensors="pt")["pixel_values"].view(-1, 3, t, 14, 14)
           for f in frames]
    for group, members in ((0, (0, 1)), (1, (2, 2))):
        for k, f in enumerate(members):
            assert torch.equal(rows[group, :, :, k], one[f][:, :, 0])
    # and the tokens the text holds: grid / merge_size^2
    samples, audit = samples_of({"messages": [{"role": "user", "content": "<video>"}, answer()],
                                 "videos": [frames]}, tokenizer)
    video_id = image_processing(tokenizer, resolve_chat_template(None, tokenizer)).video_token_id
    assert samples[0].input_ids.count(video_id) == int(g.prod()) // 4 == audit["video_tokens"]


def test_video_tokens_are_expanded_in_place_and_never_trained_beside_pictures(tokenizer):
    row = video_row(0)
    row["messages"][0]["content"] = "<image> then <video> and a part:"
    row["images"] = [png(99, 56, 56)]
    row["messages"].insert(1, answer())
    row["messages"].insert(2, {"role": "user", "content": [{"type": "video", "video": [png(5), png(6)]}]})
    samples, audit = samples_of(row, tokenizer)
    vision = image_processing(tokenizer, resolve_chat_template(None, tokenizer))
    s = samples[0]
    assert [len(frames_of(b)) for b in s.images[1:]] == [3, 2] and len(s.images) == 3
    assert audit["images"] == 1 and audit["videos"] == 2 and audit["trained_video_tokens"] == 0
    # 84 x 56 frames are 6 x 4 patches, 6 tokens merged 2 x 2; 3 frames are 2 groups of 2, 2 frames one
    assert audit["video_tokens"] == 2 * 6 + 6
    for t, lab in zip(s.input_ids, s.labels):
        if t in (vision.video_token_id, vision.image_token_id):
            assert lab == IGNORE_INDEX
    text = tokenizer.decode(s.input_ids)
    assert text.index("<|image_pad|>") < text.index("<|video_pad|>")


@pytest.mark.parametrize("video,key,needle", [
    ("clip.mp4", "videos[0]", "an encoded video file or a single value (clip.mp4), and shardtune has no video "
     "decoder"),
    ({"bytes": b"\x00\x00\x00\x18ftypmp42", "path": "clip.mp4"}, "videos[0]", "an encoded video file"),
    ([png(1), b"not a png"], "videos[0][1]", "the image cannot be decoded"),
    ([], "videos[0]", "a video without frames"),
])
def test_bad_videos_name_the_row_and_key(tokenizer, video, key, needle):
    row = {"messages": [{"role": "user", "content": "<video>"}, answer()], "videos": [video]}
    with pytest.raises(DataError) as e:
        samples_of(row, tokenizer)
    msg = str(e.value)
    assert msg.startswith(f"rows.jsonl, row 2, key '{key}': ") and needle in msg and "Fix:" in msg, msg


def test_qwen3_vl_videos_are_refused_by_name(tmp_path):
    from shardtune.tiny import save_tiny_vlm

    tok = load_tokenizer(ModelConfig(path=str(save_tiny_vlm(tmp_path / "m", family="qwen3_vl", layers=1,
                                                            vision_depth=1))))
    with pytest.raises(DataError) as e:
        samples_of(video_row(0), tok)
    assert "key 'videos'" in str(e.value) and "qwen3_vl is refused" in str(e.value) and "timestamp" in str(e.value)


def test_render_shows_the_video_as_one_placeholder_with_its_token_count(models, tmp_path, capsys):
    from shardtune.config import load_config, validate
    from shardtune.preview import render_sample

    path = write_parquet(tmp_path / "train.parquet", [video_row(i) for i in range(2)])
    render_sample(validate(load_config(None, [f"model.path={models['qwen2_vl']}", f"data.train_files=[{path}]",
                                              "data.cache_dir=null"])), 1, "never")
    out = capsys.readouterr().out
    assert out.count("<|vision_start|><video: 12 tokens><|vision_end|>") == 1, out
    assert "<|video_pad|>" not in out and "1 videos, 12 video tokens, 0 of them trained" in out


# ----------------------------------------------------------------------------------------------------------
# Training


def rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with a video of 2 or 3 frames, every third with a picture as well, every fourth text only."""
    out = []
    for i in range(n):
        row = video_row(i, frames=2 + i % 2, seed=seed)
        if i % 3 == 2:
            row["messages"][0]["content"] = "<image>" + row["messages"][0]["content"]
            row["images"] = [{"bytes": png(500 + i, 56, 56), "path": "p.png"}]
        if i % 4 == 3:
            row = {"messages": [{"role": "user", "content": f"Text {i}?"}, answer(i)], "videos": []}
        out.append({"images": [], **row})  # every row names both columns (parquet takes the first row's keys)
    return out


def keys(model, data, run_dir, *extra) -> list[str]:
    return [f"model.path={model}", f"data.train_files=[{data}]", f"trainer.default_local_dir={run_dir}",
            "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3",
            "optim.lr=2e-3", "optim.lr_warmup_steps=0", "trainer.logger=[jsonl]", "trainer.progress_bar=false",
            "data.cache_dir=null", "data.shuffle=false", *extra]


def losses(run_dir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir)]


def test_packed_equals_padded_and_the_frames_matter_on_qwen2_vl_and_qwen2_5_vl(models, tmp_path):
    data = write_parquet(tmp_path / "train.parquet", rows(12))
    other = write_parquet(tmp_path / "other.parquet", rows(12, seed=1000))  # the same rows, other frames
    runs = {}
    for family, model in models.items():
        d = tmp_path / family
        runs[family] = {"packed": keys(model, data, d / "packed"),
                        "padded": keys(model, data, d / "padded", "model.use_remove_padding=false"),
                        "budget": keys(model, data, d / "budget", "data.use_dynamic_bsz=true",
                                       "data.max_token_len_per_gpu=256"),
                        "other": keys(model, other, d / "other", "trainer.total_training_steps=1")}
    r = train_runs([run for family in runs.values() for run in family.values()])  # one start-up for all
    assert r.returncode == 0, r.stderr[-3000:]
    for family in models:
        got = {name: losses(tmp_path / family / name) for name in runs[family]}
        packed = got["packed"]
        assert len(packed) == 3 and all(math.isfinite(x) for x in packed), family
        for name in ("padded", "budget"):
            assert len(got[name]) == 3 and all(math.isclose(a, b, rel_tol=1e-5)
                                               for a, b in zip(got[name], packed)), (family, got)
        # the first step with other frames moves by far more than packed/padded/budget differ (fp32 noise)
        noise = max(abs(got[name][0] - packed[0]) for name in ("padded", "budget"))
        assert abs(got["other"][0] - packed[0]) > max(1e-5 * packed[0], 100 * noise), (family, got)


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_and_ulysses_sp2_equal_one_process_with_pictures_and_videos_mixed(models, tmp_path):
    """Micro-batches with pictures, videos, both or neither on different ranks: each rank runs blank tower
    calls for the kinds it lacks (vision.py), so the FSDP2 collectives pair up and the losses match."""
    import json

    from conftest import TRAIN_RUNS, torchrun

    data = write_parquet(tmp_path / "train.parquet", rows(12))
    model, budget = models["qwen2_5_vl"], ("data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=256")
    r = train_runs([keys(model, data, tmp_path / "one", *budget)])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [keys(model, data, tmp_path / "dp2", *budget),
            keys(model, data, tmp_path / "sp2", *budget, "engine.ulysses_sequence_parallel_size=2")]
    r = torchrun(2, json.dumps(runs), script=str(TRAIN_RUNS), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one = losses(tmp_path / "one")
    for name in ("dp2", "sp2"):
        got = losses(tmp_path / name)
        assert len(got) == 3 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, one)), (name, got, one)
