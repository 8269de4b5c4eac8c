"""bf16 autocast against float32 for EfficientNet-Lite0's convolution shapes, forward and backward.

Whether ``torch.autocast("cpu", dtype=torch.bfloat16)`` would speed up the reconstruction engine's
convolutions on this CPU (it pays only where the CPU has bf16 dot products, e.g. avx512-bf16 or AMX):
each case runs ``F.conv2d`` forward and backward at batch 16, channels-last, float32 and under autocast,
best of 10 steps, with torch's default threads. Prints the CPU capability torch detected.

Usage::

    python scripts/bench_bf16_convs.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

B = 16
CASES = [  # (name, cin, cout, hw, k, groups)
    ("expand 1x1 24->144 @56", 24, 144, 56, 1, 1),
    ("dw 3x3 144 @56", 144, 144, 56, 3, 144),
    ("project 1x1 144->24 @56", 144, 24, 56, 1, 1),
    ("expand 1x1 80->480 @14", 80, 480, 14, 1, 1),
    ("dw 5x5 480 @14", 480, 480, 14, 5, 480),
    ("project 1x1 480->112 @14", 480, 112, 14, 1, 1),
    ("head 1x1 320->1280 @7", 320, 1280, 7, 1, 1),
]


def step(x: torch.Tensor, w: torch.Tensor, groups: int, pad: int, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = F.conv2d(x, w, padding=pad, groups=groups)
    y.float().square().mean().backward()


def bench(cin: int, cout: int, hw: int, k: int, groups: int, bf16: bool, reps: int = 10) -> float:
    torch.manual_seed(0)
    x = torch.randn(B, cin, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(cout, cin // groups, k, k) * 0.1).requires_grad_()
    for _ in range(2):
        step(x, w, groups, k // 2, bf16)
    best = float("inf")
    for _ in range(reps):
        x.grad = w.grad = None
        t = time.perf_counter()
        step(x, w, groups, k // 2, bf16)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> int:
    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    for name, cin, cout, hw, k, g in CASES:
        a, b = bench(cin, cout, hw, k, g, False), bench(cin, cout, hw, k, g, True)
        print(f"{name:28s} fp32 {a:7.2f} ms  bf16 {b:7.2f} ms  x{a / b:4.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
