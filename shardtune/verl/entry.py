"""Shared body of the two verl entry points: translate the overrides, then run `shardtune train`."""

from __future__ import annotations

import sys
from typing import Any

from shardtune.errors import ShardtuneError


def run(argv: list[str] | None, table: dict[str, Any], defaults: list[str], prefix_warn: tuple[str, ...] = ()) -> int:
    from shardtune import cli
    from shardtune.verl.mapping import translate

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        overrides = translate(args, table, defaults, prefix_warn)
    except ShardtuneError as e:
        print(f"shardtune: error: {e}", file=sys.stderr)
        return e.exit_code
    return cli.main((["--debug"] if debug else []) + ["train", *overrides])
