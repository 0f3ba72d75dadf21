"""`shardtune validate` and `shardtune render`: look at the data the way the trainer will see it, and at the
memory one device will need."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from itertools import islice
from typing import Any

import numpy as np
import torch

from shardtune.batch import supervised_count
from shardtune.checkpoint import check_run_dir
from shardtune.config import Config, Source
from shardtune.data import build
from shardtune.data.chat import IGNORE_INDEX, resolve_chat_template, weights_of
from shardtune.data.dataset import TokenizedDataset, build_source, tokenize_sources
from shardtune.data.formats import detect_format
from shardtune.data.loader import batch_sampler, planned_steps
from shardtune.data.readers import data_files
from shardtune.data.tokenize import tokenize_row
from shardtune.data.video import is_video
from shardtune.data.vision import image_processing, images_of
from shardtune.errors import DataError
from shardtune.memory import GIB, estimate, model_shape, tokens_per_micro_batch
from shardtune.memory_vision import densest_micro_batch_bound, image_token_counts, worst_micro_batch_image_tokens
from shardtune.model import check_token_ids, load_tokenizer

GREEN, RESET = "\033[32m", "\033[0m"


def validate_data(cfg: Config, world_size: int = 1) -> int:
    """Check and report the data; returns the image tokens of the training micro-batch richest in pictures on
    `world_size` processes (what the memory estimate runs through the vision tower)."""
    check_run_dir(cfg.run_dir)
    worst_images = 0
    tokenizer = load_tokenizer(cfg.model)
    data_cfg = cfg.data
    for name, sources in zip(("train", "val"), build.data_sources(cfg)):
        if not sources:
            continue
        if name == "train" and data_cfg.streaming:
            worst_images = validate_stream_head(cfg, sources, tokenizer)
            continue
        ds = tokenize_sources(sources, data_cfg, tokenizer)
        check_token_ids(cfg.model, tokenizer, [ds])
        lengths = ds.lengths
        s = ds.stats
        print(f"{name}: {s.get('rows_read', '?')} rows read, {len(ds)} kept, dropped {s.get('dropped', {})}, "
              f"truncated {s.get('truncated', 0)}; {int(lengths.sum())} tokens ({int(ds.target_counts.sum())} "
              f"supervised); length mean {lengths.mean():.0f} p50 {np.percentile(lengths, 50):.0f} "
              f"p95 {np.percentile(lengths, 95):.0f} max {lengths.max()}"
              + (" [cache hit]" if s.get("cache_hit") else ""))
        for source, data in zip(ds.sources, ds.datasets):
            print_source(source, data, weighted=name == "train" and len(ds.sources) > 1,
                         append_eos=data_cfg.append_eos)
        if name == "train":
            per_epoch = batch_sampler(ds, data_cfg, cfg.trainer.seed).steps_per_epoch
            total = planned_steps(cfg.trainer.total_training_steps, cfg.trainer.total_epochs, per_epoch)
            print(f"train: {per_epoch} steps per epoch, {total} optimizer steps in all")
            per_sample = _image_counts(ds.datasets, tokenizer, data_cfg)
            worst_images = worst_micro_batch_image_tokens(ds, per_sample, cfg, world_size // cfg.sp_size,
                                                          packed=cfg.model.use_remove_padding)
            # one epoch's plan is one shuffle of many: the budget filled at the data's share bounds it from below
            full = round(tokens_per_micro_batch(cfg) * cfg.sp_size * per_sample.sum() / max(int(lengths.sum()), 1))
            if worst_images or full:
                print(f"train: the memory estimate assumes {max(worst_images, full)} image tokens per micro-batch "
                      f"(the richest of one epoch planned on {world_size // cfg.sp_size} data-parallel rank(s): "
                      f"{worst_images}; a full token budget at the data's share of image tokens: {full})")
                worst_images = max(worst_images, full)
    print("config and data OK")
    return worst_images


def _image_counts(datasets: list[TokenizedDataset], tokenizer: Any, data_cfg: Any) -> np.ndarray:
    """Each sample's image and video tokens (zeros for a text model): both run through the vision tower."""
    vision = image_processing(tokenizer, resolve_chat_template(data_cfg.chat_template, tokenizer))
    if vision is None:
        return np.zeros(sum(len(d) for d in datasets), dtype=np.int64)
    tokens = [t for t in (vision.image_token_id, vision.video_token_id) if t is not None]
    return np.concatenate([image_token_counts(d, tokens) for d in datasets])


