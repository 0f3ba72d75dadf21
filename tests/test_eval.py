"""Generation-based evaluation during training: prompts from the validation set, built-in and user scores,
the per-sample table in the run directory and TensorBoard, early stopping on an eval metric, and the same
answers from 1 and 2 processes (FSDP2, prompts padded so both ranks run the same number of forwards)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import arithmetic_rows, read_metrics, torchrun, write_jsonl

from shardtune.config import load_config, validate
from shardtune.errors import ConfigError
from shardtune.trainer import Trainer

N_PROMPTS = 5  # odd: the second of two ranks gets a short slice, filled with a repeated prompt


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("eval")
    train = write_jsonl(d / "train.jsonl", arithmetic_rows(32, seed=1))
    val_rows = arithmetic_rows(8, seed=2)
    val = write_jsonl(d / "val.jsonl", val_rows)
    (d / "my_scores.py").write_text("def score(answer, reference, messages):\n"
                                    "    return {'ref_len': float(len(reference)), 'turns': float(len(messages))}\n")
    args = [f"model.path={tiny_model}", f"data.train_files={train}", f"data.val_files={val}", "data.cache_dir=null",
            "data.num_proc=1", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4", "optim.lr=1e-3",
            "optim.lr_warmup_steps=0", "trainer.total_training_steps=2", "eval.freq=1",
            f"eval.max_samples={N_PROMPTS}", "eval.max_new_tokens=4", "eval.batch_size=2",
            "eval.scorer=my_scores:score", "trainer.progress_bar=false"]
    return d, val_rows, args


def train_one(setup, run_dir, *extra):
    d, _, args = setup
    sys.path.insert(0, str(d))
    try:
        cfg = validate(load_config(None, [*args, f"trainer.default_local_dir={run_dir}", *extra]))
        trainer = Trainer(cfg)
        return trainer, trainer.fit()
    finally:
        sys.path.remove(str(d))


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    trainer, history = train_one(setup, run_dir, "trainer.logger=[jsonl,tensorboard]")
    return trainer, history, run_dir


def table(run_dir, step):
    return [json.loads(line) for line in (run_dir / "eval" / f"step_{step}.jsonl").read_text().splitlines()]


def test_eval_metrics_and_table_each_eval(setup, one_process):
    _, val_rows, _ = setup
    trainer, _, run_dir = one_process
    rows = [r for r in read_metrics(run_dir) if "eval/exact_match" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]  # a baseline before training, then every step
    # the prompts: each validation conversation up to its last assistant turn, whose text is the reference
    refs = [next(m for m in reversed(r["messages"]) if m["role"] == "assistant")["content"] for r in val_rows]
    turns = [len(r["messages"]) - 1 for r in val_rows]
    for r in rows:
        samples = table(run_dir, r["step"])
        assert [s["reference"] for s in samples] == refs[:N_PROMPTS]
        assert r["eval/ref_len"] == pytest.approx(sum(len(x) for x in refs[:N_PROMPTS]) / N_PROMPTS)
        assert r["eval/turns"] == pytest.approx(sum(turns[:N_PROMPTS]) / N_PROMPTS)
        for key in ("exact_match", "contains"):
            assert r[f"eval/{key}"] == pytest.approx(sum(s[key] for s in samples) / N_PROMPTS)
        for s in samples:
            assert s["exact_match"] == float(s["answer"] == s["reference"])
            assert s["contains"] == float(s["reference"] in s["answer"])
    # generation left the training model as it was: no KV cache, the training attention kernel
    model = trainer.engine.model
    assert model.config.use_cache is False
    from shardtune.attention import VARLEN

    assert model.config._attn_implementation == VARLEN  # the packed-row kernel on CPU


def test_table_answers_are_the_checkpoints_answers(setup, one_process):
    """The answers logged at the last step are what `shardtune chat` gets from the saved checkpoint."""
    from shardtune.chat import load_model_for_chat
    from shardtune.evaluate import load_prompts
    from shardtune.generate import Sampling, generate

    trainer, _, run_dir = one_process
    model, tokenizer = load_model_for_chat(str(run_dir / "global_step_2"), "cpu")
    prompts = load_prompts(trainer.cfg)
    answers = generate(model, tokenizer, [p.messages for p in prompts], Sampling(max_new_tokens=4))
    assert answers == [s["answer"] for s in table(run_dir, 2)]


def test_tensorboard_holds_eval_scalars_and_the_table(one_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, run_dir = one_process
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/exact_match")] == [0, 1, 2]
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("eval/samples")]
    assert texts, acc.Tags()


@pytest.mark.slow
def test_two_processes_give_the_same_answers(setup, one_process, tmp_path):
    _, _, args = setup
    d = setup[0]
    run_dir = tmp_path / "run"
    r = torchrun(2, "train", *args, f"trainer.default_local_dir={run_dir}", "trainer.logger=[jsonl]",
                 env={"PYTHONPATH": f"{d}:{__import__('os').environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 0, r.stderr[-3000:]
    _, _, one_dir = one_process
    for step in (0, 2):
        two, one = table(run_dir, step), table(one_dir, step)
        assert len(two) == N_PROMPTS  # the filler prompt's answer is dropped
        assert [s["answer"] for s in two] == [s["answer"] for s in one]
    m1 = {r["step"]: r for r in read_metrics(one_dir)}
    m2 = {r["step"]: r for r in read_metrics(run_dir)}
    for step in (0, 1, 2):
        for key in ("eval/exact_match", "eval/contains", "eval/ref_len"):
            assert m2[step][key] == pytest.approx(m1[step][key], rel=1e-9)


def test_early_stopping_can_watch_an_eval_metric(setup, tmp_path):
    # no eval/exact_match can improve by 2: the first evaluation after the baseline counts as a bad one
    _, history = train_one(setup, tmp_path / "run", "trainer.logger=[jsonl]", "trainer.total_training_steps=4",
                           "trainer.early_stopping_patience=1", "trainer.early_stopping_min_delta=2.0",
                           "trainer.early_stopping_metric=eval/exact_match")
    assert history[-1]["step"] == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stop = [e for e in events if e.get("event") == "early_stop"]
    assert stop and stop[0]["metric"] == "eval/exact_match"
    assert stop[0]["best"] == history[0]["eval/exact_match"]


@pytest.mark.parametrize("overrides, needle", [
    (["eval.freq=2", "data.val_files=[]"], "needs prompts"),
    (["eval.scorer=no_such_module_here:f"], "cannot import"),
    (["eval.scorer=justaname"], "module:function"),
    (["eval.freq=0"], "eval.freq"),
    (["trainer.early_stopping_metric=eval/exact_match", "eval.freq=-1"], "needs the evaluation on"),
    (["trainer.early_stopping_metric=train/loss"], "early_stopping_metric"),
])
def test_bad_eval_settings_are_refused_before_loading(setup, tmp_path, overrides, needle):
    _, _, args = setup
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, [a for a in args if not a.startswith("eval.scorer")]
                             + [f"trainer.default_local_dir={tmp_path}", *overrides]))


def test_plot_draws_the_eval_panel(one_process, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from shardtune.plot import plot_run

    _, _, run_dir = one_process
    drawn = {}
    real_subplots = plt.subplots

    def spy(rows, cols, **kw):
        fig, axes = real_subplots(rows, cols, **kw)
        drawn["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    out = plot_run(str(run_dir), str(tmp_path / "curves.png"))
    assert out.is_file() and out.stat().st_size > 0
    titles = {ax.get_title(): ax for ax in drawn["axes"].flat}
    labels = {line.get_label() for line in titles["evaluation"].get_lines()}
    assert {"eval/exact_match", "eval/contains", "eval/ref_len"} <= labels
