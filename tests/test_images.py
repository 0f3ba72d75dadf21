"""Images in SFT data: layouts, image tokens and masks, bad pictures, render, and training parity on a tiny
Qwen2-VL (packed = padded = 2 processes; other pictures, other loss)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli, torchrun, write_parquet

from shardtune.batch import IGNORE_INDEX
from shardtune.config import DataConfig, ModelConfig
from shardtune.data.chat import resolve_chat_template
from shardtune.data.dataset import build_dataset
from shardtune.data.readers import Row
from shardtune.data.tokenize import row_samples
from shardtune.data.vision import image_processing
from shardtune.errors import DataError
from shardtune.model import load_tokenizer


def png(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def verl_rows(n: int, text_every: int = 0) -> list[dict]:
    """verl's layout: an `images` column of {bytes, path} and <image> placeholders; every `text_every`-th row
    has no picture."""
    rows = []
    for i in range(n):
        k = 0 if text_every and i % text_every == text_every - 1 else 1 + i % 2
        images = [{"bytes": png(10 * i + j, 28 * (2 + (i + j) % 3), 28 * (2 + i % 2)), "path": f"p{i}_{j}.png"}
                  for j in range(k)]
        rows.append({"messages": [{"role": "user", "content": "<image>" * k + f"What is in picture {i}?"},
                                  {"role": "assistant", "content": f"Picture {i} shows {'dots ' * (i % 4)}colours."}],
                     "images": images})
    return rows


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from shardtune.tiny import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(vlm):
    return load_tokenizer(ModelConfig(path=str(vlm)))


def samples_of(row: dict, tokenizer, path: str = "rows.jsonl"):
    template = resolve_chat_template(None, tokenizer)
    samples, audit = row_samples(Row(path, 0, row), None, tokenizer, DataConfig(), template)
    return samples, audit


def test_verl_trl_and_openai_layouts_give_the_same_sample(tokenizer, tmp_path):
    picture = png(1, 56, 84)
    (tmp_path / "pic.png").write_bytes(picture)
    answer = {"role": "assistant", "content": "A picture."}
    verl = {"messages": [{"role": "user", "content": "Look: <image> what?"}, answer],
            "images": [{"bytes": picture, "path": None}]}
    trl = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                                     {"type": "text", "text": " what?"}]}, answer],
           "images": [picture]}
    data_url = "data:image/png;base64," + base64.b64encode(picture).decode()
    openai = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": " what?"}]}, answer]}
    local = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image", "path": "pic.png"}, {"type": "text", "text": " what?"}]},
        answer]}
    remote = {"messages": [{"role": "user", "content": [  # an fsspec URL, read by the remote-storage readers
        {"type": "text", "text": "Look: "}, {"type": "image", "url": f"file://{tmp_path / 'pic.png'}"},
        {"type": "text", "text": " what?"}]}, answer]}
    rows = (verl, trl, openai, local, remote)
    got = [samples_of(r, tokenizer, path=str(tmp_path / "rows.jsonl"))[0][0] for r in rows]
    assert all(s == got[0] for s in got[1:])
    assert got[0].images == (picture,)


def test_image_tokens_are_expanded_and_never_trained(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    markers = {tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")}
    for row in verl_rows(6):
        (sample,), audit = samples_of(row, tokenizer)
        ids, labels = sample.input_ids, sample.labels
        n_images = len(row["images"])
        assert len(sample.images) == n_images == audit["images"]
        assert sum(t in markers for t in ids) == 2 * n_images
        # each picture: its markers around the image processor's patch grid merged 2 x 2
        vision = image_processing(tokenizer, resolve_chat_template(None, tokenizer))
        expected = sum(len(vision.image_tokens(im["bytes"])) - 2 for im in row["images"])
        assert ids.count(image_id) == expected == audit["image_tokens"] > 0
        assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == image_id or t in markers)
        # the text rules are those of the same chat without pictures: the assistant turn and its end, no header
        trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        assert trained == row["messages"][1]["content"] + "<|im_end|>"


@pytest.mark.parametrize("case, key", [("corrupt", "images[0]"), ("missing", "images[0]"), ("count", "images")])
def test_a_bad_picture_names_the_file_row_and_key(tokenizer, tmp_path, case, key):
    rows = verl_rows(6)
    if case == "corrupt":
        rows[3]["images"][0]["bytes"] = b"\x89PNG\r\n\x1a\n" + b"not really a png"
    elif case == "missing":
        rows[3]["images"][0] = {"bytes": None, "path": "nowhere/p.png"}
    else:
        rows[3]["images"].append(rows[3]["images"][0])
    path = write_parquet(tmp_path / "train.parquet", rows)
    cfg = DataConfig(train_files=[str(path)], cache_dir=None)
    with pytest.raises(DataError) as e:
        build_dataset(cfg.train_files, cfg, tokenizer)
    assert f"{path}, row 3, key '{key}'" in str(e.value) and "Fix:" in str(e.value)
    skipped = build_dataset(cfg.train_files, DataConfig(train_files=cfg.train_files, cache_dir=None,
                                                         on_bad_row="skip"), tokenizer)
    assert len(skipped) == 5 and skipped.stats["dropped"] == {"bad_row": 1}
    if case == "corrupt":  # the command line says it in one paragraph, without a traceback
        vlm = tokenizer.name_or_path
        r = run_cli("train", f"model.path={vlm}", f"data.train_files=[{path}]", "data.cache_dir=null",
                    f"trainer.default_local_dir={tmp_path / 'run'}")
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "row 3, key 'images[0]': the image cannot be decoded" in r.stderr


def test_a_text_model_refuses_rows_with_pictures(tiny_model, tmp_path):
    path = write_parquet(tmp_path / "train.parquet", verl_rows(2))
    r = run_cli("validate", f"model.path={tiny_model}", f"data.train_files=[{path}]", "data.cache_dir=null")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "row 0, key 'images'" in r.stderr and "no image processor" in r.stderr


def test_render_shows_each_picture_as_one_placeholder(vlm, tmp_path):
    path = write_parquet(tmp_path / "train.parquet", verl_rows(3))
    r = run_cli("render", f"model.path={vlm}", f"data.train_files=[{path}]", "--index", "1", "--color", "never")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("<|vision_start|><image: ") == 2 and "<|image_pad|>" not in r.stdout
    assert "2 images" in r.stdout and "0 of them trained" in r.stdout


# ----------------------------------------------------------------------------------------------------------
# Training


def train_args(vlm, data, run_dir, *extra):
    return [f"model.path={vlm}", f"data.train_files=[{data}]", f"trainer.default_local_dir={run_dir}",
            "data.train_batch_size=6", "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3",
            "optim.lr=2e-3", "optim.lr_warmup_steps=0", "trainer.logger=[jsonl]", "trainer.progress_bar=false",
            f"data.cache_dir={run_dir}_cache", *extra]


def losses(run_dir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir)]


def test_the_vision_tower_and_projector_are_frozen_by_default_and_lora_adapts_the_language_model(vlm):
    from shardtune.config import Config
    from shardtune.model import load_model
    from shardtune.parallel import World
    from shardtune.parallelize import parallelize
    from shardtune.vision import part_of

    def trainable(**keys) -> dict[str, set[bool]]:
        cfg = Config(model=ModelConfig(path=str(vlm), **keys))
        model = parallelize(load_model(cfg.model), cfg, World())
        parts: dict[str, set[bool]] = {}
        for name, p in model.named_parameters():
            parts.setdefault(part_of(name), set()).add(p.requires_grad)
        return parts, model

    parts, _ = trainable()
    assert parts == {"tower": {False}, "projector": {False}, "language": {True}}
    parts, _ = trainable(freeze_vision_model=False, freeze_language_model=True)
    assert parts == {"tower": {True}, "projector": {False}, "language": {False}}
    parts, model = trainable(lora_rank=4)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and part_of(n) == "language" for n in lora)


def same(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) == 3 and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Rows with one or two pictures, every fourth without (ranks then run the tower on a blank picture)."""
    return write_parquet(tmp_path_factory.mktemp("mixed") / "train.parquet", verl_rows(18, text_every=4))


