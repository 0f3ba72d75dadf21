"""Loss options against plain references: optim.loss_type=dft (each token's cross-entropy scaled by its
detached probability) by hand on a tiny model, through the chunked loss head, and on 2 processes."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import arithmetic_rows, read_metrics, torchrun, write_jsonl

from shardtune.batch import IGNORE_INDEX
from shardtune.config import load_config, validate
from shardtune.errors import ConfigError
from shardtune.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss_options")
    return write_jsonl(d / "train.jsonl", arithmetic_rows(24, seed=7))


def overrides(tiny_model, data, run_dir, *extra):
    return [f"model.path={tiny_model}", f"data.train_files={data}", "data.cache_dir=null", "data.num_proc=1",
            "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "optim.lr=2e-3", "optim.lr_warmup_steps=0",
            "trainer.total_training_steps=3", f"trainer.default_local_dir={run_dir}", "trainer.logger=[jsonl]",
            "trainer.progress_bar=false", *extra]


def trainer_for(tiny_model, data, run_dir, *extra):
    return Trainer(validate(load_config(None, overrides(tiny_model, data, run_dir, *extra))))


def hand_dft_step(trainer):
    """The first step's DFT loss and gradient norm, the textbook way: one unpadded sequence at a time through
    a plain transformers model, sum of CE_i * exp(-CE_i) (the factor detached) over the step's supervised
    tokens, divided by their number."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(trainer.cfg.model.path, dtype=torch.float32, attn_implementation="eager")
    indices = trainer.loader.batches.sampler.batch(0, 0)
    total, count = 0.0, 0
    for i in indices:
        ids, labels = (torch.as_tensor(x.astype("int64"))[None] for x in trainer.train_data.data[i][:2])
        logits = ref(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != IGNORE_INDEX
        ce = F.cross_entropy(logits[keep], target[keep], reduction="none")
        total = total + (ce * torch.exp(-ce).detach()).sum()
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    return loss.item(), norm.item()


@pytest.mark.parametrize("chunk", [0, 5])
def test_dft_first_step_equals_the_hand_computation(tiny_model, data, tmp_path, chunk):
    trainer = trainer_for(tiny_model, data, tmp_path / "run", "optim.loss_type=dft", f"model.loss_chunk_size={chunk}")
    want_loss, want_norm = hand_dft_step(trainer)
    history = trainer.fit()
    assert math.isclose(history[0]["train/loss"], want_loss, rel_tol=1e-5)
    assert math.isclose(history[0]["train/grad_norm"], want_norm, rel_tol=1e-5)


def test_dft_differs_from_ce_and_the_chunked_head_agrees_over_steps(tiny_model, data, tmp_path):
    runs = {}
    for name, extra in {"ce": [], "dft": ["optim.loss_type=dft"],
                        "dft_chunked": ["optim.loss_type=dft", "model.loss_chunk_size=7"]}.items():
        runs[name] = trainer_for(tiny_model, data, tmp_path / name, *extra).fit()
    for a, b in zip(runs["dft"], runs["dft_chunked"]):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5)
        assert math.isclose(a["train/grad_norm"], b["train/grad_norm"], rel_tol=1e-5)
    # each DFT token loss is CE * p with p < 1: smaller than plain cross-entropy at the same weights
    assert runs["dft"][0]["train/loss"] < runs["ce"][0]["train/loss"]


