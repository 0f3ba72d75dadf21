"""`shardtune chat`: a LoRA checkpoint answers as its export does, --prompts keeps the rows' fields,
--compare adds the other model's answers, and the interactive loop streams, keeps history and resets."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import arithmetic_rows, write_jsonl

from shardtune.chat import Chatter, load_model_for_chat
from shardtune.config import load_config, validate
from shardtune.generate import Sampling, generate
from shardtune.trainer import Trainer

PROMPTS = [[{"role": "user", "content": "What is 1+2?"}], [{"role": "user", "content": "What is 30+40?"}],
           [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "What is 5+5?"}]]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("chat")
    train = write_jsonl(d / "train.jsonl", arithmetic_rows(16, seed=3))
    cfg = validate(load_config(None, [
        f"model.path={tiny_model}", f"data.train_files={train}", "data.cache_dir=null", "data.num_proc=1",
        "data.train_batch_size=8", "optim.lr=1e-2", "model.lora_rank=4", "trainer.total_training_steps=2",
        f"trainer.default_local_dir={d / 'run'}", "trainer.logger=[jsonl]", "trainer.progress_bar=false"]))
    Trainer(cfg).fit()
    return d / "run" / "global_step_2"


def test_checkpoint_answers_as_its_export(lora_checkpoint, tmp_path):
    """The checkpoint (LoRA merged on load) and `shardtune export`'s fp32 folder give the same answers."""
    from shardtune.export import export_checkpoint

    out = export_checkpoint(str(lora_checkpoint), str(tmp_path / "hf"), dtype="fp32")
    answers = []
    for path in (lora_checkpoint, out):
        model, tokenizer = load_model_for_chat(str(path), "cpu")
        answers.append(generate(model, tokenizer, PROMPTS, Sampling(max_new_tokens=6), batch_size=2))
    assert answers[0] == answers[1]
    assert len(answers[0]) == len(PROMPTS)


def test_prompts_file_keeps_fields_and_compares(lora_checkpoint, tiny_model, tmp_path):
    rows = [{"id": 1, "prompt": "What is 1+2?"}, {"id": "b", "messages": PROMPTS[1], "extra": [1, 2]}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    cmd = [sys.executable, "-m", "shardtune", "chat", str(lora_checkpoint), "--prompts", str(f),
           "--compare", str(tiny_model), "--max-new-tokens", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [{k: v for k, v in o.items() if not k.startswith("answer")} for o in out] == rows
    want = {}
    for key, path in (("answer", lora_checkpoint), ("answer_compare", tiny_model)):
        model, tokenizer = load_model_for_chat(str(path), "cpu")
        want[key] = generate(model, tokenizer, PROMPTS[:2], Sampling(max_new_tokens=6))
    assert [o["answer"] for o in out] == want["answer"]
    assert [o["answer_compare"] for o in out] == want["answer_compare"]


def test_bad_prompts_line_names_file_and_line(tiny_model, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n{"text": "no prompt key"}\n')
    r = subprocess.run([sys.executable, "-m", "shardtune", "chat", str(tiny_model), "--prompts", str(f)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"{f}, line 2" in r.stderr and '"prompt"' in r.stderr and "Traceback" not in r.stderr


def test_chatter_streams_keeps_history_and_resets(tiny_model):
    model, tokenizer = load_model_for_chat(str(tiny_model), "cpu")
    chatter = Chatter("m", model, tokenizer, Sampling(max_new_tokens=5), system="Be brief.")
    out = io.StringIO()
    first = chatter.say("What is 1+2?", out)
    assert out.getvalue().strip() == first  # what was streamed is the answer
    second = chatter.say("And doubled?", out)
    assert [m["role"] for m in chatter.history] == ["system", "user", "assistant", "user", "assistant"]
    # the second turn was answered with the first one in its prompt: the same as answering the whole history
    assert generate(model, tokenizer, [chatter.history[:4]], Sampling(max_new_tokens=5)) == [second]
    chatter.reset()
    assert chatter.history == [{"role": "system", "content": "Be brief."}]


def test_interactive_loop_over_piped_stdin(tiny_model):
    stdin = "What is 1+2?\nAnd doubled?\n/reset\nhello\n/exit\nnot read\n"
    r = subprocess.run([sys.executable, "-m", "shardtune", "chat", str(tiny_model), "--compare", str(tiny_model),
                        "--max-new-tokens", "4"], input=stdin, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("> ") == 5  # four inputs read and answered or acted on, then /exit
    assert "(history cleared)" in r.stdout
    assert r.stdout.count(f"[{tiny_model.name}] ") == 6  # both models answer each of the three messages