@pytest.mark.slow
def test_packed_equals_padded_streamed_and_checkpointed_resumes_exactly_and_pictures_matter(vlm, mixed, tmp_path):
    runs = {}
    for name, extra in (("packed", ("trainer.save_hf_at_end=true", "trainer.save_freq=2")), ("padded",
                                                                                             ("model.use_remove_padding=false",)),
                        ("streamed", ("data.streaming=true", "data.shuffle_buffer=64",
                                      "model.enable_gradient_checkpointing=true"))):
        r = run_cli("train", *train_args(vlm, mixed, tmp_path / name, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert same(runs["padded"], runs["packed"]) and same(runs["streamed"], runs["packed"]), runs
    # resumed from step 2: step 3 bit for bit (the cached pictures read again at the same positions)
    r = run_cli("train", *train_args(vlm, mixed, tmp_path / "resumed", "trainer.resume_mode=resume_path",
                                     f"trainer.resume_from_path={tmp_path / 'packed' / 'global_step_2'}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "resumed") == runs["packed"][2:]
    # the weights written at the end: the whole model, the frozen tower bit for bit, the image processor beside it
    from safetensors.torch import load_file

    hf = tmp_path / "packed" / "global_step_3" / "huggingface"
    before, after = load_file(vlm / "model.safetensors"), load_file(hf / "model.safetensors")
    assert set(before) == set(after) and (hf / "preprocessor_config.json").is_file()
    assert all(torch.equal(before[k], after[k]) == (".visual." in f".{k}") for k in before)
    # the same rows, each with the next picture row's pictures: another loss from the first step on
    rows = verl_rows(18, text_every=4)
    with_pictures = [i for i, r in enumerate(rows) if r["images"]]
    swapped = [dict(r) for r in rows]
    for a, b in zip(with_pictures, with_pictures[1:] + with_pictures[:1]):
        swapped[a]["images"] = (rows[b]["images"] * 2)[: len(rows[a]["images"])]
    other = write_parquet(tmp_path / "swapped.parquet", swapped)
    r = run_cli("train", *train_args(vlm, other, tmp_path / "swapped"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(losses(tmp_path / "swapped")[0] - runs["packed"][0]) > 1e-4 * runs["packed"][0]


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_and_ulysses_sp2_equal_one_process(vlm, mixed, tmp_path):
    budget = ("data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=160")
    r = run_cli("train", *train_args(vlm, mixed, tmp_path / "one", *budget))
    assert r.returncode == 0, r.stderr[-3000:]
    one = losses(tmp_path / "one")
    for name, extra in (("dp2", ()), ("sp2", ("engine.ulysses_sequence_parallel_size=2",))):
        r = torchrun(2, "train", *train_args(vlm, mixed, tmp_path / name, *budget, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        assert same(losses(tmp_path / name), one), name


def test_collation_carries_each_micro_batchs_pictures_in_sequence_order(tokenizer):
    from shardtune.data.batching import collate, slice_for_sequence_parallel
    from shardtune.data.vision import pixels_for

    rows = verl_rows(3)  # 1, 2 and 1 pictures
    samples = [samples_of(r, tokenizer)[0][0] for r in rows]
    pixels = pixels_for(tokenizer)
    arrays = [(np.array(s.input_ids), np.array(s.labels), list(s.images)) for s in samples]
    each = [pixels([im]) for s in samples for im in s.images]
    for packed in (True, False):
        mb = collate(arrays, packed, tokenizer.pad_token_id, pixels)
        assert mb.vision.images_per_sequence == [1, 2, 1]
        for key in ("pixel_values", "image_grid_thw"):
            assert torch.equal(mb.vision.tensors[key], torch.cat([e[key] for e in each]))
    text_only = collate([a[:2] for a in arrays], True, tokenizer.pad_token_id, pixels)
    assert text_only.vision is None
    # under sequence parallelism every rank keeps the whole row's tokens and all the pictures
    mb = collate(arrays, True, tokenizer.pad_token_id, pixels)
    part = slice_for_sequence_parallel(mb, 2, 1, tokenizer.pad_token_id)
    assert part.vision is mb.vision and torch.equal(part.full_input_ids[:, : mb.input_ids.shape[1]], mb.input_ids)
    assert part.input_ids.shape[1] * 2 == part.full_input_ids.shape[1]
