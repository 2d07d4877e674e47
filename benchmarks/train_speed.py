"""Training and sampling speed of the presets on this machine, and a table of sampler speeds.

1. Training images/s per preset and precision, for the training loop's own step: `training_loss` with
   TrainConfig's defaults (prediction, loss weighting, labels with label dropout), backward, gradient
   clipping, fused AdamW and the EMA update. With --compile, also the torch.compile'd model, and
   how long compiling took.
2. Sampling-forward images/s: one denoiser call under torch.inference_mode, batch --batch.
3. Sampler table on small28: images/s of `diffunet.generate` (the path `diffunet sample` and the
   training grids take) for ddpm with 1000 steps, ddim with 50 and dpmpp_2m with 20, class-conditional
   with TrainConfig's guidance scale (one forward of the doubled batch per step). Speed does not
   depend on the weights: the presets are randomly initialised unless --checkpoint names a run.

    python benchmarks/train_speed.py                    # fp32 and bf16 autocast: about 10 minutes on 2 cores
    python benchmarks/train_speed.py --quick            # a smoke test
    python benchmarks/train_speed.py --checkpoint runs/mnist --precisions fp32 --compile
    python benchmarks/train_speed.py --presets small28 --override norm_groups=2 --no-samplers   # a variant
    python benchmarks/train_speed.py --presets small28 --precisions fp32 --batch 16,24,32,48 --no-samplers
    python benchmarks/train_speed.py --device cuda --compile --num 1000 --batch 1000   # on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from common import bench_device, interleaved, load, synchronize  # noqa: E402  (benchmarks/common.py)
from diffunet import UNet, UNetConfig  # noqa: E402
from diffunet.allocator import keep_freed_memory  # noqa: E402
from diffunet.run import load_model  # noqa: E402
from diffunet.ema import ema_copy, ema_decay, ema_update  # noqa: E402
from diffunet.generate import generate  # noqa: E402
from diffunet.loss import training_loss  # noqa: E402
from diffunet.training import TrainConfig  # noqa: E402
from samplers import NoiseSchedule  # noqa: E402

PRESETS = {"small28": (UNetConfig.small28, (1, 28, 28)), "small32": (UNetConfig.small32, (3, 32, 32))}
SAMPLER_TABLE = (("ddpm", 1000), ("ddim", 50), ("dpmpp_2m", 20))
NUM_CLASSES = 10
DEVICE = torch.device("cpu")   # --device; set once in main()


def train_step(model: UNet, image: tuple[int, int, int], batch: int, bf16: bool, compiled: bool):
    """The training loop's step as a closure: loss, backward, clip, fused AdamW, EMA."""
    cfg = TrainConfig()
    schedule = getattr(NoiseSchedule, cfg.schedule)(cfg.num_timesteps)
    generator = torch.Generator(DEVICE).manual_seed(0)
    x0 = torch.rand(batch, *image, generator=generator, device=DEVICE) * 2 - 1  # images in [-1, 1]
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator, device=DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    ema = ema_copy(model)
    forward = torch.compile(model, dynamic=False) if compiled else model
    model.train()
    step_count = [0]

    def step():
        y = torch.where(torch.rand(batch, generator=generator, device=DEVICE) < cfg.label_dropout, -1, labels)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(forward, x0, schedule, prediction=cfg.prediction, weighting=cfg.loss_weighting,
                                 min_snr_gamma=cfg.min_snr_gamma, y=y, generator=generator).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, model, ema_decay(step_count[0], cfg.ema_max_decay))
        step_count[0] += 1
    return step


def forward_call(model: UNet, image: tuple[int, int, int], batch: int, bf16: bool, compiled: bool):
    """One denoiser call as a sampler makes it (eval mode, inference_mode, labels)."""
    x = torch.randn(batch, *image, device=DEVICE)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def call():
        model.eval()
        with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            forward(x, t, y=y)
    return call


