"""Tokenization throughput (rows/s of conversation_samples: renders, masks, tokens) on long-tailed chats.

    python bench/chat_masks.py [--rows 3000] [--repeat 1]

Prints rows/s for a ChatML template and for a thinking template that keeps reasoning only after the last
user message (every assistant turn carries reasoning), with and without thinking_history=per_turn: per wall
second and per CPU second of the process, the best of `--repeat` passes (on a shared machine the best pass is
the least disturbed one).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from packing import long_tailed_chats

from shardtune.data.chat import MaskOptions, conversation_samples
from shardtune.tiny import byte_tokenizer

THINKING = Path(__file__).parents[1] / "tests" / "fixtures" / "templates" / "qwen3_thinking.jinja"


def rows_per_s(convs: list[list[dict]], tok, options: MaskOptions) -> tuple[float, float]:
    """Rows per wall second and per CPU second of this process (the latter steadier on a shared machine)."""
    conversation_samples(convs[0], tok, options=options)  # compile the template, probe it
    t0, c0 = time.perf_counter(), time.process_time()
    for msgs in convs:
        conversation_samples(msgs, tok, options=options)
    return len(convs) / (time.perf_counter() - t0), len(convs) / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    chats = [r["messages"] for r in long_tailed_chats(args.rows)]
    rng = random.Random(1)
    thinking = [[{**m, "reasoning_content": "let me think " * rng.randint(1, 20)} if m["role"] == "assistant" else m
                 for m in msgs] for msgs in chats]
    chatml = byte_tokenizer()
    qwen3 = byte_tokenizer(THINKING.read_text(), ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>",
                                                  "</think>", "<tool_call>", "</tool_call>"])
    for name, tok, convs, options in (("chatml", chatml, chats, MaskOptions()),
                                      ("thinking", qwen3, thinking, MaskOptions()),
                                      ("thinking per_turn", qwen3, thinking, MaskOptions(thinking_history="per_turn"))):
        runs = [rows_per_s(convs, tok, options) for _ in range(args.repeat)]
        wall, cpu = max(w for w, _ in runs), max(c for _, c in runs)
        print(f"{name:18s} {wall:8.0f} rows/s {cpu:8.0f} rows/CPU-s")


if __name__ == "__main__":
    main()
