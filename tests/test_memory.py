"""The memory estimate of `shardtune validate`: its terms against counts derived from the architecture, its
activation formula against what autograd saves, and its total against the peak of a real run on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_rows, run_cli, write_jsonl, write_parquet

from shardtune.config import load_config
from shardtune.memory import GIB, estimate, layer_bytes_per_token, model_shape, shape_of

MEMORY_PEAK = Path(__file__).parent / "scripts" / "memory_peak.py"


def config(model_path, *overrides):
    return load_config(None, [f"model.path={model_path}", "data.train_files=unused.jsonl", *overrides])


def hf_config(model_path):
    from shardtune.model import load_hf_config

    return load_hf_config(config(model_path).model)


def qwen2_params(c) -> int:
    """Parameters of an untied Qwen2 from its config: embedding, layers (q/k/v with biases, o, gate/up/down,
    two norms), final norm, head."""
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return 2 * c.vocab_size * h + c.num_hidden_layers * layer + h


def lora_params(c, rank: int) -> int:
    """Adapters A (rank x in) and B (out x rank) on every Linear of every layer (`all-linear` skips lm_head)."""
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q, k, v, o, gate, up, down
    return c.num_hidden_layers * sum(rank * (n_in + n_out) for n_in, n_out in shapes)


def test_state_terms_are_the_architecture_counts(tiny_model):
    n = qwen2_params(hf_config(tiny_model))
    cfg = config(tiny_model)
    est = estimate(cfg, model_shape(cfg.model), world_size=1, device_type="cpu")
    assert (est.parameters, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32; AdamW: m and v
    assert est.working == 0 and est.host == 0
    cfg = config(tiny_model, "model.dtype=bf16")
    est = estimate(cfg, model_shape(cfg.model), world_size=1, device_type="cpu")
    assert (est.parameters, est.gradients, est.optimizer) == (2 * n, 2 * n, 4 * n)


def test_lora_has_gradients_and_optimizer_state_for_the_adapters_only(tiny_model):
    c = hf_config(tiny_model)
    n, a = qwen2_params(c), lora_params(c, rank=8)
    cfg = config(tiny_model, "model.lora_rank=8", "model.dtype=bf16")
    est = estimate(cfg, model_shape(cfg.model), world_size=1, device_type="cpu")
    # peft keeps the adapters in fp32 over bf16 base weights
    assert (est.parameters, est.gradients, est.optimizer) == (2 * n + 4 * a, 4 * a, 8 * a)


def test_state_is_sharded_over_the_shard_group_and_offload_moves_it_to_the_host(tiny_model):
    n = qwen2_params(hf_config(tiny_model))
    cfg = config(tiny_model)
    shape = model_shape(cfg.model)
    one = estimate(cfg, shape, world_size=1, device_type="cuda")
    four = estimate(cfg, shape, world_size=4, device_type="cuda")
    assert (four.parameters, four.gradients, four.optimizer) == (n, n, 2 * n)  # 4n bytes over 4 ranks
    assert four.working > 0  # all-gathered layers under FSDP2
    hybrid = estimate(config(tiny_model, "engine.fsdp_size=2"), shape, world_size=4, device_type="cuda")
    assert hybrid.parameters == 2 * n  # sharded over groups of 2, replicated across them
    once = estimate(config(tiny_model, "engine.reduce_grads_every_micro_batch=false"), shape, world_size=4,
                    device_type="cuda")
    assert once.working - four.working == 4 * n  # every layer's unsharded fp32 gradient while accumulating
    off = estimate(config(tiny_model, "engine.param_offload=true"), shape, world_size=2, device_type="cuda")
    assert (off.parameters, off.gradients, off.optimizer) == (0, 0, 0)
    assert off.host == 2 * n * (1 + 1 + 2)  # parameters, gradients, m and v, per rank
    assert off.activations == estimate(cfg, shape, world_size=2, device_type="cuda").activations
    assert off.total < one.total


def test_checkpointing_and_chunked_loss_shrink_their_terms(tiny_model):
    cfg = config(tiny_model, "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=8192")
    shape = dataclasses.replace(model_shape(cfg.model), vocab=151936)  # a large vocabulary, as Qwen's
    plain = estimate(cfg, shape, device_type="cpu")
    assert plain.tokens == 8192 and plain.logits == 3 * 4 * 8192 * 151936
    ckpt = estimate(config(tiny_model, "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=8192",
                           "model.enable_gradient_checkpointing=true"), shape, device_type="cpu")
    layer = layer_bytes_per_token(shape, 4, 4, False) * 8192
    # without checkpointing every layer's activations; with it one layer's and every layer's input
    assert plain.activations - ckpt.activations == (shape.layers - 1) * layer - shape.layers * 8192 * shape.hidden * 4
    assert ckpt.activations < plain.activations
    chunked = estimate(config(tiny_model, "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=8192",
                              "model.loss_chunk_size=1024"), shape, device_type="cpu")
    assert chunked.logits < plain.logits / 4
    lora = estimate(config(tiny_model, "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=8192",
                           "model.loss_chunk_size=1024", "model.lora_rank=4"),
                    dataclasses.replace(shape, head_trainable=False), device_type="cpu")
    assert chunked.logits - lora.logits == 2 * 4 * 151936 * shape.hidden  # a frozen head has no weight gradient


def test_tokens_per_micro_batch(tiny_model):
    shape = model_shape(config(tiny_model).model)
    fixed = estimate(config(tiny_model, "data.micro_batch_size_per_gpu=4", "data.max_length=512"), shape)
    assert fixed.tokens == 2048
    sp = estimate(config(tiny_model, "data.micro_batch_size_per_gpu=4", "data.max_length=512",
                         "engine.ulysses_sequence_parallel_size=2"), shape, world_size=2)
    assert sp.tokens == 1024  # each rank of a sequence-parallel pair holds half the row


def saved_bytes(model, tokens: int, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one forward of a packed row (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    half = tokens // 2  # two sequences packed in one row, positions restarting
    cu = torch.tensor([0, half, tokens])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.model(input_ids=torch.randint(0, 250, (1, tokens)), position_ids=torch.arange(half).repeat(2)[None],
                    cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=half, max_length_k=half, use_cache=False)
    return sum(storages.values())


@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16_autocast"])
def test_layer_activations_are_what_autograd_saves(mode):
    """The per-layer formula, against the saved tensors of shardtune's packed-row path on a real Qwen2."""
    from transformers import AutoModelForCausalLM

    from shardtune import attention
    from shardtune.tiny import tiny_qwen2_config

    tokens, dtype = 256, torch.bfloat16 if mode == "bf16" else torch.float32
    models = [AutoModelForCausalLM.from_config(
        tiny_qwen2_config(259, hidden=96, layers=layers, heads=6, kv_heads=2, intermediate=224),
        dtype=dtype, attn_implementation=attention.register()) for layers in (1, 3)]
    autocast = mode == "bf16_autocast"
    per_layer = (saved_bytes(models[1], tokens, autocast) - saved_bytes(models[0], tokens, autocast)) / 2
    shape = shape_of(models[0])
    act, residual = (4, 4) if mode == "fp32" else (2, 2) if mode == "bf16" else (2, 4)
    expected = layer_bytes_per_token(shape, act, residual, autocast) * tokens
    if autocast:  # autograd also keeps the bf16 casts of the layer's Linear weights (the working-copy term)
        expected += 2 * sum(m.weight.numel() for m in models[0].model.layers[0].modules()
                            if isinstance(m, torch.nn.Linear))
    assert per_layer == pytest.approx(expected, rel=0.02)


