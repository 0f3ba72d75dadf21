"""Shared body of the verl entry points: translate the line, then run shardtune's own `train`."""

from __future__ import annotations

import sys

from shardtune.errors import ShardtuneError


def run(argv: list[str] | None, spec_name: str) -> int:
    from shardtune import cli
    from shardtune.verl import translate

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        overrides = translate.translate(args, getattr(translate, spec_name))
    except ShardtuneError as e:
        print(f"shardtune: error: {e}", file=sys.stderr)
        return e.exit_code
    return cli.main((["--debug"] if debug else []) + ["train", *overrides])
