"""`shardtune train | validate | render | export | chat | plot | demo` (also `python -m shardtune ...`).

Each subcommand imports what it needs when it is chosen, so `--help`, usage errors and config errors
answer at once, without loading torch or transformers."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from shardtune.errors import ConfigError, ShardtuneError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardtune", description="Supervised fine-tuning of causal LMs (FSDP2).")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="an optional YAML config followed by key=value overrides")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
        return sp

    train = with_config("train", "train a model")
    train.add_argument("--nproc", type=int, default=0,
                       help="launch this many local processes with torchrun (default: run in this process)")
    check = with_config("validate", "check the config and the data, estimate memory per device, then exit")
    check.add_argument("--nproc", type=int, default=None,
                       help="processes the run will use (default: WORLD_SIZE, else 1)")
    check.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                       help="memory of one device in GiB (default: this GPU's, else this machine's RAM)")
    render = with_config("render", "print one tokenized sample with its trained spans marked")
    render.add_argument("--index", type=int, default=0, help="0-based sample index in data.train_files")
    render.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    export = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (safetensors)")
    export.add_argument("checkpoint", help="a global_step_N folder")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "fp16"))
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    export.add_argument("--adapter-only", action="store_true",
                        help="LoRA checkpoints: write the peft adapter instead of merged weights")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out folder, replacing the files export writes (others stay)")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    chat = sub.add_parser("chat", help="chat with a checkpoint or an exported model (interactive or scripted)")
    chat.add_argument("model", help="a global_step_N checkpoint folder or a Hugging Face model folder")
    chat.add_argument("--compare", default=None, metavar="OTHER", help="answer with this model too (e.g. the base)")
    chat.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    chat.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                      help='answer each line ({"prompt": ...} or {"messages": [...]}); print it with "answer" added')
    chat.add_argument("--system", default=None, help="system prompt put before every conversation")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--batch-size", type=int, default=16, help="prompts generated together (--prompts)")
    chat.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    chat.add_argument("--dtype", default="fp32", choices=("bf16", "fp32", "fp16"))
    chat.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    plot = sub.add_parser("plot", help="plot loss, lr, tokens/s and MFU of a run to a PNG")
    plot.add_argument("run_dir", help="the run directory (trainer.default_local_dir)")
    plot.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    plot.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    demo = sub.add_parser("demo", help="train a tiny model on a generated task and show it learned")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the tuned demo length)")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if "=" not in x or x.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:  # overrides written after a flag, e.g. `train a=1 --nproc 2 b=2`
        args.args = [*getattr(args, "args", []), *extra]
    try:
        return _dispatch(args)
    except ShardtuneError as e:
        if args.debug:
            traceback.print_exc()
        print(f"shardtune: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("shardtune: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        from shardtune import preempt

        if not isinstance(e, preempt.Preempted):
            raise
        print("shardtune: SIGTERM before training started: stopped (nothing to save yet)", file=sys.stderr)
        return preempt.EXIT_CODE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from shardtune.demo import run_demo

        run_demo(args.out, steps=args.steps)
        return 0
    if args.command == "chat":
        from shardtune.chat import run_chat
        from shardtune.generate import Sampling

        run_chat(args.model, args.compare, args.prompt, args.prompts, args.system,
                 Sampling(args.max_new_tokens, args.temperature, args.top_p), args.device, args.dtype, args.batch_size)
        return 0
    if args.command == "plot":
        from shardtune.plot import plot_run

        plot_run(args.run_dir, args.out)
        return 0
    if args.command == "export":
        from shardtune.export import export_checkpoint

        export_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.adapter_only,
                          args.overwrite)
        return 0
    from shardtune.config.loading import last_of_each, repeated_overrides

    path, overrides = split_config_args(args.args)
    note = repeated_overrides(overrides)
    if note and os.environ.get("RANK", "0") == "0":
        print(f"shardtune: note: {note}", file=sys.stderr, flush=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.command == "validate" and args.device_memory is not None and args.device_memory <= 0:
        raise ConfigError(f"--device-memory must be > 0 GiB, got {args.device_memory}.")
    nproc = getattr(args, "nproc", None)  # validate: None = not given; train: 0 = not given
    if (args.command == "validate" and nproc is not None) or (args.command == "train" and nproc):
        if nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}.")
        world_size = nproc  # check (and estimate) for the launch being planned
    cfg = checked_config(path, overrides, world_size)
    # every rule that needs no data is checked before the launch
    if args.command == "train" and world_size > 1 and nproc:
        from shardtune.checkpoint import check_run_dir

        check_run_dir(cfg.run_dir)
        return launch_torchrun(nproc, path, last_of_each(overrides), args.debug)
    if args.command == "validate":
        from shardtune.preview import print_memory_estimate, validate_data

        image_tokens = validate_data(cfg, world_size)
        print_memory_estimate(cfg, world_size, args.device_memory, image_tokens)
        return 0
    if args.command == "render":
        from shardtune.preview import render_sample

        render_sample(cfg, args.index, args.color)
        return 0
    return _train(cfg, args.debug)


def checked_config(path: str | None, overrides: list[str], world_size: int):
    """The config, checked across keys for `world_size` processes and against the model folder."""
    from shardtune.config import load_config, validate

    cfg = validate(load_config(path, overrides), world_size=world_size)
    # imported after the rules that need no model, so their errors answer before torch and transformers load
    from shardtune.model import check_architecture, check_loss_head, check_model_path, check_sequence_parallel

    check_model_path(cfg.model)
    check_sequence_parallel(cfg.model, cfg.sp_size)
    check_architecture(cfg.model)
    check_loss_head(cfg.model)
    return cfg


def _train(cfg, debug: bool) -> int:
    from shardtune import parallel, preempt
    from shardtune.trainer import Trainer

    preempt.install()  # SIGTERM: stop after the step in flight, save, exit with preempt.EXIT_CODE
    world = parallel.init_world(cfg.sp_size, cfg.engine.timeout_minutes)
    if not world.distributed:
        trainer = Trainer(cfg, world)
        trainer.fit()
        return preempt.EXIT_CODE if trainer.preempted else 0
    # Under torchrun: report this rank's error, then leave without a hang (torchrun stops the other ranks).
    code = 0
    try:
        trainer = Trainer(cfg, world)
        trainer.fit()
        if trainer.preempted and world.is_main:
            preempt.report_stopped()
    except ShardtuneError as e:
        if debug:
            traceback.print_exc()
        print(f"shardtune: error (rank {world.rank}): {e}", file=sys.stderr)
        code = e.exit_code
    except preempt.Preempted:
        print(f"shardtune: rank {world.rank}: SIGTERM before training started: stopped", file=sys.stderr)
        code = preempt.EXIT_CODE
    except BaseException:
        print(f"shardtune: rank {world.rank} failed:", file=sys.stderr)
        traceback.print_exc()
        code = 1
    parallel.shutdown(code)
    return code  # not reached


WORKER = ["-m", "shardtune"]  # what torchrun runs in each process (tests/scripts/slow_steps.py runs itself)


def launch_torchrun(nproc: int, path: str | None, overrides: list[str], debug: bool) -> int:
    cmd = [sys.executable, "-m", "shardtune.launch"]  # torchrun, ending a failed job in one line
    # SIGTERM is this launcher's to handle (shardtune/preempt.py): torchrun leaves it alone
    cmd += ["--standalone", f"--nproc-per-node={nproc}", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *WORKER]
    cmd += (["--debug"] if debug else []) + ["train"] + ([path] if path else []) + overrides
    from shardtune import preempt
    from shardtune.parallel import exit_with_parent

    launcher = os.getpid()

    def start() -> None:
        preempt.ignore_in_child()
        exit_with_parent(signal.SIGKILL, parent=launcher)  # this launcher killed: torchrun and its workers go too

    with tempfile.TemporaryDirectory(prefix="shardtune-launch-") as tmp:
        marker = Path(tmp) / "preempted"
        proc = subprocess.Popen(cmd, preexec_fn=start, env={**os.environ, preempt.MARKER_ENV: str(marker)})
        signal.signal(signal.SIGTERM, lambda signum, frame: preempt.forward_to_children_of(proc.pid))
        code = proc.wait()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return preempt.EXIT_CODE if code == 0 and marker.exists() else code


if __name__ == "__main__":
    sys.exit(main())
