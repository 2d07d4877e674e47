"""The evaluation protocol: train the default recipe at a fixed budget, then `diffunet eval` it, for
MNIST and Fashion-MNIST. Prints one table: setting | bits/dim | FD (floor) | entropy | training minutes.

The budget is 64,000 training images (TrainConfig's 2,000 steps of 32). bits/dim uses 100 test images and 100
of the T timesteps per image by default: stratified and unbiased, and as precise as the full sum at
a tenth of the cost (on a briefly trained MNIST model the per-image spread from the noise draws was
0.073 bits/dim with all 1,000 timesteps and 0.070 with 100, against 0.40 between images);
--nll-timesteps 0 sums every timestep. Data come from $DIFFUNET_DATA (default:
../shared/data beside the clone when it holds the .npz files, else ~/.cache/diffunet); the feature
classifiers are cached there too. Flags this script does not know are passed to `diffunet train`,
so a recipe change is measured with the same protocol:

    python benchmarks/eval_protocol.py                              # both sets, N = 1,000
    python benchmarks/eval_protocol.py --data mnist -- --lr 1e-3    # one set, a changed recipe
    python benchmarks/eval_protocol.py --steps 5 --num 50 --nll-images 2 --classifier-steps 20  # smoke test

Each run goes to OUT_DIR/<data>; an existing one is refused unless --reuse (evaluate it again).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a clone without installing
SHARED_DATA = REPO.parent / "shared" / "data"
if "DIFFUNET_DATA" not in os.environ and (SHARED_DATA / "mnist.npz").is_file():
    os.environ["DIFFUNET_DATA"] = str(SHARED_DATA)

from diffunet.atomic import atomic_write_text  # noqa: E402
from diffunet.checkpoint import read_config  # noqa: E402
from diffunet.cli import main as diffunet_main  # noqa: E402
from diffunet.evaluate import evaluate, format_table  # noqa: E402
from diffunet.features import ClassifierConfig  # noqa: E402
from diffunet.training import TrainConfig, pick_device  # noqa: E402


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", default="mnist,fashion-mnist", help="comma-separated data sources")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps,
                        help=f"training steps (default: TrainConfig's, {TrainConfig.steps})")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                        help=f"training batch (default: TrainConfig's, {TrainConfig.batch_size})")
    parser.add_argument("--num", type=int, default=1000, help="N for FD, entropy, memorisation (default: 1000)")
    parser.add_argument("--nll-images", type=int, default=100, help="test images for bits/dim (default: 100)")
    parser.add_argument("--nll-timesteps", type=int, default=100,
                        help="forwards per image for bits/dim, stratified (default: 100; 0 = all T, exact)")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierConfig.steps)
    parser.add_argument("--seed", type=int, default=0, help="training and evaluation seed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--out-dir", default="runs/eval_protocol", help="one run folder per data source here")
    parser.add_argument("--reuse", action="store_true", help="evaluate existing runs again instead of refusing")
    args, train_flags = parser.parse_known_args()
    return args, [flag for flag in train_flags if flag != "--"]


def train_run(data: str, out: Path, args: argparse.Namespace, train_flags: list[str]) -> dict:
    """Train one run (or reuse it); returns {"training_minutes", "argv"} (also kept in the run folder)."""
    record = out / "protocol_train.json"
    if out.exists():
        if not args.reuse or not record.is_file():
            sys.exit(f"{out} exists; choose another --out-dir, or pass --reuse to evaluate the finished run again")
        return json.loads(record.read_text())
    started = time.perf_counter()
    argv = ["train", "--data", data, "--out", str(out), "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--seed", str(args.seed), "--device", args.device, *train_flags]
    if diffunet_main(argv) != 0:
        sys.exit(f"training on {data} failed; see the error above")
    training = {"training_minutes": (time.perf_counter() - started) / 60, "argv": argv}
    atomic_write_text(record, json.dumps(training, indent=2) + "\n")
    return training


def main() -> None:
    args, train_flags = parse_args()
    device = pick_device(args.device)
    print(f"data folder: {os.environ.get('DIFFUNET_DATA', '~/.cache/diffunet')}; device: {device}; "
          f"budget: {args.steps} steps x {args.batch_size} = {args.steps * args.batch_size:,} images", flush=True)
    rows = []
    for data in args.data.split(","):
        out = Path(args.out_dir) / data
        training = train_run(data, out, args, train_flags)
        report = evaluate(out, num=args.num, nll_images=args.nll_images, nll_timesteps=args.nll_timesteps or None,
                          seed=args.seed, classifier=ClassifierConfig(steps=args.classifier_steps), device=device,
                          progress=True)
        report.update(training, setting=_setting(data, read_config(out)["train"], training["argv"]))
        atomic_write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
        print(format_table(report), flush=True)
        rows.append((data, report))

    print(f"\nsetting | bits/dim | FD (floor) | entropy | training minutes")
    print("--- | --- | --- | --- | ---")
    for data, report in rows:
        nll, fd, entropy = report.get("nll"), report.get("fd"), report.get("entropy")
        bits = f"{nll['bits_per_dim']:.3f} ± {nll['stderr'] or 0:.3f}" if nll else "-"
        distance = f"{fd['value']:.2f} ({fd['floor']:.2f}), N = {fd['num']}" if fd else "-"
        spread = f"{entropy['samples_bits']:.3f} (real {entropy['real_bits']:.3f})" if entropy else "-"
        print(f"{report['setting']} | {bits} | {distance} | {spread} | {report['training_minutes']:.1f}")
    summary = {"rows": [report for _, report in rows]}
    atomic_write_text(Path(args.out_dir) / "protocol.json", json.dumps(summary, indent=2) + "\n")


def _setting(data: str, train_config: dict, argv: list[str]) -> str:
    """'mnist, 1000 x 64' plus the recipe flags the run was trained with beyond the protocol's own."""
    extra = argv[argv.index("--device") + 2:] if "--device" in argv else []
    text = f"{data}, {train_config['steps']} x {train_config['batch_size']}"
    return f"{text} {shlex.join(extra)}" if extra else text


if __name__ == "__main__":
    main()
