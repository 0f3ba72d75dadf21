"""AdamW implementations on this machine: fused, foreach and single-tensor, one step over the same tensors.

    python bench/optimizer.py [--params-m 42]

Prints ms per step for each (the choice in shardtune/optim.py: fused where it covers the parameters).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params-m", type=float, default=42, help="millions of parameters (1024 x 1024 matrices)")
    args = p.parse_args()
    n = max(1, round(args.params_m * 1e6 / (1024 * 1024 + 1024)))
    params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(n)]
    params += [torch.nn.Parameter(torch.randn(1024)) for _ in range(n)]
    for p_ in params:
        p_.grad = torch.randn_like(p_)
    for name, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("single-tensor",
                                                                                      {"foreach": False})):
        opt = torch.optim.AdamW(params, lr=1e-3, **kwargs)
        opt.step()  # state allocation
        start = time.perf_counter()
        for _ in range(5):
            opt.step()
        print(f"{name:14s} {(time.perf_counter() - start) / 5 * 1e3:7.1f} ms per step "
              f"({n * (1024 * 1024 + 1024) / 1e6:.0f} M params)")


if __name__ == "__main__":
    main()
