"""What `diffunet.allocator.keep_freed_memory()` gives: the training loop's step with glibc's default
malloc against the same step with freed blocks kept for reuse.

The setting belongs to a process and cannot be undone, so the two run in fresh processes, alternating
(default, kept, default, kept, ...) so that a load change on a shared machine hits both alike. Each
child warms up, then times --steps training steps (the step of benchmarks/train_speed.py: loss,
backward, clipping, fused AdamW, EMA) and reports images/s, minor page faults per step and its peak
resident set. The speed-up is the median over pairs of the per-pair ratio.

    python benchmarks/allocator.py                              # small28 and small32, fp32 and bf16
    python benchmarks/allocator.py --presets small28 --precisions bf16 --pairs 5
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from common import load  # noqa: E402  (benchmarks/common.py)
from diffunet import UNet  # noqa: E402
from diffunet.allocator import keep_freed_memory  # noqa: E402
from train_speed import NUM_CLASSES, PRESETS, train_step  # noqa: E402


def child(preset: str, precision: str, kept: bool, steps: int, batch: int) -> dict:
    accepted = keep_freed_memory() if kept else False
    factory, image = PRESETS[preset]
    torch.manual_seed(0)
    step = train_step(UNet(factory(num_classes=NUM_CLASSES)), image, batch, precision == "bf16", compiled=False)
    for _ in range(3):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"img_s": batch * steps / seconds, "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "peak_mib": after.ru_maxrss / 1024, "accepted": accepted}


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small28,small32", help="comma-separated: small28, small32")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--pairs", type=int, default=3, help="default/kept process pairs per row")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    parser.add_argument("--batch", type=int, default=64, help="images per training step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, {args.steps} steps "
          f"per process, {args.pairs} pairs; {load()}")
    print("command: python " + " ".join(sys.argv))
    print("\n| preset | precision | img/s default | img/s kept | speed-up | faults/step default | faults/step kept "
          "| peak MiB default | peak MiB kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            runs = {False: [], True: []}
            for _ in range(args.pairs):
                for kept in (False, True):
                    runs[kept].append(run_child({"preset": preset, "precision": precision, "kept": kept,
                                                 "steps": args.steps, "batch": args.batch}))
            if not runs[True][0]["accepted"]:
                raise SystemExit("this C library refused the settings (not glibc): nothing to compare")
            median = lambda kept, key: statistics.median(r[key] for r in runs[kept])   # noqa: E731
            speed_up = statistics.median(k["img_s"] / d["img_s"] for d, k in zip(runs[False], runs[True]))
            print(f"| {preset} | {precision} | {median(False, 'img_s'):.1f} | {median(True, 'img_s'):.1f} | "
                  f"{speed_up:.2f} | {median(False, 'faults'):.0f} | {median(True, 'faults'):.0f} | "
                  f"{median(False, 'peak_mib'):.0f} | {median(True, 'peak_mib'):.0f} |", flush=True)
    print(f"\n{load()} at the end.")


if __name__ == "__main__":
    main()
