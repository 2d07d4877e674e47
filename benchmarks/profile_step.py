"""Where the time of one training step goes: torch.profiler over the training loop's own step
(`train_speed.train_step`: loss, backward, clipping, fused AdamW, EMA) for a preset, grouped by kind of
work. Prints three tables: group | ms per step | share; the top operators; the costliest convolutions by shape.

To see an AVX2-only CPU on a machine with AVX-512 (the kind most laptops and CI runners are), run with
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/profile_step.py --precision fp32
and without them for the native path:
    python benchmarks/profile_step.py --precision bf16
Shares are self CPU time of the operators (children not counted twice), summed over --steps steps.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import PRESETS, NUM_CLASSES, train_step  # noqa: E402  (benchmarks/train_speed.py)
from diffunet import UNet  # noqa: E402

# First match wins; the patterns are substrings of aten / custom operator names.
GROUPS = (
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("mkldnn_convolution", "_convolution", "conv2d", "convolution")),
    ("group norm (+FiLM+SiLU)", ("group_norm", "norm_act", "native_group_norm", "diffunet::")),
    ("attention", ("softmax", "bmm", "scaled_dot_product", "_efficient_attention", "_flash_attention")),
    ("optimizer + EMA + clipping", ("_fused_adamw", "_foreach", "lerp", "norm", "clamp")),
    ("linear (time/class embeddings, qkv)", ("addmm", "mm", "linear")),
    ("layout copies", ("copy_", "contiguous", "clone", "to_copy", "cat", "empty_like", "as_strided")),
    ("elementwise", ("add", "mul", "silu", "sub", "div", "where", "fill_", "zero_", "sum", "mean", "pow",
                     "rsqrt", "exp", "sin", "cos", "sqrt", "neg")),
)


def group_of(name: str) -> str:
    for group, patterns in GROUPS:
        if any(pattern in name for pattern in patterns):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small28", choices=sorted(PRESETS))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=32, help="images per step (default: TrainConfig's 32)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps after 3 warm-up steps")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps the shares honest on a busy machine, "
                             "where multi-threaded operators wait on each other's time slices")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    preset, image = PRESETS[args.preset]
    torch.manual_seed(0)
    model = UNet(preset(num_classes=NUM_CLASSES))
    step = train_step(model, image, args.batch, args.precision == "bf16", compiled=False)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    events = [event for event in prof.key_averages() if event.self_cpu_time_total > 0]
    total_us = sum(event.self_cpu_time_total for event in events)
    groups = defaultdict(float)
    for event in events:
        groups[group_of(event.key)] += event.self_cpu_time_total
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "native"), os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"{args.preset}, batch {args.batch}, {args.precision}, {torch.get_num_threads()} threads, "
          f"ATEN_CPU_CAPABILITY={isa[0]}, ONEDNN_MAX_CPU_ISA={isa[1]}: "
          f"{total_us / 1e3 / args.steps:.0f} ms of operator time per step\n")
    print("| group | ms / step | share |\n|---|---|---|")
    for group, us in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"| {group} | {us / 1e3 / args.steps:.1f} | {us / total_us:.1%} |")
    print("\n| operator | calls / step | ms / step | share |\n|---|---|---|---|")
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:args.top]:
        print(f"| {event.key} | {event.count // args.steps} | {event.self_cpu_time_total / 1e3 / args.steps:.1f} | "
              f"{event.self_cpu_time_total / total_us:.1%} |")

    convolutions = [event for event in prof.key_averages(group_by_input_shape=True)
                    if event.key in ("aten::mkldnn_convolution", "aten::convolution_backward")]
    print("\n| convolution | input, weight (or grad, input) shapes | calls / step | ms / step | share |"
          "\n|---|---|---|---|---|")
    for event in sorted(convolutions, key=lambda event: -event.self_cpu_time_total)[:args.top]:
        print(f"| {event.key.removeprefix('aten::')} | {event.input_shapes[:2]} | {event.count // args.steps} | "
              f"{event.self_cpu_time_total / 1e3 / args.steps:.1f} | {event.self_cpu_time_total / total_us:.1%} |")


if __name__ == "__main__":
    main()
