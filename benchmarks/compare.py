"""Our small presets against diffusers' UNet2DModel, side by side in one process, at the same parameter
count (within 5%) and resolution: small28 on 1x28x28 and small32 on 3x32x32.

For each model and precision (fp32, bf16 autocast) it prints:
  - training images/s: one step = forward, MSE loss, backward, AdamW step (the same fused AdamW for both);
  - sampling-forward images/s: one denoiser call under torch.inference_mode, as a sampler makes it;
  - achieved GFLOP/s of training: FLOPs counted with torch.utils.flop_counter.FlopCounterMode (convolutions,
    matmuls, attention) divided by the step time, against the peak of a bare 3x3 convolution (forward and
    backward, the best of the models' own widths and resolutions) and of a 2048^3 matmul, both measured in
    this run and in the same precision;
  - the convolutions alone: each model's own convolutions replayed bare, forward and backward, with the
    step's shapes, layouts and dtypes. Their share of the step is what everything else costs; the step's
    FLOPs over their time is the highest GFLOP/s any implementation of that layout could reach here;
  - peak training memory: the growth of the process's peak resident set (getrusage ru_maxrss) over a few
    training steps, measured in a fresh subprocess per model and precision, so one model's allocations
    cannot hide another's. It counts activations, gradients, optimizer state and allocator slack.

Timing interleaves the models round by round and reports medians, and each ratio is the median of the
per-round ratios, so a load change on a shared machine hits both sides of a ratio alike. Both sides run
in one process where glibc's malloc keeps freed blocks for reuse, as the CLI sets it
(`diffunet.allocator.keep_freed_memory`); --default-malloc leaves malloc alone.

The diffusers "twin" has our layout block for block (ResnetBlock2D with scale-shift, the same widths,
blocks per level, groups and one attention head in the middle); only the implementation differs. With
--default-layout the table also gets diffusers' usual layout (attention blocks at the lower levels,
8-channel heads), resized to our parameter count.

    pip install -e '.[bench]'                  # diffusers is needed only here
    python benchmarks/compare.py               # both shapes, fp32 and bf16: about 10 minutes on 2 cores
    python benchmarks/compare.py --quick       # fewer rounds, for a smoke test
    python benchmarks/compare.py --shapes 28 --precisions bf16 --rounds 20 --default-layout
    python benchmarks/compare.py --device cuda --precisions fp32,bf16 --compile   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from common import bench_device, interleaved, load  # noqa: E402  (benchmarks/common.py)
from diffunet import UNet, UNetConfig  # noqa: E402
from diffunet.allocator import keep_freed_memory  # noqa: E402

DEVICE = torch.device("cpu")   # --device; set once in main()
SHAPES = {"28": (UNetConfig.small28, (1, 28, 28)), "32": (UNetConfig.small32, (3, 32, 32))}
T = 1000   # timesteps drawn for the inputs


# ---- models ----
def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
        return True
    except ImportError:
        return False


class DiffusersDenoiser(torch.nn.Module):
    """UNet2DModel called as model(x, t) -> Tensor, like ours."""

    def __init__(self, **kwargs):
        super().__init__()
        from diffusers import UNet2DModel
        self.unet = UNet2DModel(**kwargs)

    def forward(self, x, t):
        return self.unet(x, t).sample


def diffusers_twin(cfg: UNetConfig, size: int) -> DiffusersDenoiser:
    """UNet2DModel with our layout: plain resnet blocks, attention only in the middle, FiLM time injection."""
    levels = len(cfg.widths)
    return DiffusersDenoiser(
        sample_size=size, in_channels=cfg.in_channels, out_channels=cfg.in_channels, block_out_channels=cfg.widths,
        layers_per_block=cfg.num_res_blocks, down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels, norm_num_groups=cfg.norm_groups, add_attention=cfg.mid_attention,
        attention_head_dim=cfg.widths[-1] // cfg.num_heads, resnet_time_scale_shift="scale_shift")


def diffusers_default_layout(cfg: UNetConfig, size: int, target: int) -> DiffusersDenoiser:
    """UNet2DModel's own layout (attention at every level but the first, 8-channel heads), three levels,
    with base width and blocks per level picked to land closest to `target` parameters."""
    def build(base, blocks):
        return DiffusersDenoiser(
            sample_size=size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            block_out_channels=(base, 2 * base, 2 * base), layers_per_block=blocks,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    def distance(candidate):
        with torch.device("meta"):                       # count parameters without initialising them
            return abs(count_parameters(build(*candidate)) - target)
    base, blocks = min(((base, blocks) for base in range(16, 129, 8) for blocks in (1, 2)), key=distance)
    return build(base, blocks)


def build_model(kind: str, shape: str) -> torch.nn.Module:
    preset, (channels, height, _) = SHAPES[shape]
    cfg = preset()
    torch.manual_seed(0)
    if kind == "ours":
        return UNet(cfg).to(DEVICE)
    if kind == "diffusers":
        return diffusers_twin(cfg, height).to(DEVICE)
    return diffusers_default_layout(cfg, height, count_parameters(UNet(cfg))).to(DEVICE)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- one training step and one sampling call ----
def make_batch(shape: str, batch: int):
    _, image = SHAPES[shape]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *image, generator=generator)
    t = torch.randint(0, T, (batch,), generator=generator)
    return x.to(DEVICE), t.to(DEVICE), torch.randn(x.shape, generator=generator).to(DEVICE)


def trainer(model: torch.nn.Module, shape: str, batch: int, bf16: bool, compiled: bool = False):
    """A closure that runs one training step: forward, MSE loss, backward, AdamW step."""
    x, t, target = make_batch(shape, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model, dynamic=False) if compiled else model
    model.train()

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, t)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sampler_call(model: torch.nn.Module, shape: str, batch: int, bf16: bool, compiled: bool = False):
    """A closure that runs the denoiser once as a sampler does: eval mode, inference_mode."""
    x, t, _ = make_batch(shape, batch)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def call():
        model.eval()
        with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            forward(x, t)
    return call


def convs_alone(model: torch.nn.Module, shape: str, batch: int, bf16: bool):
    """A closure that runs only the model's convolutions, forward and backward, as one training step
    runs them: the same shapes, strides, memory layouts and dtypes, and an input gradient only where the
    step needs one. Its time is the floor of any implementation of this layout on this machine: the step
    with every norm, activation, addition, concatenation and the optimizer for free."""
    x, t, _ = make_batch(shape, batch)
    seen = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: seen.append((module, inputs[0])))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    try:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            model(x, t)                                  # one forward, to see each convolution's input
    finally:
        for hook in hooks:
            hook.remove()
    convs = []
    for module, seen_input in seen:
        conv = copy.deepcopy(module).to(seen_input.dtype)   # keeps the weights' memory format
        layout = (torch.channels_last if seen_input.is_contiguous(memory_format=torch.channels_last)
                  and not seen_input.is_contiguous() else torch.contiguous_format)
        bare_input = torch.randn(seen_input.shape, dtype=seen_input.dtype, device=DEVICE).contiguous(
            memory_format=layout).requires_grad_(seen_input.requires_grad)
        convs.append((conv, bare_input))
    outputs = [conv(bare_input) for conv, bare_input in convs]
    grads = [torch.ones_like(output) for output in outputs]

    def step():
        torch.autograd.backward([conv(bare_input) for conv, bare_input in convs], grads)
    return step


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of theirs_time / ours_time: the speed-up of ours, paired round by round."""
    return statistics.median(b / a for a, b in zip(ours, theirs))