@pytest.fixture(scope="module")
def long_rows_model(tmp_path_factory):
    """A model and data where activations dominate: hidden 512, 4 layers; 8 samples of ~1000 tokens."""
    from shardtune.tiny import save_tiny_model

    d = tmp_path_factory.mktemp("memory")
    model = save_tiny_model(d / "model", seed=0, hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1024)
    reply = ("abcdefghij " * 100)[:1000]
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]}
            for i in range(8)]
    return model, write_jsonl(d / "train.jsonl", rows), d


@pytest.fixture(scope="module")
def long_rows_moe_model(long_rows_model):
    """A Qwen3-MoE of the same size (8 experts of width 512, 2 per token) on the same data."""
    import transformers

    from shardtune.tiny import byte_tokenizer

    _, data, d = long_rows_model
    tok = byte_tokenizer()
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=1024, moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d / "moe")
    tok.save_pretrained(d / "moe")
    return d / "moe", data, d


MEASURED_MODES = {
    "plain": [], "checkpointing": ["model.enable_gradient_checkpointing=true"],
    # QLoRA: 4-bit base, LoRA adapters; and activation offloading, which on the CPU moves nothing
    "qlora": ["model.lora_rank=16", "model.load_in_4bit=true"],
    "offload": ["model.enable_activation_offload=true", "model.enable_gradient_checkpointing=true"],
}


