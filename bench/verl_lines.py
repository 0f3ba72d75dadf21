"""How many of verl's own SFT command lines run through `shardtune.verl.*`.

The lines are those of verl's repository (volcengine/verl, early 2026): its `examples/sft/**.sh` and the
CI scripts `tests/special_e2e/sft/run_sft.sh` / `run_sft_engine.sh` with the settings its CI workflows and
`test_sft_engine_all.sh` pass them. Each runs as its script writes it after shell expansion, with only the
model (a tiny Qwen2 with 8 heads), the data files (tiny parquet files of the same columns), the step count
and the batch sizes made tiny; processes: 2, or the sequence-parallel size when it is larger (1 where the
line says one GPU). A line counts as run when it exits 0 having trained its steps.

    python bench/verl_lines.py [--only SUBSTRING] [--keep DIR] [--file LINES.json]

Prints a markdown table and the totals per entry point. `--file` runs another list instead, e.g. the verl
users' lines of bench/verl_user_lines.json (a JSON list of {source, module, args, nproc}; module is
`fsdp_sft_trainer`, `sft_trainer` or `sft_trainer_ray`, args as the shell passes them with the paths written
{model}, {gsm8k}, {sft}, {retool}, {pr}, {mt}, {ckpt}, {remote}). Those lines are made tiny the same way
(`tiny()`: batch sizes and the step count); each runs in its own directory, so a line that names no
`trainer.default_local_dir` writes under it as verl would under its working directory.
bench/verl_091_lines.json holds the lines of verl 0.9.1's examples/sft/**.sh (2026-08), the same way.

A line's result is `ran`, `refused: another backend` (the one message naming the backend it selects and
the keys to drop), `refused` (any other clear refusal) or `failed` (anything else: a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEGACY, ENGINE = "shardtune.verl.fsdp_sft_trainer", "shardtune.verl.sft_trainer"
RAY = "shardtune.verl.sft_trainer_ray"  # started with python; it launches torchrun itself
TINY_STEPS = ["trainer.total_training_steps=2"]


@dataclass
class Line:
    source: str
    module: str
    args: list[str]
    nproc: int = 2
    after: str = ""  # continues in the run directory of this earlier line (verl's CI resume step)


# what tiny() sets on a users' line: the tiny data has 32 rows, and 2 steps show that it trains
TINY_VALUES = {"data.train_batch_size": "8", "data.micro_batch_size": "2", "data.micro_batch_size_per_gpu": "2",
               "trainer.total_training_steps": "2"}


def tiny(args: list[str]) -> list[str]:
    """A users' line with TINY_VALUES in place of its own (its `+`/`++` prefixes kept), and the step count
    appended where the line names none."""
    out, seen = [], set()
    for arg in args:
        key, eq, _ = arg.partition("=")
        bare = key.lstrip("+")
        if eq and bare in TINY_VALUES:
            seen.add(bare)
            arg = f"{key}={TINY_VALUES[bare]}"
        out.append(arg)
    return out + ([] if "trainer.total_training_steps" in seen else [f"trainer.total_training_steps={TINY_VALUES['trainer.total_training_steps']}"])


def load_lines(path: Path) -> list[Line]:
    modules = {"fsdp_sft_trainer": LEGACY, "sft_trainer": ENGINE, "sft_trainer_ray": RAY}
    return [Line(x["source"], modules[x["module"]], tiny(x["args"]), x.get("nproc", 2))
            for x in json.loads(path.read_text())]


def run_sft(**env) -> list[str]:
    """tests/special_e2e/sft/run_sft.sh (fsdp_sft_trainer), variables as the e2e_sft workflow sets them."""
    sp, liger, lora = env.get("SP_SIZE", "1"), env.get("LIGER", "False"), env.get("LORA_RANK", "0")
    return ["data.train_files={gsm8k}", "data.val_files={gsm8k}", "data.prompt_key=extra_info",
            "data.response_key=extra_info", "data.prompt_dict_keys=['question']", "data.response_dict_keys=['answer']",
            "data.multiturn.enable=False", "data.multiturn.messages_key=messages", "optim.lr=1e-4",
            "data.micro_batch_size_per_gpu=2", "model.strategy=fsdp", "model.partial_pretrain={model}",
            f"model.lora_rank={lora}", "model.lora_alpha=16", "model.target_modules=all-linear",
            f"model.use_liger={liger}", f"ulysses_sequence_parallel_size={sp}",
            f"use_remove_padding={env.get('RM_PAD', 'True')}", "trainer.default_local_dir={ckpt}",
            "trainer.project_name=verl-test", "trainer.experiment_name=qwen2.5-0.5b-instruct-sft-minimal",
            f"trainer.total_training_steps={env.get('TOTAL_TRAIN_STEP', '1')}", "trainer.save_freq=1",
            "trainer.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "trainer.max_ckpt_to_keep=1",
            f"trainer.resume_mode={env.get('RESUME_MODE', 'disable')}", "trainer.logger=['console']",
            "data.train_batch_size=8"]


def engine_config(backend="fsdp", sp="1", fsdp="1", strategy="fsdp", tp="1", pp="1", vpp="null", cp="1") -> list[str]:
    """The FSDP_/VEOMNI_/MEGATRON_ENGINE_CONFIG blocks of verl's engine scripts."""
    optim = [f"engine={backend}", f"optim={backend}", "optim.lr=1e-5", "optim.lr_warmup_steps_ratio=0.2",
             "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]", "optim.clip_grad=1.0"]
    return optim + {
        "fsdp": ["optim.min_lr_ratio=0.1", "optim.lr_scheduler_type=cosine",
                 f"engine.ulysses_sequence_parallel_size={sp}", f"engine.strategy={strategy}",
                 f"engine.fsdp_size={fsdp}"],
        "veomni": ["optim.lr_min=1e-6", "optim.lr_scheduler_type=cosine", f"engine.ulysses_parallel_size={sp}",
                   f"engine.data_parallel_size={fsdp}"],
        "megatron": ["optim.lr_warmup_init=0", "optim.lr_decay_style=cosine", "optim.min_lr=1e-6",
                     f"engine.tensor_model_parallel_size={tp}", f"engine.pipeline_model_parallel_size={pp}",
                     f"engine.virtual_pipeline_model_parallel_size={vpp}", f"engine.context_parallel_size={cp}",
                     "engine.use_mbridge=True"],
    }[backend]