# ---- peaks of bare operations ----
def conv_peak(widths_and_sides, batch: int, bf16: bool, rounds: int) -> tuple[float, str]:
    """Best GFLOP/s of a bare 3x3 conv (forward + both backward products), channels_last, weights and
    input already in the precision's dtype (no autocast casts), over the models' widths and sides."""
    best, best_name = 0.0, ""
    for channels, side in widths_and_sides:
        dtype = torch.bfloat16 if bf16 else torch.float32
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(DEVICE, dtype, memory_format=torch.channels_last)
        x = torch.randn(batch, channels, side, side, dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last)
        x.requires_grad_()

        def step():
            y = conv(x)
            y.backward(torch.ones_like(y))
        step()
        flops = count_flops(step)
        seconds = min(interleaved({"conv": step}, rounds, DEVICE)["conv"])
        if flops / seconds / 1e9 > best:
            best, best_name = flops / seconds / 1e9, f"{channels}->{channels} at {side}x{side}"
    return best, best_name


def matmul_peak(bf16: bool, rounds: int, n: int = 2048) -> float:
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
    a @ b
    return 2 * n**3 / min(interleaved({"mm": lambda: a @ b}, rounds, DEVICE)["mm"]) / 1e9


# ---- peak memory, in a fresh process per model ----
def memory_probe(kind: str, shape: str, batch: int, bf16: bool, threads: int) -> dict:
    """Run in a child process: peak resident set during 3 training steps minus the resident set before
    them, in MiB. The child runs with a fixed malloc mmap threshold, so freed tensors leave the resident
    set at once and the peak follows live memory; the kernel's peak counter is reset before the steps.
    On CUDA: the peak of the caching allocator's allocated bytes over the steps, less the bytes before."""
    torch.set_num_threads(threads)
    model = build_model(kind, shape)
    step = trainer(model, shape, batch, bf16)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        for _ in range(3):
            step()
        torch.cuda.synchronize(DEVICE)
        peak = torch.cuda.max_memory_allocated(DEVICE)
        return {"train_mib": (peak - before) / 2**20, "process_mib": peak / 2**20}
    reset = _reset_peak_rss()
    before = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        step()
    after = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"train_mib": (after - before) / 1024, "process_mib": after / 1024}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible (non-Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1])