def measured_peak(overrides: list[str]) -> float:
    """Bytes `shardtune train OVERRIDES` adds to the resident set at its peak, in a fresh process (glibc told to
    return large blocks at once, so resident memory follows the live tensors)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, str(MEMORY_PEAK), *overrides], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["added_gib"] * GIB


@pytest.mark.slow
@pytest.mark.parametrize(("which", "mode"), [*(("dense", m) for m in MEASURED_MODES), ("moe", "plain"),
                                             ("moe", "checkpointing")])
def test_estimate_is_within_30_percent_of_the_measured_peak(request, which, mode):
    """Two fp32 AdamW steps of one packed ~4096-token micro-batch in a fresh process: the peak resident memory
    above the runtime (measured just before the model is built) against the estimate less its runtime line.
    glibc's malloc is told to return large blocks at once (a fixed mmap threshold), so resident memory
    follows the live tensors, as CUDA's max_memory_allocated does on a GPU."""
    model, data, d = request.getfixturevalue("long_rows_model" if which == "dense" else "long_rows_moe_model")
    overrides = [f"model.path={model}", f"data.train_files={data}", "data.cache_dir=null", "data.num_proc=1",
                 "data.max_length=1024", "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=4096",
                 "data.train_batch_size=4", "data.shuffle=false", "trainer.total_training_steps=2",
                 "trainer.logger=[jsonl]", "trainer.progress_bar=false", *MEASURED_MODES[mode],
                 f"trainer.default_local_dir={d}/run_{which}_{mode}"]
    measured = measured_peak(overrides)
    cfg = load_config(None, overrides)
    est = estimate(cfg, model_shape(cfg.model), world_size=1, device_type="cpu")
    predicted = est.total - est.runtime + est.host_activations
    print(f"{which} {mode}: estimated {predicted / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB")
    assert predicted == pytest.approx(measured, rel=0.30)


def test_validate_prints_the_table_and_whether_it_fits(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8))
    args = ["validate", f"model.path={tiny_model}", f"data.train_files={data}", "data.cache_dir=null",
            "data.num_proc=1"]
    ok = run_cli(*args, "--device-memory", "80")
    assert ok.returncode == 0, ok.stderr
    assert "config and data OK" in ok.stdout
    for row in ("parameters", "gradients", "optimizer state", "activations", "logits and loss", "runtime overhead",
                "total"):
        assert f"  {row}" in ok.stdout
    assert "fits in 80.00 GiB (--device-memory): yes" in ok.stdout
    small = run_cli(*args, "engine.param_offload=true", "--nproc", "2", "--device-memory", "0.001")
    assert small.returncode == 0, small.stderr
    assert "2 processes" in small.stdout and "on the host (offload)" in small.stdout
    assert ": no (short by" in small.stdout and "to fit: model.enable_gradient_checkpointing=true" in small.stdout
    bad = run_cli(*args, "--device-memory", "0")
    assert bad.returncode == 2 and "--device-memory must be > 0" in bad.stderr


@pytest.fixture(scope="module")
def picture_rows(tmp_path_factory):
    """A Qwen2-VL whose vision tower dominates (192 wide, 2 blocks; 256 image tokens = 1024 patches a picture)
    and rows of one 448 x 448 picture and a short exchange each."""
    from test_images import png

    from shardtune.tiny import save_tiny_vlm

    d = tmp_path_factory.mktemp("vision_memory")
    model = save_tiny_vlm(d / "model", vision_width=192, max_image_tokens=256)
    rows = [{"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                          {"role": "assistant", "content": f"Picture {i} shows colours."}],
             "images": [{"bytes": png(i, 448, 448), "path": f"p{i}.png"}]} for i in range(8)]
    return model, write_parquet(d / "train.parquet", rows), d