def preset_speeds(args) -> None:
    print(f"\n## Presets: training and sampling-forward images/s ({args.rounds} rounds, medians; "
          f"best round in brackets)\n")
    print("| preset | params | precision | compiled | batch | train img/s | ms/step | sample-fwd img/s | first call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        preset, image = PRESETS[name]
        models = {}                                   # label -> model: the preset, then each --override of it
        for label, overrides in [(name, {}), *((f"{name} {text}", parse_override(text)) for text in args.override)]:
            torch.manual_seed(0)
            models[label] = UNet(preset(num_classes=NUM_CLASSES, **overrides)).to(DEVICE)
        variants = [(label, precision, compiled, batch) for precision in args.precisions.split(",")
                    for compiled in ([False, True] if args.compile else [False]) for label in models
                    for batch in args.batches]
        train, sample, first = {}, {}, {}
        for key in variants:
            label, precision, compiled, batch = key
            train[key] = train_step(models[label], image, batch, precision == "bf16", compiled)
            sample[key] = forward_call(models[label], image, batch, precision == "bf16", compiled)
            start = time.perf_counter()
            train[key](), sample[key]()                          # warm-up, and compilation
            first[key] = time.perf_counter() - start
        train_times, sample_times = interleaved(train, args.rounds, DEVICE), interleaved(sample, args.rounds, DEVICE)
        for key in variants:
            label, precision, compiled, batch = key
            parameters = sum(p.numel() for p in models[label].parameters())
            step_seconds = statistics.median(train_times[key])
            print(f"| {label} | {parameters / 1e6:.2f} M | {precision} | {'yes' if compiled else 'no'} | {batch} | "
                  f"{batch / step_seconds:.1f} ({batch / min(train_times[key]):.1f}) | {step_seconds * 1e3:.1f} | "
                  f"{batch / statistics.median(sample_times[key]):.0f} | {first[key]:.1f} |", flush=True)
    print(f"\n{load()}")


def parse_override(text: str) -> dict:
    """'norm_groups=2' -> {"norm_groups": 2}; 'base_channels=16,num_res_blocks=1' changes both; a tuple field
    takes its integers joined by colons: 'channel_mults=1:2:4' -> {"channel_mults": (1, 2, 4)}."""
    overrides = {}
    for item in text.split(","):
        field, _, value = item.partition("=")
        try:
            overrides[field] = tuple(int(v) for v in value.split(":")) if ":" in value else int(value)
        except ValueError:
            raise SystemExit(f"--override {text!r}: give FIELD=INTEGER[,FIELD=INTEGER] (a tuple as 1:2:4), e.g. "
                             f"--override norm_groups=2") from None
    return overrides


def sampler_table(args) -> None:
    if args.checkpoint:
        model, config = load_model(args.checkpoint, device=DEVICE)
        source = f"trained weights from {args.checkpoint}"
        image, prediction = tuple(config["image_shape"]), config.get("prediction", "eps")
    else:
        torch.manual_seed(0)
        model = UNet(UNetConfig.small28(num_classes=NUM_CLASSES)).to(DEVICE)
        source, image, prediction = "small28, random weights (speed does not depend on them)", (1, 28, 28), "v"
    model.eval()
    cfg = TrainConfig()
    schedule = NoiseSchedule.cosine(1000)
    labels = torch.arange(args.num, device=DEVICE) % NUM_CLASSES if model.config.num_classes else None
    guidance = cfg.guidance if labels is not None else 1.0
    print(f"\n## Samplers: images/s of diffunet.generate, {args.num} images in batches of {args.batch}, "
          f"guidance {guidance}; {source}\n")
    print("| sampler | steps | precision | seconds | images/s | model calls/s |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        for sampler, steps in SAMPLER_TABLE:
            synchronize(DEVICE)
            start = time.perf_counter()
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                generate(model, schedule, args.num, image, sampler=sampler, steps=steps, prediction=prediction,
                         labels=labels, guidance=guidance, seed=0, batch_size=args.batch, device=DEVICE)
            synchronize(DEVICE)
            seconds = time.perf_counter() - start
            calls = steps * -(-args.num // args.batch)
            print(f"| {sampler} | {steps} | {precision} | {seconds:.1f} | {args.num / seconds:.2f} | "
                  f"{calls / seconds:.1f} |", flush=True)
    print(f"\n{load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small28,small32", help="comma-separated: small28, small32")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--batch", default="64", help="images per training step and per sampling batch; "
                        "comma-separated sizes are timed interleaved (the sampler table takes the first)")
    parser.add_argument("--rounds", type=int, default=10, help="timed training steps / forward calls per variant")
    parser.add_argument("--num", type=int, default=64, help="images per sampler in the sampler table")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd presets (slow to compile)")
    parser.add_argument("--checkpoint", help="a run folder: sampler table with its EMA weights")
    parser.add_argument("--no-samplers", dest="samplers", action="store_false", help="skip the sampler table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    parser.add_argument("--quick", action="store_true", help="3 rounds and 8 images per sampler")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=INT[,...]",
                        help="also time each preset with these UNetConfig fields changed, interleaved (repeatable; "
                             "a tuple as channel_mults=1:2:4)")
    parser.add_argument("--default-malloc", dest="malloc", action="store_false",
                        help="leave glibc's malloc as it is, instead of keep_freed_memory() as the CLI does")
    args = parser.parse_args()
    global DEVICE
    DEVICE = bench_device(args.device)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc:
        keep_freed_memory()                # as the CLI does (benchmarks/allocator.py measures it)
    # train and eval, fp32 and bf16 each compile the forward again; the default limit of 8 falls back to eager
    torch._dynamo.config.recompile_limit = 64
    try:
        args.batches = [int(size) for size in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch {args.batch!r}: give images per step, or sizes joined by commas (16,24,32)")
    args.batch = args.batches[0]
    if args.quick:
        args.rounds, args.num = 3, 8
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {load()}")
    print("command: python " + " ".join(sys.argv))
    preset_speeds(args)
    if args.samplers:
        sampler_table(args)


if __name__ == "__main__":
    main()
