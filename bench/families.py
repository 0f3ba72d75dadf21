"""The model families as a new user meets them: a tiny member of each (shardtune/tiny.py), loaded and
transformed as `shardtune train` does with the default config, then one packed row of three sequences
against each sequence alone (the model's own eager attention) and against right-padded rows.

    python bench/families.py [FAMILY ...]

Prints one line per family: the class, the attention `auto` chose, the largest relative logit difference
packed vs alone, the relative loss difference packed vs padded, or the error the user would see.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from shardtune.config import load_config, validate
from shardtune.model import check_architecture, check_sequence_parallel, load_model
from shardtune.parallel import World
from shardtune.parallelize import parallelize
from shardtune.tiny import MULTIMODAL_FAMILIES, TEXT_FAMILIES, save_tiny_family

LENGTHS = [13, 5, 21]


def build(path: Path, *overrides: str) -> torch.nn.Module:
    cfg = validate(load_config(None, [f"model.path={path}", "data.train_files=unused.jsonl", *overrides]))
    check_sequence_parallel(cfg.model, cfg.sp_size)
    check_architecture(cfg.model)
    return parallelize(load_model(cfg.model), cfg, World())


def loss(model: torch.nn.Module, seqs: list[torch.Tensor], packed: bool) -> tuple[float, list[torch.Tensor]]:
    if packed:
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
        logits = model(input_ids=torch.cat(seqs)[None],
                       position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None],
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS),
                       use_cache=False).logits[0]
        rows = [logits[s:e] for s, e in zip(cu[:-1], cu[1:])]
    else:
        width = max(LENGTHS)
        ids = torch.stack([F.pad(s, (0, width - len(s))) for s in seqs])
        mask = torch.stack([(torch.arange(width) < len(s)).long() for s in seqs])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        rows = [logits[i, :len(s)] for i, s in enumerate(seqs)]
    return sum(F.cross_entropy(r[:-1], s[1:], reduction="sum").item() for r, s in zip(rows, seqs)), rows


def main(families: list[str]) -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 250, (n,), generator=g) for n in LENGTHS]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for family in families:
            try:
                path = save_tiny_family(family, Path(tmp) / family)
                model = build(path)
                packed, rows = loss(model, seqs, packed=True)
                padded, _ = loss(build(path, "model.use_remove_padding=false"), seqs, packed=False)
                attn = model.config.get_text_config()._attn_implementation
                model.set_attn_implementation("eager")
                alone = max(((r - model(input_ids=s[None], use_cache=False).logits[0]).abs().max()
                             / r.abs().max()).item() for r, s in zip(rows, seqs))
                print(f"{family:13s} {type(model).__name__:36s} auto={attn:18s} packed vs alone {alone:.1e}  "
                      f"packed vs padded loss {abs(packed - padded) / padded:.1e}", flush=True)
            except Exception as e:  # the table reports what a user would see
                print(f"{family:13s} fails: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(TEXT_FAMILIES + MULTIMODAL_FAMILIES))
