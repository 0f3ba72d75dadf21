"""`shardtune chat MODEL`: talk to a checkpoint or an exported model through its own chat template.

MODEL is a `global_step_N` checkpoint (any world size, LoRA adapters merged on load, the same loading as
`shardtune export`) or a Hugging Face folder. Without `--prompt`/`--prompts` it is an interactive terminal
chat: tokens are printed as they are generated, the history is kept turn by turn, `/reset` clears it and
`/exit` leaves. `--prompt TEXT` answers one prompt; `--prompts FILE.jsonl` answers each line (`{"prompt":
...}` or `{"messages": [...]}`, other fields kept) and prints it back as a JSON line with `answer` added.
`--compare OTHER` answers with a second model too (`answer_compare`; interactive: one after the other).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import AutoConfig, AutoTokenizer, TextStreamer

from shardtune.checkpoint import is_complete
from shardtune.errors import ShardtuneError
from shardtune.generate import Sampling, generate


def load_model_for_chat(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint folder or a Hugging Face model folder, ready for generation."""
    folder = Path(path)
    if is_complete(folder):
        from shardtune.export import check_checkpoint, load_checkpoint_model

        check_checkpoint(folder)
        model, lora = load_checkpoint_model(folder)
        if lora:
            model = model.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(folder / "huggingface")
    elif (folder / "config.json").is_file():
        from shardtune.model import auto_class

        # a vision-language export loads as its own class (tower included), as its checkpoint was trained
        model = auto_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=dtype,
                                                                              use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        raise ShardtuneError(f"'{path}' is neither a complete shardtune checkpoint (global_step_N) nor a Hugging "
                             "Face model folder (config.json + *.safetensors). Fix: pass one of those; a LoRA "
                             "adapter folder can be merged first with `shardtune export CHECKPOINT --out DIR`.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ShardtuneError(f"The tokenizer of '{path}' has no chat template, so prompts cannot be rendered as "
                             "the model was trained on them.")
    return model.to(device=device, dtype=dtype).eval(), tokenizer


class Chatter:
    """One model's conversation: the history, and answers to new user turns."""

    def __init__(self, name: str, model: Any, tokenizer: Any, sampling: Sampling, system: str | None):
        self.name, self.model, self.tokenizer, self.sampling, self.system = name, model, tokenizer, sampling, system
        self.reset()

    def reset(self) -> None:
        self.history: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages of a prompts-file row: its `messages`, or its `prompt` as a user turn (after the system
        prompt when one is given and the row has none)."""
        if isinstance(row.get("messages"), list):
            msgs = list(row["messages"])
        elif isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError('a row needs "prompt" (a string) or "messages" (a list of {role, content})')
        if self.system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": self.system}, *msgs]
        return msgs

    def answer(self, conversations: list[list[dict[str, Any]]], batch_size: int = 16) -> list[str]:
        return generate(self.model, self.tokenizer, conversations, self.sampling, batch_size=batch_size)

    def say(self, text: str, out: TextIO) -> str:
        """A new user turn: the answer streams to `out` as it is generated and joins the history."""
        self.history.append({"role": "user", "content": text})
        streamer = _Streamer(self.tokenizer, out)
        reply = generate(self.model, self.tokenizer, [self.history], self.sampling, streamer=streamer)[0]
        self.history.append({"role": "assistant", "content": reply})
        return reply


class _Streamer(TextStreamer):
    """transformers' TextStreamer (decodes whole words as tokens arrive), writing to `out`."""

    def __init__(self, tokenizer: Any, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.out, flush=True)


def answer_rows(rows: list[dict[str, Any]], chatters: list[Chatter], where: str, batch_size: int) -> list[dict]:
    """Each row with `answer` (and `answer_compare` for the second model) added."""
    out = [dict(r) for r in rows]
    for k, chatter in enumerate(chatters):
        convs = []
        for i, row in enumerate(rows):
            try:
                convs.append(chatter.conversation(row))
            except ValueError as e:
                raise ShardtuneError(f"{where}, line {i + 1}: {e}.") from None
        for row, answer in zip(out, chatter.answer(convs, batch_size)):
            row["answer" if k == 0 else "answer_compare"] = answer
    return out


def read_prompts(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise ShardtuneError(f"--prompts {path}: no such file.")
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ShardtuneError(f"{path}, line {n}: not JSON ({e.msg}). Fix: one JSON object per line.") from None
        if not isinstance(row, dict):
            raise ShardtuneError(f'{path}, line {n}: not a JSON object. Fix: {{"prompt": "..."}} per line.')
        rows.append(row)
    return rows


def interactive(chatters: list[Chatter], stdin: TextIO, out: TextIO) -> None:
    print("shardtune chat: type a message; /reset clears the history, /exit leaves.", file=out, flush=True)
    while True:
        print("> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            for c in chatters:
                c.reset()
            print("(history cleared)", file=out, flush=True)
            continue
        for c in chatters:
            if len(chatters) > 1:
                print(f"[{c.name}] ", end="", file=out, flush=True)
            c.say(text, out)


def run_chat(model: str, compare: str | None = None, prompt: str | None = None, prompts: str | None = None,
             system: str | None = None, sampling: Sampling | None = None, device: str | None = None,
             dtype: str = "fp32", batch_size: int = 16, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    from shardtune.model import DTYPES

    sampling = sampling or Sampling()
    if prompt is not None and prompts is not None:
        raise ShardtuneError("--prompt and --prompts exclude each other. Fix: pass one of them.")
    if sampling.max_new_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise ShardtuneError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1].")
    rows = read_prompts(prompts) if prompts is not None else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)  # sampled answers repeat from run to run
    names = [model] + ([compare] if compare else [])
    chatters = [Chatter(Path(n).name or n, *load_model_for_chat(n, dev, DTYPES[dtype]), sampling, system)
                for n in names]
    if rows is None and prompt is None:
        interactive(chatters, stdin, out)
        return
    answered = answer_rows(rows if rows is not None else [{"prompt": prompt}], chatters, prompts or "--prompt",
                           batch_size)
    if rows is None:  # one prompt: its answer as plain text (each model's on a line of its own)
        for c, key in zip(chatters, ("answer", "answer_compare")):
            print(f"[{c.name}] {answered[0][key]}" if compare else answered[0][key], file=out, flush=True)
        return
    for row in answered:
        print(json.dumps(row, ensure_ascii=False), file=out, flush=True)