def run_sft_engine(pad="no_padding", rmpad="True", **engine) -> list[str]:
    """tests/special_e2e/sft/run_sft_engine.sh (sft_trainer), variables as test_sft_engine_all.sh sets them."""
    backend = engine.get("backend", "fsdp")
    return ["data.train_files={sft}", "data.val_files={sft}", "data.train_batch_size=8", f"data.pad_mode={pad}",
            "data.truncation=error", "data.use_dynamic_bsz=True", "data.max_token_len_per_gpu=2048",
            "data.messages_key=messages", "model.path={model}", f"model.use_remove_padding={rmpad}",
            *engine_config(**engine), "trainer.test_freq=after_each_epoch", "trainer.save_freq=-1",
            "trainer.logger=['console','file']", "trainer.project_name=verl_sft_test",
            f"trainer.experiment_name=gsm8k-{backend}", "trainer.total_epochs=2", "trainer.total_training_steps=2",
            "trainer.default_local_dir={ckpt}", "trainer.resume_mode=disable"]


def retool(sp: str, offload: str | None) -> list[str]:
    """examples/sft/multiturn/run_qwen*_sp*.sh (fsdp_sft_trainer)."""
    off = [f"model.fsdp_config.cpu_offload={offload}", f"model.fsdp_config.offload_params={offload}"] if offload else []
    return ["data.max_length=16384", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2",
            "data.train_files={retool}", "data.val_files={retool}", "data.multiturn.enable=true",
            "data.multiturn.messages_key=messages", "data.multiturn.tools_key=tools", "model.partial_pretrain={model}",
            "model.trust_remote_code=true", *off, "optim.lr=1e-6", "trainer.default_local_dir={ckpt}",
            "trainer.project_name=retool-multiturn-sft", "trainer.experiment_name=retool-multiturn-sft-sp",
            "trainer.logger=['console','wandb']", "trainer.total_epochs=12", "trainer.default_hdfs_dir=null",
            f"ulysses_sequence_parallel_size={sp}", "use_remove_padding=true", *TINY_STEPS]


