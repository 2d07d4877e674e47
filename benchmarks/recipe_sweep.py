"""Recipe sweep: the evaluation protocol (`eval_protocol.py`) for a list of recipe variants at the same
budget of training images, several at a time, then sampler-only variants (guidance, steps, sampler)
evaluated on the default run. Prints one table: variant | bits/dim | FD (floor) | FD / floor | entropy |
training minutes, and writes OUT_DIR/sweep.json.

Each variant is one change from the defaults, so the table says what each choice is worth. On a GPU
several trainings share the card (--jobs); on 2 CPU cores run one at a time (--jobs 1, the default),
about 8 minutes per variant for MNIST.

    python benchmarks/recipe_sweep.py --data mnist --device cuda --jobs 6
    python benchmarks/recipe_sweep.py --only default,ema_0.995 --data mnist     # some variants
    python benchmarks/recipe_sweep.py --list                                      # the variants
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "benchmarks" / "eval_protocol.py"

# name -> (eval_protocol flags: budget split into steps x batch, flags for `diffunet train`)
TRAIN_VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "default": ([], []),
    "batch_64x1000": (["--batch-size", "64", "--steps", "1000"], []),
    "batch_16x4000": (["--batch-size", "16", "--steps", "4000"], []),
    "lr_1e-3": ([], ["--lr", "1e-3"]),
    "lr_4e-3": ([], ["--lr", "4e-3"]),
    "adam_beta2_0.99": ([], ["--adam-beta2", "0.99"]),
    "cosine_schedule": ([], ["--schedule", "cosine"]),
    "min_snr": ([], ["--loss-weighting", "min_snr"]),
    "eps_prediction": ([], ["--prediction", "eps"]),
    "res_blocks_2": ([], ["--model-num-res-blocks", "2"]),
    "base_48": ([], ["--model-base-channels", "48"]),
    "label_dropout_0.2": ([], ["--label-dropout", "0.2"]),
    "constant_lr": ([], ["--lr-schedule", "constant"]),
    "lognormal_timesteps": ([], ["--timestep-sampling", "lognormal"]),
}
# EMA decay is no lever at this budget: the EMA warmup caps the decay at (1 + n) / (10 + n), 0.9955 at step
# 2000, below --ema-max-decay 0.999 (0.995 and 0.99 gave the default's FD within 0.1 in the GPU sweep).
# name -> flags for `diffunet eval` on the default variant's run
SAMPLER_VARIANTS: dict[str, list[str]] = {
    "guidance_1.25": ["--guidance", "1.25"],
    "guidance_1.5": ["--guidance", "1.5"],
    "guidance_2.0": ["--guidance", "2.0"],
    "dpmpp_2m_20": ["--sampler", "dpmpp_2m", "--steps", "20"],
    "ddim_50": ["--sampler", "ddim", "--steps", "50"],
    "ddpm_100": ["--sampler", "ddpm", "--steps", "100"],
    "ddpm_1000": ["--sampler", "ddpm", "--steps", "1000"],
}


def run_logged(argv: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode


def train_variant(name: str, data: str, args) -> dict:
    protocol_flags, train_flags = TRAIN_VARIANTS[name]
    out = Path(args.out_dir) / name
    if args.smoke:   # a few steps and tiny evaluation sets: checks the plumbing, not the recipe
        protocol_flags = ["--steps", "4", "--nll-images", "2", "--nll-timesteps", "10", "--classifier-steps", "20"]
    argv = [sys.executable, str(PROTOCOL), "--data", data, "--out-dir", str(out), "--device", args.device,
            "--num", str(args.num), "--seed", str(args.seed), *(["--reuse"] if (out / data).exists() else []),
            *protocol_flags, "--", *train_flags, "--quiet"]
    started = time.perf_counter()
    code = run_logged(argv, out / f"{data}.log")
    print(f"  {name} on {data}: exit {code} after {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    report = out / data / "eval.json"
    return json.loads(report.read_text()) if code == 0 and report.is_file() else {"error": f"see {out}/{data}.log"}


def sampler_variant(name: str, data: str, args) -> dict:
    run = Path(args.out_dir) / "default" / data
    report = Path(args.out_dir) / name / f"{data}.json"
    argv = [sys.executable, "-m", "diffunet.cli", "eval", "--checkpoint", str(run), "--num", str(args.num),
            "--nll-images", "0", "--seed", str(args.seed), "--device", args.device, "--out", str(report),
            "--no-progress", *SAMPLER_VARIANTS[name], *(["--classifier-steps", "20"] if args.smoke else [])]
    code = run_logged(argv, report.with_suffix(".log"))
    print(f"  {name} on {data}: exit {code}", flush=True)
    if code != 0 or not report.is_file():
        return {"error": f"see {report.with_suffix('.log')}"}
    result = json.loads(report.read_text())
    baseline = json.loads((run / "eval.json").read_text())
    result.update(nll=baseline.get("nll"), training_minutes=baseline.get("training_minutes"))  # same weights
    return result


def row(name: str, data: str, report: dict) -> str:
    if "error" in report:
        return f"| {data} | {name} | failed: {report['error']} | | | | |"
    nll, fd, entropy = report.get("nll"), report["fd"], report["entropy"]
    bits = f"{nll['bits_per_dim']:.3f} ± {nll['stderr']:.3f}" if nll else "-"
    minutes = report.get("training_minutes")
    return (f"| {data} | {name} | {bits} | {fd['value']:.2f} ({fd['floor']:.2f}) | {fd['value'] / fd['floor']:.1f} | "
            f"{entropy['samples_bits']:.3f} ({entropy['real_bits']:.3f}) | "
            f"{f'{minutes:.1f}' if minutes is not None else '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist", help="comma-separated data sources (default: mnist)")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once (default: 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--num", type=int, default=1000, help="N for FD and entropy (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/recipe_sweep")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--smoke", action="store_true", help="4 training steps per variant: a plumbing check")
    args = parser.parse_args()
    if args.list:
        for name, (protocol_flags, train_flags) in TRAIN_VARIANTS.items():
            print(f"{name}: {' '.join(protocol_flags + train_flags) or '(the defaults)'}")
        for name, flags in SAMPLER_VARIANTS.items():
            print(f"{name}: default run, eval {' '.join(flags)}")
        return
    names = args.only.split(",") if args.only else [*TRAIN_VARIANTS, *SAMPLER_VARIANTS]
    unknown = [name for name in names if name not in TRAIN_VARIANTS and name not in SAMPLER_VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; see --list")
    sources = args.data.split(",")
    trained = [(name, data) for data in sources for name in names if name in TRAIN_VARIANTS]
    sampled = [(name, data) for data in sources for name in names if name in SAMPLER_VARIANTS]
    print(f"{len(trained)} trainings, {len(sampled)} sampler evaluations, {args.jobs} at a time; "
          f"DIFFUNET_DATA={os.environ.get('DIFFUNET_DATA', '(default)')}", flush=True)
    reports = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for key, report in zip(trained, pool.map(lambda item: train_variant(*item, args), trained)):
            reports[key] = report
        for key, report in zip(sampled, pool.map(lambda item: sampler_variant(*item, args), sampled)):
            reports[key] = report
    print("\n| data | variant | bits/dim | FD (floor) | FD / floor | entropy (real) | training minutes |")
    print("|---|---|---|---|---|---|---|")
    for (name, data), report in reports.items():
        print(row(name, data, report))
    summary = [{"variant": name, "data": data, **report} for (name, data), report in reports.items()]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