def measure_memory(kind: str, shape: str, batch: int, bf16: bool, threads: int) -> dict:
    spec = json.dumps({"kind": kind, "shape": shape, "batch": batch, "bf16": bf16, "threads": threads,
                       "device": str(DEVICE)})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}   # glibc: large blocks always mmapped, freed at once
    result = subprocess.run([sys.executable, __file__, "--memory-probe", spec], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the table ----
def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "no avx512"


def run_shape(shape: str, kinds: list[str], precisions: list[str], args) -> list[dict]:
    preset, (channels, side, _) = SHAPES[shape]
    cfg = preset()
    models = {kind: build_model(kind, shape) for kind in kinds}
    ours_parameters = count_parameters(models["ours"])
    for kind, model in models.items():
        mismatch = abs(count_parameters(model) - ours_parameters) / ours_parameters
        if mismatch > 0.05:
            raise SystemExit(f"{kind} has {count_parameters(model):,} parameters, {mismatch:.1%} away from ours")
    rows = []
    sides = [side // 2**i for i in range(len(cfg.widths))]
    for precision in precisions:
        bf16 = precision == "bf16"
        peak_conv, peak_shape = conv_peak(list(zip(cfg.widths, sides)), args.batch, bf16, args.rounds)
        peak_mm = matmul_peak(bf16, args.rounds)
        print(f"  {shape} {precision}: bare 3x3 conv peak {peak_conv:.0f} GFLOP/s ({peak_shape}), "
              f"matmul {peak_mm:.0f} GFLOP/s  [{load()}]", flush=True)
        names = list(kinds) + (["ours+compile"] if args.compile else [])
        train, sample, compile_seconds = {}, {}, {}
        for name in names:
            model = models[name.split("+")[0]]
            train[name] = trainer(model, shape, args.batch, bf16, compiled="compile" in name)
            sample[name] = sampler_call(model, shape, args.batch, bf16, compiled="compile" in name)
            start = time.perf_counter()
            train[name](), sample[name]()            # warm-up (and compilation)
            compile_seconds[name] = time.perf_counter() - start
            train[name](), sample[name]()
        alone = {f"{kind} convs": convs_alone(models[kind], shape, args.batch, bf16) for kind in kinds}
        flops = {name: count_flops(train[name]) for name in kinds}
        flops["ours+compile"] = flops["ours"]
        train_times = interleaved({**train, **alone}, args.rounds, DEVICE)
        sample_times = interleaved(sample, args.rounds, DEVICE, repeats=2)
        for name in names:
            memory = (measure_memory(name, shape, args.batch, bf16, torch.get_num_threads())
                      if args.memory and "+" not in name else None)
            train_s = statistics.median(train_times[name])
            rows.append({
                "shape": f"{channels}x{side}x{side}", "model": name if name != "ours" else f"ours ({preset.__name__})",
                "kind": name, "parameters": count_parameters(models[name.split("+")[0]]), "precision": precision,
                "batch": args.batch, "train_img_s": args.batch / train_s,
                "train_best_img_s": args.batch / min(train_times[name]),
                "sample_img_s": args.batch / statistics.median(sample_times[name]),
                "train_ratio": median_ratio(train_times[name], train_times["diffusers"]) if "diffusers" in train else None,
                "sample_ratio": median_ratio(sample_times[name], sample_times["diffusers"]) if "diffusers" in sample else None,
                "gflop_per_image": flops[name] / args.batch / 1e9, "gflop_s": flops[name] / train_s / 1e9,
                "convs_alone_s": statistics.median(train_times[name.split("+")[0] + " convs"]),
                "conv_peak": peak_conv, "matmul_peak": peak_mm, "first_call_s": compile_seconds[name],
                "memory": memory})
        print(f"  {shape} {precision}: measured  [{load()}]", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    base = {(r["shape"], r["precision"]): r for r in rows if r["kind"] == "diffusers"}
    print("\n| shape | model | params | prec | train img/s (best) | train x diffusers | sample-fwd img/s | "
          "sample x diffusers | GFLOP/img | train GFLOP/s | % conv peak | convs alone: % of step | "
          "convs alone: % conv peak | % matmul peak | train mem MiB | mem x diffusers |")
    print("|" + "---|" * 16)
    for r in rows:
        memory, reference = r["memory"], base.get((r["shape"], r["precision"]))
        mem = f"{memory['train_mib']:.0f}" if memory else "-"
        mem_ratio = (f"{memory['train_mib'] / reference['memory']['train_mib']:.2f}"
                     if memory and reference and reference["memory"] else "-")
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"   # noqa: E731
        print(f"| {r['shape']} | {r['model']} | {r['parameters'] / 1e6:.3f} M | {r['precision']} | "
              f"{r['train_img_s']:.1f} ({r['train_best_img_s']:.1f}) | {ratio(r['train_ratio'])} | "
              f"{r['sample_img_s']:.0f} | {ratio(r['sample_ratio'])} | {r['gflop_per_image']:.3f} | "
              f"{r['gflop_s']:.0f} | {100 * r['gflop_s'] / r['conv_peak']:.0f}% | "
              f"{100 * r['convs_alone_s'] * r['train_img_s'] / r['batch']:.0f}% | "
              f"{100 * r['gflop_per_image'] * r['batch'] / r['convs_alone_s'] / r['conv_peak']:.0f}% | "
              f"{100 * r['gflop_s'] / r['matmul_peak']:.0f}% | {mem} | {mem_ratio} |")
    compiled = [r for r in rows if "compile" in r["kind"]]
    for r in compiled:
        print(f"\n{r['shape']} {r['precision']}: torch.compile's first training step + sampling call took "
              f"{r['first_call_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="28,32", help="comma-separated: 28 (1x28x28, small28), 32 (3x32x32, small32)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--batch", type=int, default=64, help="images per training step and per sampling call")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per model (medians are reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd ours (slow to compile)")
    parser.add_argument("--default-layout", action="store_true", help="also time diffusers' default block layout")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="3 rounds, for a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--default-malloc", dest="malloc", action="store_false",
                        help="leave glibc's malloc as it is, instead of keep_freed_memory() as the CLI does")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = bench_device(json.loads(args.memory_probe)["device"] if args.memory_probe else args.device)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.memory_probe:
        spec = json.loads(args.memory_probe)
        print(json.dumps(memory_probe(spec["kind"], spec["shape"], spec["batch"], spec["bf16"], spec["threads"])))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc:
        keep_freed_memory()                # as the CLI does (benchmarks/allocator.py measures it)
    # each shape, precision and train/eval mode compiles again; the default limit of 8 falls back to eager
    torch._dynamo.config.recompile_limit = 64
    if args.quick:
        args.rounds = 3
    kinds = ["ours"]
    if diffusers_available():
        kinds += ["diffusers"] + (["diffusers-default"] if args.default_layout else [])
    else:
        print("diffusers is not installed (pip install -e '.[bench]'): measuring ours only, no ratios.")
    where = (f"GPU: {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda"
             else f"{torch.get_num_threads()} threads, CPU: {cpu_flags()}")
    print(f"torch {torch.__version__}, {where}; batch {args.batch}, "
          f"{args.rounds} rounds; {load()}")
    print("command: python " + " ".join(sys.argv))
    rows = []
    shapes = args.shapes.split(",")
    for shape in shapes:
        rows += run_shape(shape, kinds, args.precisions.split(","), args)
        if len(shapes) > 1 and shape != shapes[-1]:
            print_table(rows)              # so far: a run cut short still leaves its figures
    print_table(rows)
    print(f"\n{load()} at the end. img/s are medians over rounds (best round in brackets); ratios are medians of "
          f"per-round ratios. train mem = growth of peak " + ("allocated GPU memory" if DEVICE.type == "cuda" else "RSS")
          + " over 3 training steps in a fresh process.")


if __name__ == "__main__":
    main()