def gsm8k_example(name: str, prompt: list[str], micro: str, extra: list[str]) -> list[str]:
    """examples/sft/gsm8k/run_*.sh (fsdp_sft_trainer)."""
    return ["data.train_files={gsm8k}", "data.val_files={gsm8k}", *prompt, micro, "model.partial_pretrain={model}",
            "trainer.default_local_dir={ckpt}", "trainer.project_name=gsm8k-sft", f"trainer.experiment_name={name}",
            "data.train_batch_size=8", *extra, *TINY_STEPS]


EXTRA_INFO = ["data.prompt_key=extra_info", "data.response_key=extra_info", "data.prompt_dict_keys=['question']",
              "+data.response_dict_keys=['answer']"]
LORA = ["model.lora_rank=32", "model.lora_alpha=16", "model.target_modules=all-linear"]

LINES = [
    Line("examples/sft/gsm8k/run_deepseek_6b7.sh (hdfs:// -> file://)", LEGACY, gsm8k_example(
        "deepseek", ["data.prompt_key=question", "data.response_key=answer"], "data.micro_batch_size=2",
        ["trainer.default_hdfs_dir={remote}", "trainer.total_epochs=4", "trainer.logger=['console','tracking']"])),
    Line("examples/sft/gsm8k/run_gemma_2b.sh", LEGACY, gsm8k_example(
        "gemma-2b", ["data.prompt_key=prompt", "data.response_key=extra_info", "+data.prompt_dict_keys=['content']",
                     "+data.response_dict_keys=['answer']"], "data.micro_batch_size=2",
        ["trainer.total_epochs=3", "trainer.logger=['console','wandb']"])),
    Line("examples/sft/gsm8k/run_gemma_7b.sh", LEGACY, gsm8k_example(
        "gemma-7b", EXTRA_INFO[:2] + ["data.prompt_dict_keys=['question']", "+data.response_dict_keys=['answer']"],
        "data.micro_batch_size_per_gpu=2", ["trainer.total_epochs=4", "trainer.logger=['console','wandb']"])),
    Line("examples/sft/gsm8k/run_gemma3.sh", LEGACY, gsm8k_example(
        "gemma3", EXTRA_INFO, "data.micro_batch_size_per_gpu=2",
        ["model.fsdp_config.wrap_policy.transformer_layer_cls_to_wrap=[Qwen2DecoderLayer]", "trainer.total_epochs=4",
         "trainer.logger=['console','wandb']", "trainer.default_hdfs_dir=null"])),
    Line("examples/sft/gsm8k/run_qwen_05.sh", LEGACY, gsm8k_example(
        "qwen-0.5b", EXTRA_INFO, "data.micro_batch_size_per_gpu=2",
        ["trainer.total_epochs=2", "trainer.logger=['console']", "trainer.save_steps=5", "trainer.max_ckpt_to_keep=2",
         "trainer.default_hdfs_dir=null"])),
    Line("examples/sft/gsm8k/run_qwen_05_peft.sh", LEGACY, gsm8k_example(
        "peft", ["data.prompt_key=extra_info", "data.response_key=extra_info", "optim.lr=1e-4",
                 "data.prompt_dict_keys=['question']", "+data.response_dict_keys=['answer']"],
        "data.micro_batch_size_per_gpu=2",
        ["trainer.logger=['console']", "trainer.total_epochs=1", "trainer.default_hdfs_dir=null", *LORA])),
    Line("examples/sft/gsm8k/run_qwen_05_peft_sp2_npu.sh", LEGACY, gsm8k_example(
        "peft-sp2", ["data.prompt_key=extra_info", "data.response_key=extra_info", "optim.lr=1e-4",
                     "data.prompt_dict_keys=['question']", "+data.response_dict_keys=['answer']"],
        "data.micro_batch_size_per_gpu=2",
        ["trainer.logger=['console']", "trainer.total_epochs=2", "trainer.default_hdfs_dir=null", *LORA,
         "model.strategy=fsdp", "ulysses_sequence_parallel_size=2", "use_remove_padding=true"])),
    Line("examples/sft/gsm8k/run_qwen_05_speculator.sh", LEGACY, gsm8k_example(
        "speculator", EXTRA_INFO, "data.micro_batch_size_per_gpu=1",
        ["model.fsdp_config.model_dtype=bf16", "+model.speculator.n_predict=3", "+model.speculator.method=sum_lstm",
         "+model.use_remove_padding=false", "trainer.logger=console", "trainer.total_epochs=1"])),
    Line("examples/sft/geo3k/run_qwen_05_sp2.sh", LEGACY, gsm8k_example(
        "geo3k", ["data.prompt_key=messages", "data.response_key=response", "data.image_key=images", "optim.lr=1e-4",
                  "data.prompt_dict_keys=['question']", "+data.response_dict_keys=['answer']"],
        "data.micro_batch_size=2", ["trainer.logger=['console']", "trainer.default_hdfs_dir=null",
                                    "ulysses_sequence_parallel_size=2", "use_remove_padding=true"])),
    Line("examples/sft/geo3k/run_qwen2_5-7b_geo3k.sh", LEGACY, [
        "algorithm.adv_estimator=sft", "data.train_files={gsm8k}", "data.val_files={gsm8k}", "data.train_batch_size=8",
        "data.max_prompt_length=1024", "data.max_response_length=2048", "data.filter_overlong_prompts=True",
        "data.truncation=error", "data.image_key=images", "model.name_or_path={model}", "model.torch_dtype=float16",
        "model.device_map=auto", "model.attn_implementation=sdpa", "model.trust_remote_code=True",
        "optimizer.lr=1e-6", "model.use_remove_padding=True", "model.enable_gradient_checkpointing=True",
        "model.fsdp_config.param_offload=False", "model.fsdp_config.optimizer_offload=False", *LORA[:2],
        "model.lora_target_modules=all-linear", "trainer.default_local_dir={ckpt}", "trainer.project_name=geo3k-sft",
        "trainer.experiment_name=geo3k", "trainer.logger=['console','wandb']", "trainer.n_gpus_per_node=2",
        "trainer.nnodes=1", "+trainer.save_freq=1", "+trainer.test_freq=1", "trainer.total_epochs=3", *TINY_STEPS]),
    Line("examples/sft/multiturn/run_qwen2.5_32b_sp8.sh (+ _mb)", LEGACY, retool("8", "true"), nproc=8),
    Line("examples/sft/multiturn/run_qwen2.5_7b_sp4.sh (+ _mb)", LEGACY, retool("4", "false"), nproc=4),
    Line("examples/sft/multiturn/run_qwen3_4b_sp4.sh (+ run_qwen_4b_sp4_mb.sh)", LEGACY, retool("4", None), nproc=4),
    Line("CI run_sft.sh (rmpad)", LEGACY, run_sft()),
    Line("CI run_sft.sh RM_PAD=False", LEGACY, run_sft(RM_PAD="False")),
    Line("CI run_sft.sh SP_SIZE=2", LEGACY, run_sft(SP_SIZE="2")),
    Line("CI run_sft.sh SP_SIZE=2 LIGER=True", LEGACY, run_sft(SP_SIZE="2", LIGER="True")),
    Line("CI run_sft.sh LORA_RANK=32", LEGACY, run_sft(LORA_RANK="32")),
    Line("CI run_sft.sh LORA_RANK=32 RESUME_MODE=auto TOTAL_TRAIN_STEP=2", LEGACY,
         run_sft(LORA_RANK="32", RESUME_MODE="auto", TOTAL_TRAIN_STEP="2"), after="CI run_sft.sh LORA_RANK=32"),
    Line("CI engine golden: fsdp SP1 FSDP1 1 GPU", ENGINE, run_sft_engine(fsdp="1"), nproc=1),
    Line("CI engine fsdp SP2 FSDP2 no_padding", ENGINE, run_sft_engine(sp="2", fsdp="2")),
    Line("CI engine fsdp SP1 FSDP-1 no_padding USE_REMOVE_PADDING=False", ENGINE,
         run_sft_engine(fsdp="-1", rmpad="False")),
    Line("CI engine fsdp2 SP2 FSDP2", ENGINE, run_sft_engine(sp="2", fsdp="2", strategy="fsdp2")),
    Line("CI engine fsdp SP4 FSDP4 (older matrix)", ENGINE, run_sft_engine(sp="4", fsdp="4"), nproc=4),
    Line("CI engine fsdp2 SP1 FSDP-1 (older matrix)", ENGINE, run_sft_engine(fsdp="-1", strategy="fsdp2")),
    Line("CI engine veomni SP2 FSDP4", ENGINE, run_sft_engine(backend="veomni", sp="2", fsdp="4")),
    Line("CI engine megatron TP2 PP2 VPP2 CP2", ENGINE, run_sft_engine(backend="megatron", tp="2", pp="2", vpp="2",
                                                                       cp="2")),
    Line("CI engine megatron TP2 PP2 VPP2 CP2 mode=ray", RAY, ["trainer.nnodes=1", "trainer.n_gpus_per_node=2",
                                                              *run_sft_engine(backend="megatron", tp="2", pp="2",
                                                                              vpp="2", cp="2")]),
    Line("CI engine fsdp SP2 FSDP2 mode=ray (not in verl's matrix)", RAY, ["trainer.nnodes=1",
                                                                          "trainer.n_gpus_per_node=2",
                                                                          *run_sft_engine(sp="2", fsdp="2")]),
    Line("examples/sft/vlm/run_qwen3_vl_2b.sh (fsdp)", ENGINE, [
        "data.train_files={sft}", "data.train_batch_size=8", "data.max_length=2048", "data.pad_mode=no_padding",
        "data.truncation=error", "data.use_dynamic_bsz=True", "data.max_token_len_per_gpu=65536", "model.path={model}",
        "model.use_remove_padding=True", "engine=fsdp", "optim=fsdp", "optim.lr=2e-5", "optim.lr_warmup_steps_ratio=0.01",
        "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]", "optim.clip_grad=1.0", "optim.min_lr_ratio=0.1",
        "optim.warmup_style=cosine", "engine.ulysses_sequence_parallel_size=2", "engine.strategy=fsdp2",
        "engine.fsdp_size=-1", "trainer.test_freq=-1", "trainer.save_freq=4000", "trainer.logger=['console','wandb']",
        "trainer.project_name=verl_sft_test", "trainer.experiment_name=pokemon", "trainer.total_epochs=10",
        "trainer.default_local_dir={ckpt}", "trainer.resume_mode=auto", "trainer.max_ckpt_to_keep=5",
        "checkpoint.save_contents=[model,optimizer,extra]", *TINY_STEPS]),
    Line("examples/sft/gsm8k/run_qwen_05_speculator_engine.sh", ENGINE, [
        "data.train_files={sft}", "data.val_files={sft}", "data.micro_batch_size_per_gpu=1",
        "++data.ignore_input_ids_mismatch=true", "++data.enable_thinking_key=null", "model.path={model}",
        "model.use_remove_padding=false", "model.freeze_base_model=true",
        "++model.speculator_adapter.fqn=verl.trainer.speculators.lstm_adapter.LSTMSpeculatorAdapter",
        "++model.speculator.n_predict=3", "++model.speculator.method=sum_lstm", "engine.strategy=fsdp2",
        "trainer.default_local_dir={ckpt}", "trainer.project_name=gsm8k-sft", "trainer.experiment_name=speculator",
        "trainer.logger=console", "trainer.total_epochs=1", "data.train_batch_size=8", *TINY_STEPS]),
    Line("examples/sft/gsm8k/run_mimo_megatron_mtp.sh", ENGINE, [
        "data.train_files={sft}", "data.val_files={sft}", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2",
        "data.pad_mode=no_padding", "data.truncation=error", "data.max_length=1024", "data.use_dynamic_bsz=True",
        "data.max_token_len_per_gpu=2048", "data.messages_key=messages", "data.num_workers=0", "model.path={model}",
        "model.use_remove_padding=False", "model.trust_remote_code=True", "model.mtp.enable=True", "engine=megatron",
        "optim=megatron", "optim.lr=1e-5", "optim.min_lr=1e-6", "optim.lr_warmup_steps=10", "optim.weight_decay=0.1",
        "optim.betas=[0.9,0.95]", "optim.clip_grad=1.0", "optim.lr_warmup_init=0", "optim.lr_decay_style=cosine",
        "engine.override_transformer_config.recompute_method=uniform",
        "engine.override_transformer_config.recompute_granularity=full",
        "engine.override_transformer_config.recompute_num_layers=1", "engine.use_dist_checkpointing=False",
        "engine.tensor_model_parallel_size=1", "engine.pipeline_model_parallel_size=1",
        "engine.virtual_pipeline_model_parallel_size=null", "engine.context_parallel_size=1", "engine.use_mbridge=True",
        "trainer.test_freq=after_each_epoch", "trainer.save_freq=-1", "trainer.logger=['console']",
        "trainer.project_name=verl_sft_test", "trainer.experiment_name=mimo", "trainer.total_epochs=1",
        "trainer.default_local_dir={ckpt}", "trainer.resume_mode=disable", *TINY_STEPS]),
    Line("examples/sft/gsm8k/run_qwen3_8b_megatron.sh", ENGINE, [
        "data.train_files={sft}", "data.val_files={sft}", "data.train_batch_size=8", "data.max_prompt_length=1024",
        "data.max_response_length=1024", "data.pad_mode=left_right", "data.truncation=error",
        "data.use_dynamic_bsz=True", "data.max_token_len_per_gpu=8192", "data.messages_key=messages",
        "model.path={model}", *engine_config(backend="megatron", tp="2", pp="2")[:-1],
        "trainer.test_freq=after_each_epoch", "trainer.default_local_dir={ckpt}", *TINY_STEPS]),
]