def validate_stream_head(cfg: Config, sources: list[Source], tokenizer: Any) -> int:
    """Streamed training data is not tokenized ahead: check the head of each streamed source (one shuffle
    buffer's worth of rows) with the same per-source report, in a temporary folder. Returns the image tokens of
    a micro-batch of the heads' samples densest in pictures (the epoch is not known ahead to plan)."""
    data_cfg = cfg.data
    worst_images = 0
    files = [f for source in sources for f in data_files(list(source.paths))]
    print(f"train: streamed (data.streaming=true) from {len(files)} file(s), read and tokenized as it trains"
          + (f"; a mixture of {len(sources)} sources drawn by weight" if len(sources) > 1 else ""))
    for source in sources:
        head = (data_cfg.shuffle_buffer if source.max_samples < 0
                else min(data_cfg.shuffle_buffer, source.max_samples))
        data = build_source(replace(source, max_samples=head, data=replace(source.data, cache_dir=None)), tokenizer,
                            progress=False)
        print(f"  checked the first {data.stats.get('rows_read', '?')} rows of '{source.name}' "
              f"(data.shuffle_buffer={data_cfg.shuffle_buffer})")
        print_source(source, data, weighted=len(sources) > 1, append_eos=data_cfg.append_eos)
        per_sample = _image_counts([data], tokenizer, data_cfg)
        worst_images = max(worst_images, densest_micro_batch_bound(data, per_sample, cfg))
    print(f"train: {cfg.trainer.total_training_steps} optimizer steps (trainer.total_training_steps; a pass's "
          "length is known once it has been read)")
    if worst_images:
        print(f"train: the memory estimate assumes {worst_images} image tokens per micro-batch (a micro-batch of "
              "the heads' samples densest in pictures)")
    return worst_images


def print_source(source: Source, data: TokenizedDataset, weighted: bool, append_eos: str) -> None:
    """Rows, tokens, supervised tokens, drops by reason, a length histogram and the mask audit of one source."""
    s = data.stats
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(s.get("dropped", {}).items()) if v) or "none"
    tokens, supervised = int(data.lengths.sum()), int(data.target_counts.sum())
    print(f"  source '{source.name}'" + (f" (weight {source.weight:.2f})" if weighted else "") +
          f": {s.get('rows_read', '?')} rows read, {s.get('rows_kept', '?')} kept, {len(data)} samples; "
          f"dropped: {dropped}; truncated {s.get('truncated', 0)}" + (" [cache hit]" if s.get("cache_hit") else ""))
    print(f"    {tokens} tokens, {supervised} supervised ({supervised / max(tokens, 1):.1%})")
    if source.data.message_weight_key:
        weight = sum(c.get("trained_weight", 0.0) for c in s.get("mask", {}).values())
        print(f"    message weights (data.message_weight_key='{source.data.message_weight_key}'): mean "
              f"{weight / max(supervised, 1):.3g} per supervised token; the loss is divided by the supervised "
              "token count, whatever the weights")
    for kind in ("image", "video"):
        images, image_tokens, trained = (sum(c.get(k, 0) for c in s.get("mask", {}).values())
                                         for k in (f"{kind}s", f"{kind}_tokens", f"trained_{kind}_tokens"))
        if images:
            print(f"    {images} {kind}s, {image_tokens} {kind} tokens ({image_tokens / max(tokens, 1):.1%} of "
                  f"tokens, {image_tokens / images:.0f} per {kind}, {images / max(len(data), 1):.2f} {kind}s per "
                  f"sample; {trained} of them trained)")
    for line in length_histogram(data.lengths):
        print("    " + line)
    for line in mask_audit(s.get("mask", {}), append_eos):
        print("    " + line)


