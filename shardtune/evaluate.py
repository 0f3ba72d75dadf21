"""Generation-based evaluation during training (the `eval` section): what the model answers, scored.

Prompts are rows of any data format (`eval.files`, else `data.val_files`), read with the training data's
readers and format keys: the conversation up to its last assistant turn is the prompt, that turn's text is
the reference. The model answers greedily through its chat template (`eval.max_new_tokens`), and every
answer is scored by `exact_match` (equal after stripping whitespace), `contains` (the reference appears in
the answer) and, with `eval.scorer=module:function`, the user's function, called as
`function(answer=..., reference=..., messages=...)` and returning a number or a mapping of names to numbers.
The metrics are the means over all prompts, logged as `eval/<name>`.

Under FSDP2 every rank takes an equal slice of the prompts (the last one repeated to fill a short slice;
its answers are dropped), generates with synchronised stopping, scores its own answers, and the rows are
gathered on every rank, so all ranks see the same metrics (early stopping may watch them).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardtune import parallel
from shardtune.config import Config, resolve_sources
from shardtune.data.formats import detect_format, to_conversation
from shardtune.data.readers import expand_paths, read_rows
from shardtune.errors import ConfigError, DataError
from shardtune.generate import Sampling


@dataclass(frozen=True)
class EvalPrompt:
    messages: list[dict[str, Any]]  # the conversation before the reference turn
    reference: str
    where: str  # file and row, for the table


def exact_match(answer: str, reference: str, **_: Any) -> float:
    return float(answer.strip() == reference.strip())


def contains(answer: str, reference: str, **_: Any) -> float:
    return float(bool(reference.strip()) and reference.strip() in answer)


def load_scorer(spec: str | None) -> Callable[..., Any] | None:
    """`module:function` -> the function (importable from the working directory or PYTHONPATH)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"eval.scorer='{spec}' must be module:function, e.g. my_scores:score.")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        raise ConfigError(f"eval.scorer='{spec}': cannot import {module} ({e}). Fix: put the module on "
                          "PYTHONPATH or in the working directory.") from None
    if not callable(fn):
        raise ConfigError(f"eval.scorer='{spec}': {module} has no function {name}.")
    return fn


def _text(content: Any) -> str:
    if isinstance(content, list):  # text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def load_prompts(cfg: Config) -> list[EvalPrompt]:
    """The first `eval.max_samples` prompts of `eval.files` (else `data.val_files`)."""
    where = "eval.files" if cfg.eval.files else "data.val_files"
    limit = cfg.eval.max_samples
    prompts: list[EvalPrompt] = []
    for source in resolve_sources(cfg.eval.files or cfg.data.val_files, cfg.data, -1, where):
        data = source.data
        for row in read_rows(expand_paths(list(source.paths)), skip_bad=data.on_bad_row == "skip"):
            if 0 <= limit <= len(prompts):
                return prompts
            if row.error:
                continue
            fmt = data.format if data.format != "auto" else detect_format(row, data)
            messages = [{k: v for k, v in m.items() if k != "train"} for m in to_conversation(row, fmt, data).messages]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None or last == 0:
                raise DataError(f"{row.path}, row {row.index}: {where} rows need an assistant turn after the prompt "
                                "(its text is the reference the answer is scored against).")
            prompts.append(EvalPrompt(messages[:last], _text(messages[last].get("content")),
                                      f"{row.path}:{row.index}"))
    if not prompts:
        raise DataError(f"{where} holds no prompts for the evaluation.")
    return prompts


def evaluate(engine: Any, prompts: list[EvalPrompt], cfg: Config, world: parallel.World,
             scorer: Callable[..., Any] | None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(`eval/*` means, the per-sample table) on every rank."""
    per_rank = math.ceil(len(prompts) / world.world_size)
    mine = list(range(world.rank * per_rank, min(len(prompts), (world.rank + 1) * per_rank)))
    # every rank runs as many generate calls as the others: a short slice is filled with a repeated prompt
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    answers = engine.generate([prompts[i].messages for i in padded], Sampling(cfg.eval.max_new_tokens),
                              cfg.eval.batch_size)
    rows = [_row(i, prompts[i], answer, scorer) for i, answer in zip(mine, answers)]
    rows = sorted((r for part in parallel.all_gather_objects(rows, world) for r in part), key=lambda r: r["index"])
    names = [k for k in rows[0] if k not in ("index", "where", "prompt", "reference", "answer")]
    metrics = {f"eval/{k}": sum(r[k] for r in rows) / len(rows) for k in names}
    return metrics, rows


def _row(index: int, prompt: EvalPrompt, answer: str, scorer: Callable[..., Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"index": index, "where": prompt.where, "prompt": _text(prompt.messages[-1].get("content")),
                           "reference": prompt.reference, "answer": answer}
    row["exact_match"] = exact_match(answer, prompt.reference)
    row["contains"] = contains(answer, prompt.reference)
    if scorer is not None:
        got = scorer(answer=answer, reference=prompt.reference, messages=prompt.messages)
        scores = got if isinstance(got, dict) else {getattr(scorer, "__name__", "score"): got}
        for name, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"eval.scorer returned {name}={value!r} for {prompt.where}; scores must be numbers.")
            row[name] = float(value)
    return row