def make_inputs(work: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import arithmetic_rows, write_parquet

    from shardtune.tiny import save_tiny_model

    model = save_tiny_model(work / "model", seed=0, heads=8, kv_heads=2)
    gsm = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}], "ability": "math",
            "question": f"What is {i}+{i}?", "answer": f"#### {2 * i}", "messages": [], "response": "",
            "extra_info": {"split": "train", "index": i, "question": f"What is {i}+{i}?", "answer": f"#### {2 * i}",
                           "solution": f"{i}+{i}={2 * i}. #### {2 * i}"}}
           for i in range(32)]
    sft = arithmetic_rows(32, seed=1)
    retool = [{**r, "tools": None} for r in arithmetic_rows(32, seed=2, multi_turn=True)]
    # users' shapes: string prompt/response columns under several names; messages under two names, with
    # verl's optional per-row tools and enable_thinking columns
    pr = [{"prompt": f"What is {i}*3?", "response": f"{3 * i}", "question": f"What is {i}*3?",
           "formatted_answer": f"The answer is {3 * i}.", "answer": f"{3 * i}"} for i in range(32)]
    mt = [{"messages": r["messages"], "multiturn": r["messages"], "tools": None, "enable_thinking": i % 2 == 0}
          for i, r in enumerate(arithmetic_rows(32, seed=3))]
    return {"model": str(model), "gsm8k": str(write_parquet(work / "gsm8k.parquet", gsm)),
            "sft": str(write_parquet(work / "sft.parquet", sft)),
            "retool": str(write_parquet(work / "retool.parquet", retool)),
            "pr": str(write_parquet(work / "pr.parquet", pr)), "mt": str(write_parquet(work / "mt.parquet", mt))}


