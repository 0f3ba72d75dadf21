"""Shared body of the verl entry points: translate the line, then run shardtune's own `train`."""

from __future__ import annotations

import sys

from shardtune.errors import ShardtuneError
from shardtune.verl.translate import Spec, translate


def run(argv: list[str] | None, spec: Spec) -> int:
    from shardtune import cli

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        overrides = translate(args, spec)
    except ShardtuneError as e:
        print(f"shardtune: error: {e}", file=sys.stderr)
        return e.exit_code
    return cli.main((["--debug"] if debug else []) + ["train", *overrides])
