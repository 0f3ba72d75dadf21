"""`shardtune validate` and `shardtune render`: look at the data the way the trainer will see it."""

from __future__ import annotations

import sys
from itertools import islice

import numpy as np

from shardtune.config import Config
from shardtune.data.batching import GlobalBatchSampler
from shardtune.data.chat import IGNORE_INDEX, tokenize_conversation
from shardtune.data.dataset import build_dataset, resolve_chat_template, truncate
from shardtune.data.formats import detect_format, to_conversation
from shardtune.data.readers import expand_paths, read_rows
from shardtune.errors import DataError
from shardtune.model import load_tokenizer

GREEN, RESET = "\033[32m", "\033[0m"


def validate_data(cfg: Config) -> None:
    tokenizer = load_tokenizer(cfg.model)
    d = cfg.data
    for name, files, max_samples in (("train", d.train_files, d.train_max_samples), ("val", d.val_files, d.val_max_samples)):
        if not files:
            continue
        ds = build_dataset(files, d, tokenizer, max_samples)
        lengths = ds.lengths
        trained = int((np.asarray(ds.labels) != IGNORE_INDEX).sum())
        s = ds.stats
        print(f"{name}: {s.get('rows_read', '?')} rows read, {len(ds)} kept, dropped {s.get('dropped', {})}, "
              f"truncated {s.get('truncated', 0)}; {int(lengths.sum())} tokens ({trained} trained); length "
              f"mean {lengths.mean():.0f} p50 {np.percentile(lengths, 50):.0f} p95 {np.percentile(lengths, 95):.0f} "
              f"max {lengths.max()}" + (" [cache hit]" if s.get("cache_hit") else ""))
        if name == "train":
            sampler = GlobalBatchSampler(len(ds), d.train_batch_size, cfg.trainer.seed, d.shuffle, d.drop_last)
            t = cfg.trainer
            total = t.total_training_steps or t.total_epochs * sampler.steps_per_epoch
            print(f"train: {sampler.steps_per_epoch} steps per epoch, {total} optimizer steps in all")
    print("config and data OK")


def render_sample(cfg: Config, index: int, color: str = "auto") -> None:
    tokenizer = load_tokenizer(cfg.model)
    d = cfg.data
    rows = list(islice(read_rows(expand_paths(d.train_files)), index, index + 1))
    if not rows:
        raise DataError(f"--index {index} is past the end of data.train_files.")
    row = rows[0]
    fmt = d.format if d.format != "auto" else detect_format(row, d)
    conv = to_conversation(row, fmt, d)
    template = resolve_chat_template(d.chat_template, tokenizer)
    tok = tokenize_conversation(conv.messages, tokenizer, conv.tools, chat_template=template,
                                **{**d.apply_chat_template_kwargs, **conv.template_kwargs})
    tok, reason = truncate(tok, d.max_length, d.truncation, row)
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    print(f"# {row.path}, row {row.index} (format {fmt})" + (f" [{reason}]" if reason else ""))
    print(mark_trained(tokenizer, tok.input_ids, tok.labels, use_color))
    n_trained = sum(label != IGNORE_INDEX for label in tok.labels)
    print(f"\n# {len(tok.input_ids)} tokens, {n_trained} trained")


def mark_trained(tokenizer, input_ids, labels, use_color: bool) -> str:
    """The decoded sample with each trained span in green (terminal) or between [[ and ]]."""
    open_, close = (GREEN, RESET) if use_color else ("[[", "]]")
    out, run, trained_run = [], [], False
    for tid, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if run and trained != trained_run:
            text = tokenizer.decode(run)
            out.append(open_ + text + close if trained_run else text)
            run = []
        run.append(int(tid))
        trained_run = trained
    if run:
        text = tokenizer.decode(run)
        out.append(open_ + text + close if trained_run else text)
    return "".join(out)