def fill(arg: str, values: dict[str, str]) -> str:
    """The placeholders ({model}, {ckpt}, ...) filled in; other braces (Hydra dicts, ${...}) kept."""
    for name, value in values.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def run_line(line: Line, inputs: dict[str, str], work: Path, index: int) -> tuple[str, str]:
    run_dir = work / f"run{[x.source for x in LINES].index(line.after) if line.after else index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {**inputs, "ckpt": str(run_dir), "remote": f"file://{work / f'remote{index}'}"}
    args = [fill(a, values) for a in line.args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_DATASETS_CACHE": str(work / "cache")}
    launch = [] if line.module == RAY else ["-m", "torch.distributed.run", "--standalone",
                                            f"--nproc-per-node={line.nproc}"]
    cmd = [sys.executable, *launch, "-m", line.module, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=run_dir)
    found = sorted(run_dir.rglob("metrics.jsonl"), key=lambda f: f.stat().st_mtime)  # the run dir, or below it
    events = [json.loads(x) for x in found[-1].read_text().splitlines()] if found else []
    steps = [s for s in events if "event" not in s]
    if r.returncode == 0 and steps:
        resumed = [e["step"] for e in events if e.get("event") == "resume"]
        return "ran", (f"steps {steps[0]['step']}-{steps[-1]['step']}" + (f" (resumed at {resumed[-1]})" if resumed else "")
                       + f", loss {steps[0]['train/loss']:.3f} -> {steps[-1]['train/loss']:.3f}")
    errors = [x.split("error", 1)[1].lstrip(" (rank0):") for x in r.stderr.splitlines() if "shardtune: error" in x]
    detail = errors[0] if errors else (r.stderr.strip().splitlines() or ["no output"])[-1]
    kind = ("refused: another backend" if "selects verl's" in detail else "refused") if errors else "failed"
    return kind, detail if len(detail) < 240 else detail[:240] + " ..."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--keep", default=None)
    ap.add_argument("--file", default=None, help="a JSON list of lines to run instead of verl's own")
    args = ap.parse_args()
    lines = load_lines(Path(args.file)) if args.file else LINES
    work = Path(args.keep or tempfile.mkdtemp(prefix="verl_lines_"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(work)
    rows, totals = [], {}
    for i, line in enumerate(lines):
        if args.only not in line.source:
            continue
        t0 = time.time()
        result, detail = run_line(line, inputs, work, i)
        entry = line.module.rsplit(".", 1)[1]
        counts = totals.setdefault(entry, {})
        counts[result] = counts.get(result, 0) + 1
        rows.append(f"| {line.source} | `{entry}` | {line.nproc} | {result} | {detail} | {time.time() - t0:.0f} s |")
        print(rows[-1], flush=True)
    print("\n| line | entry point | processes | result | detail | time |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    for entry, counts in totals.items():
        print(f"{entry}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {sum(counts.values())})")


if __name__ == "__main__":
    main()
