"""data.message_weight_key: each trained turn's token losses times its message's weight, the step's sum still
divided by its supervised-token count. Against a hand reference from a plain model's logits over several steps,
all weights 1 against no weights, packed against padded, 1 against 2 processes (also with NEFTune) and
Ulysses SP=2, through the cache and the stream; bad weights named by file, row, message and key."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN_RUNS, arithmetic_rows, read_metrics, torchrun, write_jsonl, write_parquet

from shardtune.batch import IGNORE_INDEX
from shardtune.config import DataConfig, load_config, resolve_sources, validate
from shardtune.data.dataset import build_dataset
from shardtune.data.formats import to_conversation
from shardtune.data.readers import Row
from shardtune.data.stream import SampleStream
from shardtune.errors import ConfigError, DataError
from shardtune.tiny import byte_tokenizer
from shardtune.trainer import Trainer

KEY = "loss_weight"
NEFTUNE = "model.neftune_noise_alpha=5"
STEPS = 3


def weighted_rows(n: int, seed: int) -> list[dict]:
    """Arithmetic chats whose assistant turns carry varied weights (0 included, an int, some none: weight 1)."""
    rng = random.Random(seed)
    rows = arithmetic_rows(n, seed=seed, multi_turn=True)
    for row in rows:
        for m in row["messages"]:
            if m["role"] == "assistant" and rng.random() < 0.85:
                m[KEY] = rng.choice([0.0, 0.25, 0.5, 1.0, 2, 3.5])
            elif m["role"] == "user" and rng.random() < 0.2:
                m[KEY] = 9.0  # a weight on a message that is not trained changes nothing
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    rows = weighted_rows(24, seed=11)
    ones = [{"messages": [{**m, KEY: 1.0} if m["role"] == "assistant" else m for m in r["messages"]]} for r in rows]
    plain = [{"messages": [{k: v for k, v in m.items() if k != KEY} for m in r["messages"]]} for r in rows]
    return {"rows": rows, "weighted": write_jsonl(d / "weighted.jsonl", rows),
            "ones": write_jsonl(d / "ones.jsonl", ones), "plain": write_jsonl(d / "plain.jsonl", plain), "dir": d}


def overrides(model, train, run_dir, *extra):
    return [f"model.path={model}", f"data.train_files={train}", "data.cache_dir=null", "data.num_proc=1",
            "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "optim.lr=2e-3", "optim.lr_warmup_steps=0",
            f"trainer.total_training_steps={STEPS}", f"trainer.default_local_dir={run_dir}", "trainer.logger=[jsonl]",
            "trainer.progress_bar=false", "data.shuffle=true", *extra]


def trainer_for(model, train, run_dir, *extra):
    return Trainer(validate(load_config(None, overrides(model, train, run_dir, *extra))))


def turn_weights(labels: np.ndarray, messages: list[dict]) -> np.ndarray:
    """Each label's weight, derived from the row alone: the k-th run of consecutive trained labels is the k-th
    assistant turn (chatml writes a header between turns), weighted by that message's `loss_weight` (1 when
    it has none)."""
    trained = labels != IGNORE_INDEX
    starts = np.flatnonzero(trained & ~np.concatenate([[False], trained[:-1]]))
    turns = [m for m in messages if m["role"] == "assistant"]
    assert len(starts) == len(turns)
    out = np.zeros(len(labels))
    for k, s in enumerate(starts):
        e = s
        while e < len(labels) and trained[e]:
            e += 1
        out[s:e] = float(turns[k].get(KEY, 1.0))
    return out


def hand_step(trainer, ref, rows, step: int, dft: bool = False) -> tuple[float, float]:
    """Step `step`'s loss and gradient norm the textbook way, from `ref` holding the trainer's current weights:
    one unpadded sequence at a time, sum over the step's supervised tokens of w * CE (times the detached
    exp(-CE) with DFT), divided by the number of supervised tokens (weight-0 tokens included)."""
    ref.load_state_dict(trainer.engine.model.state_dict())
    ref.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for i in trainer.loader.batches.sampler.batch(0, step):
        ids, labels = (np.asarray(x).astype("int64") for x in trainer.train_data.data[i][:2])
        w = torch.as_tensor(turn_weights(labels, rows[i]["messages"])[1:], dtype=torch.float32)
        logits = ref(input_ids=torch.as_tensor(ids)[None]).logits[0, :-1]
        target = torch.as_tensor(labels[1:])
        keep = target != IGNORE_INDEX
        ce = F.cross_entropy(logits[keep], target[keep], reduction="none")
        total = total + (w[keep] * ce * (torch.exp(-ce).detach() if dft else 1)).sum()
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    return loss.item(), norm.item()


@pytest.mark.parametrize("chunk,loss_type", [(0, "ce"), (5, "ce"), (0, "dft"), (5, "dft")])
def test_steps_equal_the_hand_computation(tiny_model, data, tmp_path, chunk, loss_type):
    """Several steps, the plain head and the chunked one, cross-entropy and DFT: rel 1e-5 in fp32."""
    from transformers import AutoModelForCausalLM

    trainer = trainer_for(tiny_model, data["weighted"], tmp_path / "run", f"data.message_weight_key={KEY}",
                          f"model.loss_chunk_size={chunk}", f"optim.loss_type={loss_type}")
    assert len(trainer.train_data.data) == len(data["rows"])  # one sample per row: sample i is row i
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager")
    batches = iter(trainer.loader)
    for step in range(STEPS):
        want_loss, want_norm = hand_step(trainer, ref, data["rows"], step, dft=loss_type == "dft")
        got = trainer.train_step(next(batches))
        assert math.isclose(got["train/loss"], want_loss, rel_tol=1e-5), (step, got["train/loss"], want_loss)
        assert math.isclose(got["train/grad_norm"], want_norm, rel_tol=1e-5), (step, got["train/grad_norm"], want_norm)


def test_all_weights_one_equal_no_weights_and_validation_is_plain(tiny_model, data, tmp_path, one_process):
    """Weights of 1 train as no weights; val/loss stays the plain token-mean cross-entropy (weights shape the
    training loss only): the weighted validation rows give the number the same rows without weights give."""
    val = {"ones": data["weighted"], "plain": data["plain"]}
    history = {name: trainer_for(tiny_model, data[name], tmp_path / name, f"data.val_files={val[name]}",
                                 "trainer.test_freq=3", *([f"data.message_weight_key={KEY}"] * (name == "ones"))).fit()
               for name in ("ones", "plain")}
    for a, b in zip(history["ones"], history["plain"]):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6)
        assert math.isclose(a["train/grad_norm"], b["train/grad_norm"], rel_tol=1e-6)
    assert math.isclose(history["ones"][-1]["val/loss"], history["plain"][-1]["val/loss"], rel_tol=1e-6)
    assert not math.isclose(one_process[0]["train/loss"], history["plain"][0]["train/loss"], rel_tol=1e-3)


def test_weight_zero_counts_in_the_divisor_and_train_false_does_not(tiny_model, data, tmp_path):
    """Masks decide what is supervised, weights only scale it: a turn of weight 0 adds nothing to the loss but
    its tokens stay in the divisor, so step 1's loss and gradient are those of the same turn with train: false
    times (supervised tokens without the turn) / (with it)."""
    rows = [json.loads(line) for line in data["plain"].read_text().splitlines()]
    zero = [{"messages": [dict(m) for m in r["messages"]]} for r in rows]
    off = [{"messages": [dict(m) for m in r["messages"]]} for r in rows]
    for z, o in zip(zero, off):
        first = next(i for i, m in enumerate(z["messages"]) if m["role"] == "assistant")
        z["messages"][first][KEY] = 0
        o["messages"][first]["train"] = False
    d = data["dir"]
    trainers = {name: trainer_for(tiny_model, write_jsonl(d / f"{name}.jsonl", r), tmp_path / name,
                                  f"data.message_weight_key={KEY}", "trainer.total_training_steps=1")
                for name, r in (("zero", zero), ("off", off))}
    batch = {name: next(iter(t.loader)) for name, t in trainers.items()}
    ratio = batch["off"].num_targets / batch["zero"].num_targets
    assert ratio < 1
    got = {name: t.train_step(batch[name]) for name, t in trainers.items()}
    assert math.isclose(got["zero"]["train/loss"], got["off"]["train/loss"] * ratio, rel_tol=1e-5)
    assert math.isclose(got["zero"]["train/grad_norm"], got["off"]["train/grad_norm"] * ratio, rel_tol=1e-5)


@pytest.fixture(scope="module")
def one_process(tiny_model, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    return trainer_for(tiny_model, data["weighted"], run, f"data.message_weight_key={KEY}").fit()


def assert_close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert math.isclose(x["train/loss"], y["train/loss"], rel_tol=1e-5), (x, y)
        assert math.isclose(x["train/grad_norm"], y["train/grad_norm"], rel_tol=1e-5), (x, y)


def test_padded_equals_packed(tiny_model, data, tmp_path, one_process):
    padded = trainer_for(tiny_model, data["weighted"], tmp_path / "run", f"data.message_weight_key={KEY}",
                         "model.use_remove_padding=false").fit()
    assert_close(one_process, padded)


@pytest.mark.dist
def test_two_processes_and_ulysses_sp2_equal_one(tiny_model, data, tmp_path, one_process):
    """One torchrun launch, two runs: 2 data-parallel ranks (the divisor counts both ranks' tokens), and one
    Ulysses SP=2 group with the chunked loss head and bucket padding (each rank weighs its slice)."""
    runs = {"dp2": [], "sp2": ["engine.ulysses_sequence_parallel_size=2", "model.loss_chunk_size=5",
                               "data.pad_to_length_bucket=16"], "dp2_neftune": [NEFTUNE]}
    specs = [overrides(tiny_model, data["weighted"], tmp_path / name, f"data.message_weight_key={KEY}", *extra)
             for name, extra in runs.items()]
    r = torchrun(2, json.dumps(specs), script=str(TRAIN_RUNS))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("dp2", "sp2"):
        assert_close(one_process, read_metrics(tmp_path / name))
    # NEFTune (in this launch, which costs more than its run): each sample's noise depends on the seed, the step
    # and the sample, not on the rank it lands on, so 2 ranks train what 1 does (and not what no noise does)
    neftune = trainer_for(tiny_model, data["weighted"], tmp_path / "neftune", f"data.message_weight_key={KEY}",
                          NEFTUNE).fit()
    assert_close(neftune, read_metrics(tmp_path / "dp2_neftune"))
    # the noise moves the loss by more than these checks' tolerance (alpha 5 on a tiny model: ~5e-5 at step 1)
    assert not math.isclose(neftune[0]["train/loss"], one_process[0]["train/loss"], rel_tol=1e-5)


# ---- the data path: cache, stream, formats -----------------------------------------------------------------

def weights_of(ds) -> list[list[float]]:
    return [np.asarray(ds[i][3]).tolist() for i in range(len(ds))]


def test_the_cache_keeps_the_weights_and_its_key_names_the_weight_key(data, tmp_path, chatml_tok):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1, message_weight_key=KEY)
    fresh = build_dataset([str(data["weighted"])], cfg, chatml_tok)
    again = build_dataset([str(data["weighted"])], cfg, chatml_tok)
    assert again.stats.get("cache_hit") and not fresh.stats.get("cache_hit")
    assert weights_of(fresh) == weights_of(again)
    for i, row in enumerate(data["rows"]):
        labels = np.asarray(fresh[i][1])
        assert np.allclose(weights_of(fresh)[i], turn_weights(labels, row["messages"]))
    other = build_dataset([str(data["weighted"])], DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1,
                                                              message_weight_key="other"), chatml_tok)
    assert not other.stats.get("cache_hit")  # another key: another cache
    assert all(set(w) <= {0.0, 1.0} for w in weights_of(other))  # no message has `other`: trained tokens weigh 1
    unweighted = build_dataset([str(data["weighted"])], DataConfig(cache_dir=str(tmp_path / "cache"), num_proc=1),
                               chatml_tok)
    assert not unweighted.stats.get("cache_hit") and len(unweighted[0]) == 2


def test_the_stream_yields_the_cached_samples_with_their_weights(data, tmp_path, chatml_tok):
    cfg = validate(load_config(None, ["model.path=/m", f"data.train_files={data['weighted']}", "data.cache_dir=null",
                                      "data.num_proc=1", "data.train_batch_size=8", "data.streaming=true",
                                      "data.shuffle=false", "trainer.total_training_steps=3",
                                      f"data.message_weight_key={KEY}"]))
    stream = SampleStream(resolve_sources(cfg.data.train_files, cfg.data)[0], chatml_tok, cfg.data, 0)
    cached = build_dataset([str(data["weighted"])], cfg.data, chatml_tok)
    batches = iter(stream)
    got = [b.sample(p) for b in (next(batches) for _ in range(3)) for p in range(len(b.lengths))]
    assert len(got) == len(cached)
    for i, sample in enumerate(got):
        assert sample[3].dtype == np.float32 and np.array_equal(sample[3], cached[i][3])
        assert np.array_equal(sample[1], cached[i][1])


def test_prompt_response_alpaca_and_sharegpt_rows_carry_a_weight(tmp_path):
    rows = [{"prompt": "1+1?", "response": "2", KEY: 0.5}, {"prompt": "2+2?", "response": "4"}]
    tok = byte_tokenizer()
    ds = build_dataset([str(write_jsonl(tmp_path / "pr.jsonl", rows))],
                       DataConfig(cache_dir=None, num_proc=1, message_weight_key=KEY), tok)
    assert [sorted(set(np.asarray(ds[i][3])[np.asarray(ds[i][1]) != IGNORE_INDEX])) for i in range(2)] == [[0.5], [1.0]]
    alpaca = to_conversation(Row("a.jsonl", 0, {"instruction": "x", "output": "y", KEY: 2}), "alpaca",
                             DataConfig(message_weight_key=KEY))
    assert alpaca.messages[-1][KEY] == 2.0
    share = to_conversation(Row("s.jsonl", 0, {"conversations": [{"from": "human", "value": "x"},
                                                                 {"from": "gpt", "value": "y", KEY: 0.25}]}),
                            "sharegpt", DataConfig(message_weight_key=KEY))
    assert share.messages[-1][KEY] == 0.25


def test_parquet_nulls_weigh_one(tmp_path):
    """Parquet gives every message every field of the struct, missing ones as null: weight 1."""
    rows = [{"messages": [{"role": "user", "content": "1+1?", KEY: None},
                          {"role": "assistant", "content": "2", KEY: 0.5}]},
            {"messages": [{"role": "user", "content": "2+2?", KEY: None},
                          {"role": "assistant", "content": "4", KEY: None}]}]
    ds = build_dataset([str(write_parquet(tmp_path / "d.parquet", rows))],
                       DataConfig(cache_dir=None, num_proc=1, message_weight_key=KEY), byte_tokenizer())
    trained = [set(np.asarray(ds[i][3])[np.asarray(ds[i][1]) != IGNORE_INDEX].tolist()) for i in range(2)]
    assert trained == [{0.5}, {1.0}]


BAD = [(-1, "got -1"), ("0.5", "got str '0.5'"), (True, "got bool True"), (float("nan"), "got nan"),
       (float("inf"), "got inf"), ([1], "got [1]")]


@pytest.mark.parametrize("value,needle", BAD, ids=["negative", "text", "bool", "nan", "inf", "list"])
def test_a_bad_weight_names_file_row_message_and_key(value, needle):
    row = Row("f.jsonl", 4, {"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", KEY: value}]})
    with pytest.raises(DataError) as e:
        to_conversation(row, "messages", DataConfig(message_weight_key=KEY))
    msg = str(e.value)
    assert msg.startswith(f"f.jsonl, row 4, key 'messages[1].{KEY}'") and needle in msg and "Fix:" in msg


def test_bad_weights_are_counted_and_skipped_under_skip(data, tmp_path):
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", KEY: v}]}
           for v in (-2, "heavy")]
    f = write_jsonl(tmp_path / "d.jsonl", data["rows"][:5] + bad)
    ds = build_dataset([str(f)], DataConfig(cache_dir=None, num_proc=1, on_bad_row="skip", message_weight_key=KEY),
                       byte_tokenizer())
    assert len(ds) == 5 and ds.stats["dropped"] == {"bad_row": 2}


def test_validate_names_the_row_and_render_shows_the_weights(tiny_model, data, tmp_path, capsys):
    """What `shardtune validate` and `shardtune render` run (the CLI's error path is test_bad_inputs.py's)."""
    from shardtune.preview import render_sample, validate_data

    rows = data["rows"][:3] + [{"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a", KEY: -0.5}]}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        validate_data(validate(load_config(None, overrides(tiny_model, bad, tmp_path / "run",
                                                           f"data.message_weight_key={KEY}"))))
    assert str(e.value).startswith(f"{bad}, row 3, key 'messages[1].{KEY}': a message weight must be a finite "
                                   "number >= 0, got -0.5. Fix:")
    cfg = validate(load_config(None, overrides(tiny_model, data["weighted"], tmp_path / "run",
                                               f"data.message_weight_key={KEY}")))
    validate_data(cfg)
    ds = build_dataset([str(data["weighted"])], cfg.data, byte_tokenizer())
    total = sum(turn_weights(np.asarray(ds[i][1]), r["messages"])[1:].sum() for i, r in enumerate(data["rows"]))
    mean = total / int(ds.target_counts.sum())
    assert f"message weights (data.message_weight_key='{KEY}'): mean {mean:.3g} per supervised token" in \
        capsys.readouterr().out
    render_sample(cfg, 0, color="never")
    out = capsys.readouterr().out
    shown = [float(w.split("}")[0]) for w in out.split("{weight ")[1:]]
    assert shown == [float(m.get(KEY, 1.0)) for m in data["rows"][0]["messages"] if m["role"] == "assistant"]


@pytest.mark.parametrize("extra,needle", [
    (["data.message_weight_key=content"], "names a key the trainer already reads"),
    (["data.message_weight_key="], "data.message_weight_key is empty"),
    ([f"data.message_weight_key={KEY}", "model.use_liger=true"], "Liger's fused loss does not do"),
])
def test_bad_weight_configs_are_refused_before_any_model_loads(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, overrides("/nowhere", tmp_path / "d.jsonl", tmp_path / "run", *extra)))


def test_picture_tokens_keep_the_turn_weights_aligned(tmp_path):
    """Image tokens put in place of a marker weigh 0 and leave the trained tokens' weights where they were."""
    pytest.importorskip("PIL")
    from test_images import verl_rows

    from shardtune.config import ModelConfig
    from shardtune.data.chat import resolve_chat_template
    from shardtune.data.tokenize import row_samples
    from shardtune.model import load_tokenizer
    from shardtune.tiny import save_tiny_vlm

    tokenizer = load_tokenizer(ModelConfig(path=str(save_tiny_vlm(tmp_path / "vlm", seed=0))))
    template = resolve_chat_template(None, tokenizer)
    for k, row in enumerate(verl_rows(3)):
        row["messages"][1][KEY] = 0.5 * k
        (sample,), _ = row_samples(Row("r.jsonl", k, row), None, tokenizer, DataConfig(message_weight_key=KEY),
                                   template)
        assert len(sample.images) == len(row["images"]) and len(sample.weights) == len(sample.input_ids)
        labels = np.asarray(sample.labels)
        assert np.array_equal(np.asarray(sample.weights), turn_weights(labels, row["messages"]))