def length_histogram(lengths: np.ndarray, bins: int = 10, width: int = 30) -> list[str]:
    """Samples per length bin as text bars, in at most `bins` bins of a round width (1, 2 or 5 x 10^k)."""
    top = int(lengths.max())
    step = next(m * 10**k for k in range(20) for m in (1, 2, 5) if m * 10**k * bins > top)
    counts = np.bincount(np.asarray(lengths) // step)
    digits = len(str(len(counts) * step))
    most = int(counts.max())
    return [(f"length {k * step:>{digits}}-{(k + 1) * step - 1:<{digits}} {int(n):>9} "
             + "#" * max(int(n) * width // most, 1 if n else 0)).rstrip() for k, n in enumerate(counts)]


def default_device_memory() -> tuple[float, str]:
    """Bytes to compare the estimate with: the current GPU's memory, else the machine's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def print_memory_estimate(cfg: Config, world_size: int, device_memory_gib: float | None = None,
                          image_tokens: int = 0) -> bool:
    """Print the per-device memory table of `memory.estimate` and whether it fits; returns whether it fits.
    `image_tokens`: those of the micro-batch richest in pictures (validate_data)."""
    available, what = default_device_memory()
    if device_memory_gib is not None:
        available, what = device_memory_gib * GIB, "--device-memory"
    try:
        shape = model_shape(cfg.model)
    except (AttributeError, ValueError) as e:  # an architecture the estimate does not know (no decoder layers...)
        print(f"memory per device: no estimate for this model ({e})")
        return True
    est = estimate(cfg, shape, world_size, image_tokens=image_tokens)
    procs = f"{world_size} processes" if world_size > 1 else "1 process"
    print(f"memory per device (estimate; {procs} on {est.device_type}; {est.tokens} tokens per micro-batch; "
          f"weights {cfg.model.dtype}, compute {est.compute_dtype}):")
    for name, value, note in _memory_rows(cfg, est, world_size):
        print(f"  {name:26s} {value / GIB:8.2f} GiB" + (f"  ({note})" if note and value else ""))
    print(f"  {'total':26s} {est.total / GIB:8.2f} GiB")
    if est.host:
        print(f"  {'on the host (offload)':26s} {est.host / GIB:8.2f} GiB per process")
    if est.host_activations:
        print(f"  {'activations on the host':26s} {est.host_activations / GIB:8.2f} GiB per process "
              "(model.enable_activation_offload)")
    # processes on a CPU share the machine's memory (offloaded state included); each GPU has its own
    shared = est.device_type == "cpu"
    need = (est.total + est.host + est.host_activations) * world_size if shared else est.total
    if shared and world_size > 1:
        what += f", {world_size} processes"
    ok = need <= available
    verdict = (f"yes (headroom {(available - need) / GIB:.2f} GiB)" if ok
               else f"no (short by {(need - available) / GIB:.2f} GiB)")
    print(f"fits in {available / GIB:.2f} GiB ({what}): {verdict}")
    if not ok:
        print("  to fit: " + "; ".join(_remedies(cfg)))
    return ok


def _remedies(cfg: Config) -> list[str]:
    """The switches that shrink the largest terms, in the order a user would try them."""
    model, engine, data = cfg.model, cfg.engine, cfg.data
    out = []
    if not model.enable_gradient_checkpointing:
        out.append("model.enable_gradient_checkpointing=true")
    if model.loss_chunk_size == 0 and not model.use_liger:
        out.append("model.loss_chunk_size=4096")
    out.append("a smaller " + ("data.max_token_len_per_gpu" if data.use_dynamic_bsz
                               else "data.micro_batch_size_per_gpu"))
    if model.lora_rank == 0:
        out.append("model.lora_rank=16 (LoRA)")
    if not (engine.param_offload or engine.optimizer_offload):
        out.append("engine.param_offload=true")
    out.append("more processes (--nproc) to shard the state over")
    return out


def _memory_rows(cfg: Config, est, world_size: int) -> list[tuple[str, float, str]]:
    model = cfg.model
    copies = "FSDP2 all-gather" if world_size > 1 else "bf16 autocast casts"
    activations = f"gradient checkpointing {'on' if model.enable_gradient_checkpointing else 'off'}"
    if model.enable_activation_offload:
        activations += ", offloaded" if est.device_type == "cuda" else ", offload moves nothing on a CPU"
    if est.vision_activations:
        activations += (f"; of it vision tower {est.vision_activations / GIB:.2f} GiB on {est.image_tokens} image "
                        f"tokens, {'trained' if not model.freeze_vision_model else 'frozen'}")
    return [
        ("parameters", est.parameters, "; ".join(["sharded"] * (world_size > 1) + ["4-bit base"] * model.load_in_4bit)),
        ("gradients", est.gradients, "trainable parameters only"),
        ("optimizer state (AdamW)", est.optimizer, "2 per trainable parameter"),
        ("unsharded weight copies", est.working,
         copies + ("; a 4-bit weight de-quantized" if model.load_in_4bit else "")),
        ("activations", est.activations, activations),
        ("logits and loss", est.logits, "Liger fused" if model.use_liger and est.device_type == "cuda" else
         f"chunks of {model.loss_chunk_size}" if model.loss_chunk_size else "full logits"),
        ("runtime overhead", est.runtime, "CUDA context, allocator slack; assumed" if est.device_type == "cuda"
         else "Python, torch, transformers"),
    ]


def render_sample(cfg: Config, index: int, color: str = "auto") -> None:
    """Row `index` of the training data as training sees it: the samples `tokenize_row` makes of it (truncation
    and the bad-row policy included), trained spans marked."""
    tokenizer = load_tokenizer(cfg.model)
    sources = build.data_sources(cfg).train
    found = list(islice(build.rows(sources), index, index + 1)) if index >= 0 else []
    if not found:
        count = sum(1 for _ in build.rows(sources))
        raise DataError(f"--index {index} is not a sample of data.train_files, which holds {count} rows. Fix: "
                        f"pass an --index from 0 to {count - 1}.")
    source, row = found[0]
    source_cfg = source.data
    fmt = source_cfg.format if source_cfg.format != "auto" else detect_format(row, source_cfg)
    template = resolve_chat_template(source_cfg.chat_template, tokenizer)
    result = tokenize_row(row, fmt, tokenizer, source_cfg, template)  # as tokenization does it
    samples, audit = result.samples, result.audit
    vision = image_processing(tokenizer, template) if audit.get("images") or audit.get("videos") else None
    image_token = vision.image_token_id if vision is not None else None
    video_token = vision.video_token_id if vision is not None else None
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    method = next((k.removeprefix("method_") for k in audit if k.startswith("method_")), "none")
    eos_reason = ("data.append_eos=always" if source_cfg.append_eos == "always"
                  else "the template writes no end-of-turn token after the last trained turn")
    for k, tok in enumerate(samples):
        part = f", sample {k + 1} of {len(samples)}" if len(samples) > 1 else ""
        print(f"# {row.path}, row {row.index}{part} (format {fmt}; spans from {method})")
        print(mark_trained(tokenizer, tok.input_ids, tok.labels, use_color, image_token, weights_of(tok),
                           video_token))
        n_trained = supervised_count(np.asarray(tok.labels))
        print(f"\n# {len(tok.input_ids)} tokens, {n_trained} trained" + _media_summary(tok, image_token, video_token)
              + (f"; EOS appended ({eos_reason})" if audit["eos_appended"] and k == len(samples) - 1 else ""))
    dropped = {reason: n for reason, n in result.dropped.items() if reason != "no_trained_tokens"}
    if result.truncated or dropped:
        print(f"# {row.path}, row {row.index}: " + ", ".join(
            [f"{result.truncated} truncated to data.max_length={source_cfg.max_length}"] * bool(result.truncated)
            + [f"{n} dropped ({reason})" for reason, n in sorted(dropped.items())]))
    elif not samples:
        print(f"# {row.path}, row {row.index}: no assistant turn to train")


def _media_summary(tok: Any, image_token: int | None, video_token: int | None) -> str:
    """'; N images, M image tokens, K of them trained' and the same for videos, for the kinds the sample has."""
    out = ""
    for kind, token in (("image", image_token), ("video", video_token)):
        n = sum((kind == "video") == is_video(b) for b in images_of(tok))
        if n:
            flags = [int(lab) != IGNORE_INDEX for t, lab in zip(tok.input_ids, tok.labels) if int(t) == token]
            out += f"; {n} {kind}s, {len(flags)} {kind} tokens, {sum(flags)} of them trained"
    return out


_METHODS = {"method_markers": "generation markers", "method_sentinels": "sentinels",
            "method_assistant_sentinels": "assistant-only sentinels (fallback)",
            "method_search": "text search (fallback)"}


def mask_audit(per_file: dict[str, dict[str, int]], append_eos: str) -> list[str]:
    """One line per data file: what was trained and how the trained spans were found."""
    lines = []
    for path, c in per_file.items():
        get = c.get
        share = get("trained_tokens", 0) / max(1, get("tokens", 0))
        open_turns = get("turns_without_end", 0) - get("closed_by_eos", 0)
        methods = ", ".join(f"{_METHODS[k]} {v}" for k, v in c.items() if k in _METHODS and v)
        lines.append(
            f"mask audit {path}: {get('rows', 0)} rows checked -> {get('samples', 0)} samples"
            + (f" ({get('per_turn_expansions', 0)} from thinking_history=per_turn)"
               if get("per_turn_expansions") else "")
            + f"; {share:.1%} of tokens trained; {get('trained_turns', 0)} trained turns, "
            f"{get('turns_without_end', 0)} without an end-of-turn token in the template's render, "
            f"{get('closed_by_eos', 0)} closed by an appended EOS, {open_turns} left open; EOS appended to "
            f"{get('eos_appended', 0)} samples (data.append_eos={append_eos}); spans from {methods or 'nothing'}")
    return lines


def mark_trained(tokenizer, input_ids, labels, use_color: bool, image_token_id: int | None = None,
                 weights: list[float] | None = None, video_token_id: int | None = None) -> str:
    """The decoded sample with each trained span in green (terminal) or between [[ and ]], followed by its loss
    weight `{weight W}` when the data has weights (data.message_weight_key); each run of image tokens shown as one
    `<image: N tokens>` placeholder (and of video tokens as `<video: N tokens>`)."""
    open_, close = (GREEN, RESET) if use_color else ("[[", "]]")
    weights = [None] * len(labels) if weights is None else [float(w) for w in weights]
    out, run, trained_run, run_weight = [], [], False, None

    def flush() -> None:
        if not run:
            return
        if run[0] == image_token_id:
            text = f"<image: {len(run)} tokens>"
        elif run[0] == video_token_id:
            text = f"<video: {len(run)} tokens>"
        else:
            text = tokenizer.decode(run)
        tag = "" if run_weight is None else f"{{weight {run_weight:g}}}"
        out.append(open_ + text + close + tag if trained_run else text)
        run.clear()

    for tid, label, weight in zip(input_ids, labels, weights):
        trained = label != IGNORE_INDEX
        weight = weight if trained else None
        if run and (trained != trained_run or weight != run_weight
                    or (int(tid) == image_token_id) != (run[0] == image_token_id)
                    or (int(tid) == video_token_id) != (run[0] == video_token_id)):
            flush()
        run.append(int(tid))
        trained_run, run_weight = trained, weight
    flush()
    return "".join(out)
