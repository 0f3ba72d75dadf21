"""Run the shardtune CLI with the disk 'full' from the checkpoint of step FULL_AT_STEP on: every DCP write
into that folder fails with ENOSPC, as on a full file system (no small file system can be mounted in CI)."""

import errno
import os
import sys

import torch.distributed.checkpoint.filesystem as fs

from shardtune import cli

_write_item = fs._write_item
full_at = f"global_step_{os.environ['FULL_AT_STEP']}"


def write_item(*args, **kwargs):
    stream = args[1]
    if full_at in str(getattr(stream, "name", "")):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _write_item(*args, **kwargs)


fs._write_item = write_item
sys.exit(cli.main(sys.argv[1:]))