def picture_overrides(model, data, d, *extra):
    return [f"model.path={model}", f"data.train_files=[{data}]", "data.cache_dir=null", "data.num_proc=1",
            "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=1200", "data.train_batch_size=4",
            "data.shuffle=false", "trainer.logger=[jsonl]", "trainer.progress_bar=false", *extra]


def validated_image_tokens(stdout: str) -> int:
    """The image tokens `shardtune validate` planned for the micro-batch richest in pictures."""
    return int(stdout.split("the memory estimate assumes ")[1].split(" image tokens")[0])


def planned_richest(stdout: str) -> int:
    """The image tokens of the richest micro-batch of the epoch validate planned."""
    return int(stdout.split("data-parallel rank(s): ")[1].split(";")[0])


@pytest.fixture(scope="module")
def worst_image_tokens(picture_rows):
    """`shardtune validate` on the picture rows: it prints the vision tower's line; the richest micro-batch's
    image tokens."""
    model, data, d = picture_rows
    validated = run_cli("validate", *picture_overrides(model, data, d, "model.freeze_vision_model=false"))
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "of it vision tower" in validated.stdout and "image tokens, trained" in validated.stdout
    return validated_image_tokens(validated.stdout)


@pytest.mark.parametrize("tower", ["trained", pytest.param("frozen", marks=pytest.mark.slow)])
def test_estimate_with_pictures_is_within_30_percent_of_the_measured_peak(picture_rows, worst_image_tokens, tower):
    """As for text: two AdamW steps of micro-batches of ~4 pictures (~4000 patches), the tower trained or frozen.
    Without the vision term the estimate would be a sixth of the measured peak."""
    model, data, d = picture_rows
    overrides = picture_overrides(model, data, d, "trainer.total_training_steps=2",
                                  f"model.freeze_vision_model={tower == 'frozen'}",
                                  f"trainer.default_local_dir={d}/run_{tower}")
    measured = measured_peak(overrides)
    cfg = load_config(None, overrides)
    est = estimate(cfg, model_shape(cfg.model), world_size=1, device_type="cpu", image_tokens=worst_image_tokens)
    predicted = est.total - est.runtime
    print(f"{tower}: estimated {predicted / GIB:.3f} GiB (vision {est.vision_activations / GIB:.3f}), "
          f"measured {measured / GIB:.3f} GiB")
    assert est.vision_activations > (predicted - est.vision_activations)  # the pictures dominate this run
    assert predicted == pytest.approx(measured, rel=0.30)


def test_the_vision_term_grows_with_the_pictures_and_shrinks_with_freezing_and_checkpointing(picture_rows):
    model, data, d = picture_rows

    def vision(image_tokens, *extra):
        cfg = load_config(None, picture_overrides(model, data, d, *extra))
        return estimate(cfg, model_shape(cfg.model), device_type="cpu", image_tokens=image_tokens).vision_activations

    assert vision(0, "model.freeze_vision_model=false") == 0
    trained = vision(800, "model.freeze_vision_model=false")
    assert vision(400, "model.freeze_vision_model=false") == pytest.approx(trained / 2, rel=0.01)
    checkpointed = vision(800, "model.freeze_vision_model=false", "model.enable_gradient_checkpointing=true")
    frozen = vision(800)
    assert frozen < checkpointed < trained


