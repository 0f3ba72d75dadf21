"""Shared body of the verl entry points: translate the line, then run shardtune's own `train` (or another
launch, for the Ray entry point)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from shardtune import cli
from shardtune.errors import ShardtuneError
from shardtune.verl.translate import Spec, translate

# (verl arguments, translated shardtune overrides, --debug) -> exit code
Launch = Callable[[list[str], list[str], bool], int]


def run(argv: list[str] | None, spec: Spec, launch: Launch | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        overrides = translate(args, spec)
        if launch is not None:
            return launch(args, overrides, debug)
    except ShardtuneError as e:
        print(f"shardtune: error: {e}", file=sys.stderr)
        return e.exit_code
    return cli.main((["--debug"] if debug else []) + ["train", *overrides])