@pytest.mark.slow
def test_dft_two_processes_equal_one(tiny_model, data, tmp_path):
    one = trainer_for(tiny_model, data, tmp_path / "one", "optim.loss_type=dft").fit()
    r = torchrun(2, "train", *overrides(tiny_model, data, tmp_path / "two", "optim.loss_type=dft"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    assert [s["step"] for s in two] == [s["step"] for s in one]
    for a, b in zip(one, two):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["train/grad_norm"], b["train/grad_norm"], rel_tol=1e-5), (a, b)


def test_dft_with_liger_is_refused(tiny_model, data, tmp_path):
    with pytest.raises(ConfigError, match="loss_type=dft"):
        validate(load_config(None, overrides(tiny_model, data, tmp_path, "optim.loss_type=dft",
                                             "model.use_liger=true")))


NEFT = 5.0


def neftune_noise(seed: int, step: int, ids: list[int], hidden: int) -> torch.Tensor:
    """The definition, written out: a sequence's [L, hidden] noise is U(-1, 1) from a generator seeded with
    63 bits of blake2b over (seed, step, its token ids) as little-endian int64, times NEFT / sqrt(L * hidden)."""
    digest = hashlib.blake2b(b"".join(int(v).to_bytes(8, "little", signed=True) for v in [seed, step, *ids]),
                             digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)
    return (torch.rand((len(ids), hidden), generator=gen) * 2 - 1) * NEFT / math.sqrt(len(ids) * hidden)


@pytest.mark.parametrize("packed", [True, False])
def test_neftune_steps_equal_the_hand_computation(tiny_model, data, tmp_path, packed):
    """Three steps, packed and padded: the engine's loss and gradient norm equal a plain transformers model fed,
    one unpadded sample at a time, its embeddings plus that sample's noise drawn from the definition."""
    from transformers import AutoModelForCausalLM

    trainer = trainer_for(tiny_model, data, tmp_path / "run", f"model.neftune_noise_alpha={NEFT}",
                          f"model.use_remove_padding={str(packed).lower()}")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager")
    hidden, seed = ref.config.hidden_size, trainer.cfg.trainer.seed
    batches = iter(trainer.loader)
    for step in range(3):
        ref.load_state_dict(trainer.engine.model.state_dict())
        ref.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        for i in trainer.loader.batches.sampler.batch(0, step):
            ids, labels = (torch.as_tensor(x.astype("int64")) for x in trainer.train_data.data[i][:2])
            emb = ref.get_input_embeddings()(ids) + neftune_noise(seed, step, ids.tolist(), hidden)
            logits = ref(inputs_embeds=emb[None]).logits[0, :-1]
            total = total + F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((labels[1:] != IGNORE_INDEX).sum())
        loss = total / count
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
        got = trainer.train_step(next(batches))
        assert math.isclose(got["train/loss"], loss.item(), rel_tol=1e-5), (step, got["train/loss"], loss.item())
        assert math.isclose(got["train/grad_norm"], norm.item(), rel_tol=1e-5), (step, got, norm.item())


def test_neftune_resumed_step_draws_the_uninterrupted_noise(tiny_model, data, tmp_path):
    """The step the noise is drawn for is the restored schedule's position: step 3 resumed from step 2's
    checkpoint trains what the uninterrupted run's step 3 did."""
    neft = f"model.neftune_noise_alpha={NEFT}"
    full = trainer_for(tiny_model, data, tmp_path / "full", neft, "trainer.save_freq=2").fit()
    resumed = trainer_for(tiny_model, data, tmp_path / "resumed", neft, "trainer.resume_mode=resume_path",
                          f"trainer.resume_from_path={tmp_path / 'full' / 'global_step_2'}").fit()
    assert [x["step"] for x in resumed] == [3]
    assert math.isclose(resumed[0]["train/loss"], full[2]["train/loss"], rel_tol=1e-5)
    assert math.isclose(resumed[0]["train/grad_norm"], full[2]["train/grad_norm"], rel_tol=1e-5)


def test_neftune_is_off_outside_training(tiny_model, data, tmp_path):
    from shardtune.neftune import sequences

    trainer = trainer_for(tiny_model, data, tmp_path / "run", f"model.neftune_noise_alpha={NEFT}")
    plain = trainer_for(tiny_model, data, tmp_path / "plain")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert [(r, i.tolist()) for r, i in sequences(ids, pos, None)] == [(0, [0, 1, 2]), (0, [3, 4]), (0, [5])]
    noisy, clean = trainer.engine.model, plain.engine.model
    with torch.no_grad():
        noisy.eval()
        clean.eval()
        assert torch.equal(noisy(input_ids=ids, position_ids=pos).logits, clean(input_ids=ids, position_ids=pos).logits)
        noisy.train()
        assert not torch.allclose(noisy(input_ids=ids, position_ids=pos).logits,
                                  clean(input_ids=ids, position_ids=pos).logits)
    # generation (the evaluation's and chat's path) runs in eval mode: the same answers as without NEFTune
    prompts = [[{"role": "user", "content": "What is 1+2?"}]]
    from shardtune.generate import Sampling

    assert trainer.engine.generate(prompts, Sampling(max_new_tokens=5), 1) == \
        plain.engine.generate(prompts, Sampling(max_new_tokens=5), 1)
    assert noisy.training  # and the training mode is back


@pytest.mark.parametrize("extra, needle", [
    (["model.neftune_noise_alpha=-1"], "neftune_noise_alpha must be >= 0"),
    (["model.neftune_noise_alpha=5", "engine.ulysses_sequence_parallel_size=2"], "sequence-parallel"),
])
def test_bad_loss_options_are_refused(tiny_model, data, tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, overrides(tiny_model, data, tmp_path, *extra)))
