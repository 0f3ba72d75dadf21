"""The held-out bars of images in SFT data, on verl's own VLM example: its command line of
examples/sft/vlm/run_qwen3_vl_2b_fsdp.sh (verl 0.9.1, as bench/verl_091_lines.json holds it) run unchanged on
2 processes through shardtune.verl.sft_trainer, against a tiny Qwen3-VL and a parquet written the way verl's
examples/data_preprocess/pokemon.py writes llamafactory/pokemon-gpt4o-captions (a `datasets` Image list column,
ShareGPT turns renamed to `messages`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import read_metrics, torchrun, train_runs
from test_images import png

from shardtune.verl.translate import ENGINE, translate

ROOT = Path(__file__).parents[1]
ROWS = 96  # the line's global batch: one step per epoch, its 10 epochs 10 steps


def verl_line(data: Path, model: Path, ckpt: Path) -> list[str]:
    lines = json.loads((ROOT / "bench" / "verl_091_lines.json").read_text())
    line = next(x for x in lines if x["source"] == "examples/sft/vlm/run_qwen3_vl_2b_fsdp.sh")
    return [a.replace("{sft}", str(data)).replace("{model}", str(model)).replace("{ckpt}", str(ckpt))
            for a in line["args"]]


def with_keys(line: list[str], **keys: str) -> list[str]:
    """The line with some keys' values replaced (dots written as __), others appended."""
    keys = {k.replace("__", "."): v for k, v in keys.items()}
    out = [f"{a.split('=', 1)[0]}={keys.pop(a.split('=', 1)[0])}" if a.split("=", 1)[0] in keys else a for a in line]
    return out + [f"{k}={v}" for k, v in keys.items()]


def pokemon_parquet(path: Path, shift: int = 0, corrupt_row: int | None = None) -> Path:
    """Rows as verl's pokemon.py writes them: the dataset's `images` (an Image list: {bytes, path} in parquet)
    kept, its ShareGPT `conversations` ({from: human|gpt, value}) mapped to `messages` ({role, content}).
    `shift`: every row gets the pictures of the row `shift` further on."""
    import datasets

    pictures = [png(i, 32 * (3 + i % 2), 32 * (3 + (i // 2) % 2)) for i in range(ROWS)]  # 9 to 16 image tokens
    if corrupt_row is not None:
        pictures[corrupt_row] = pictures[corrupt_row][:40]  # a cut-off PNG
    raw = datasets.Dataset.from_dict(
        {"conversations": [[{"from": "human", "value": "<image>Describe this Pokemon."},
                            {"from": "gpt", "value": f"Pokemon {i} is {'small ' * (i % 3)}and bright."}]
                           for i in range(ROWS)],
         "images": [[pictures[(i + shift) % ROWS]] for i in range(ROWS)]},
        features=datasets.Features({"conversations": [{"from": datasets.Value("string"),
                                                       "value": datasets.Value("string")}],
                                    "images": datasets.Sequence(datasets.Image())}))
    roles = {"human": "user", "gpt": "assistant"}
    rows = raw.map(lambda row: {"messages": [{"role": roles[c["from"]], "content": c["value"]}
                                             for c in row["conversations"]]}, remove_columns=["conversations"])
    rows.to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    from shardtune.tiny import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("qwen3_vl") / "model", family="qwen3_vl")


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.dist
def test_verls_vlm_line_runs_unchanged_on_two_processes_and_equals_packed_and_padded_one_process(qwen3_vl, tmp_path):
    data = pokemon_parquet(tmp_path / "train.parquet")
    line = verl_line(data, qwen3_vl, tmp_path / "verl")
    r = torchrun(2, *line, module="shardtune.verl.sft_trainer", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    verl = losses(tmp_path / "verl")
    assert len(verl) == 10
    # one process, the same line but for its sequence-parallel size (packed rows), and with padded rows; and
    # the first step of the same rows with each other's pictures
    one = with_keys(line, engine__ulysses_sequence_parallel_size="1", trainer__logger="[console]")
    swapped = pokemon_parquet(tmp_path / "swapped.parquet", shift=1)
    # each translated as shardtune.verl.sft_trainer translates a line, and run in one process
    runs = [translate(with_keys(one, trainer__default_local_dir=str(tmp_path / "packed")), ENGINE),
            translate(with_keys(one, trainer__default_local_dir=str(tmp_path / "padded"),
                                model__use_remove_padding="False"), ENGINE),
            translate(with_keys(one, trainer__default_local_dir=str(tmp_path / "swapped"),
                                data__train_files=str(swapped), trainer__total_training_steps="1"), ENGINE)]
    r = train_runs(runs)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("packed", "padded"):
        assert len(losses(tmp_path / name)) == 10
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses(tmp_path / name), verl)), name
    # the pictures are seen: the first step moves by far more than the packed/padded difference (fp32 noise)
    first = {name: losses(tmp_path / name)[0] for name in ("packed", "padded", "swapped")}
    assert abs(first["swapped"] - first["packed"]) > max(1e-6 * first["packed"],
                                                         100 * abs(first["padded"] - first["packed"])), first


def test_render_of_the_pokemon_rows_shows_the_picture_and_trains_none_of_its_tokens(qwen3_vl, tmp_path, capsys):
    from shardtune.config import load_config, validate
    from shardtune.preview import render_sample

    data = pokemon_parquet(tmp_path / "train.parquet")
    render_sample(validate(load_config(None, [f"model.path={qwen3_vl}", f"data.train_files=[{data}]"])), 3, "never")
    out = capsys.readouterr().out
    assert out.count("<|vision_start|><image: ") == 1 and "<|image_pad|>" not in out
    assert "1 images" in out and "0 of them trained" in out and "[[Pokemon 3 is and bright.<|im_end|>]]" in out


@pytest.mark.slow
@pytest.mark.dist
def test_verls_vlm_line_on_corrupt_image_bytes_in_row_3_names_the_row_and_the_images_key(qwen3_vl, tmp_path):
    data = pokemon_parquet(tmp_path / "train.parquet", corrupt_row=3)
    r = torchrun(2, *verl_line(data, qwen3_vl, tmp_path / "verl"), module="shardtune.verl.sft_trainer")
    assert r.returncode != 0
    # each rank says it in one paragraph (rank 1 is handed rank 0's error; it does not crash on the lost peer);
    # the one traceback is plain torchrun's own report that a worker exited non-zero (`shardtune train --nproc`
    # ends in one line instead: tests/test_bad_inputs.py)
    ranks, _, launcher = r.stderr.partition("Traceback")
    for rank in (0, 1):
        assert f"shardtune: error (rank {rank}): {data}, row 3, key 'images[0]': the image cannot be decoded" in ranks
    assert "Fix:" in ranks and "ChildFailedError" in launcher and "Traceback" not in launcher, r.stderr[-3000:]
