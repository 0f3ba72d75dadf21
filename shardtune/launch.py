"""torchrun, as `shardtune train --nproc N` runs it: `python -m shardtune.launch TORCHRUN_ARGS...`.

The same launcher (torch.distributed.run), except for how a failed job ends: each failed rank has already
printed its own one-paragraph error, so torchrun's `ChildFailedError` traceback and failure table would only
bury it. Here the job ends with one line naming the rank that failed first, and that rank's exit code.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        print(f"shardtune: rank {rank} {how}; its error is printed above", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