@pytest.mark.parametrize("dp,streaming", [(2, False), (2, True)])
def test_validate_plans_the_micro_batch_richest_in_pictures_as_the_loader_builds_it(tmp_path, dp, streaming):
    """Rows of zero to three pictures with text rows between: the image tokens validate hands the estimate
    are the most that any rank's collated micro-batch of the epoch holds (counted on the loader's own
    micro-batches), more than the data's average share of the token budget would say. A stream (whose head
    here holds every row) gets a bound no real micro-batch exceeds."""
    from test_images import png

    from shardtune.data import build
    from shardtune.data.loader import RankLayout, StepLoader
    from shardtune.data.vision import pixels_for
    from shardtune.model import load_tokenizer
    from shardtune.tiny import save_tiny_vlm

    model = save_tiny_vlm(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": "<image>" * (i % 4) + f"Picture {i}?" + " words" * (i % 5)},
                          {"role": "assistant", "content": f"Picture {i} shows {'dots ' * (i % 3)}colours."}],
             "images": [{"bytes": png(7 * i + j, 28 * (2 + j), 56), "path": f"p{i}_{j}.png"} for j in range(i % 4)]}
            for i in range(24)]
    data = write_parquet(tmp_path / "train.parquet", rows)
    overrides = picture_overrides(model, data, tmp_path, "data.max_token_len_per_gpu=256", "data.max_length=256",
                                  "data.train_batch_size=8",
                                  "data.shuffle=true", f"data.streaming={streaming}", "trainer.total_training_steps=3")
    validated = run_cli("validate", "--nproc", str(dp), *overrides)
    assert validated.returncode == 0, validated.stderr[-3000:]
    worst = validated_image_tokens(validated.stdout) if streaming else planned_richest(validated.stdout)

    cfg = load_config(None, overrides)
    tok = load_tokenizer(cfg.model)
    image_id = json.loads((model / "config.json").read_text())["image_token_id"]
    batches = build.train_batches(build.data_sources(cfg).train, cfg, tok, progress=False)
    counts, tokens = [], 0
    for rank in range(dp):
        loader = StepLoader(batches, cfg.data, RankLayout(rank, dp), packed=True, pad_id=tok.pad_token_id,
                            pixels=pixels_for(tok))
        for drawn in batches:  # one pass
            counts += [int((mb.input_ids == image_id).sum()) for mb in loader.micro_batches(drawn.lengths,
                                                                                              drawn.sample)[1]]
            tokens += int(drawn.lengths.sum()) if rank == 0 else 0
            if drawn.ends_epoch:
                break
    assert (worst >= max(counts) if streaming else worst == max(counts)) and max(counts) > 0
    # every sample sits in one micro-batch of one rank: the counts add up to the data's image tokens
    assert worst > sum(counts) / tokens * cfg.data.max_token_len_per_gpu


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_vision_shape_reads_patches_per_image_token_from_the_config(family, tmp_path):
    """Qwen-VL merges spatial_merge_size^2 patches into a token; Gemma 3 pools (image_size / patch)^2 patches
    into mm_tokens_per_image tokens."""
    from shardtune.model import load_hf_config
    from shardtune.tiny import save_tiny_vlm

    cfg = config(save_tiny_vlm(tmp_path / family, family=family))
    c, v = load_hf_config(cfg.model), model_shape(cfg.model).vision
    vc = c.vision_config
    per_token = (vc.spatial_merge_size ** 2 if family != "gemma3"
                 else (vc.image_size // vc.patch_size) ** 2 // c.mm_tokens_per_image)
    assert (v.patches_per_token, v.depth, v.hidden, v.trained) == (
        per_token, getattr(vc, "depth", None) or vc.num_hidden_layers, vc.hidden_size, False)
    assert v.gated == (family == "qwen2_5_vl")  # Qwen2.5-VL's tower has a SiLU-gated MLP


def test_gemma4_vision_shape_counts_the_patches_its_image_processor_makes_per_token(tmp_path):
    """Gemma 4 pools k x k patches into a token: the picture's real (unpadded) patches from its own image
    processor are its tokens times patches_per_token; its tower's MLP is gated (gate and up projections)."""
    import io

    from PIL import Image
    from test_images import png
    from transformers import AutoImageProcessor

    from shardtune.tiny import save_tiny_vlm

    folder = save_tiny_vlm(tmp_path / "gemma4", family="gemma4")
    v = model_shape(config(folder).model).vision
    out = AutoImageProcessor.from_pretrained(folder)(images=[Image.open(io.BytesIO(png(1, 60, 40))).convert("RGB")],
                                                     return_tensors="pt")
    real_patches = int((out["image_position_ids"][0, :, 0] >= 0).sum())
    assert real_patches == int(out["num_soft_tokens_per_image"][0]) * v.patches_per_token
    assert v.pixels_per_patch == out["pixel_values"].shape[-1] and v.gated
