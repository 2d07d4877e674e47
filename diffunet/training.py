"""Train a denoiser: `TrainConfig` and `train(cfg)`, one loop that reads top to bottom.

The same code runs on one CPU, one GPU, or many processes under `torchrun` (DistributedDataParallel,
gloo on CPU and nccl on CUDA; rank 0 alone writes files). A run killed at any moment and resumed
with `--resume` ends with bit-identical weights on CPU: the data order, the noise and the learning
rate are all functions of the step and of RNG states saved in the checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import samplers
from samplers import NoiseSchedule

from . import __version__, direct, tasks
from .checkpoint import (capture_rng_states, load_training_state, restore_rng_states, save_model,
                         save_training_state)
from .data import ImageData
from .images import make_grid, save_image, to_model_range, to_uint8
from .ema import POWER_EMA_MAX_STD, ema_copy, ema_decay, ema_update, power_ema_decay, power_ema_exponent
from .errors import CheckpointError, UserError
from .generate import generate
from .loss import PREDICTIONS, TIMESTEP_DISTRIBUTIONS, WEIGHTINGS, training_loss
from .run import check_continues, make_run_config, run_guidance, stored_model_fields, stored_train_config
from .runlog import MetricsLog
from .unet import PRESETS, UNet, UNetConfig


PROBE_STEPS = (10, 60)  # --minutes: the time per step is measured between these steps (inside the default warmup:
                        # the learning rate does not depend on the step count there)
FORWARD_SHARE = 1 / 3   # a sampling forward per image costs about a third of a training step's (forward + backward
                        # ~ 3 forwards; benchmarks/train_speed.py: 216 train vs 647 sample-forward img/s, small32 fp32)


def _named(field: str) -> str:
    """A TrainConfig field as errors name it, for Python and command-line users alike: "lr (--lr)"."""
    return f"{field} (--{field.replace('_', '-')})"


@dataclass(frozen=True)
class TrainConfig:
    data: str = "builtin"               # builtin (shipped MNIST subset) | mnist | fashion-mnist | PATH
    out: str = "runs/default"           # run folder: checkpoints, grids, metrics
    preset: str = "auto"                # auto (from the data: see choose_preset) | a diffunet.PRESETS name; --model-* override
    image_size: int | None = None       # resize + centre-crop folder images; None keeps the native size
    channels: int | None = None         # 1 or 3; None = what the data has
    alpha_background: int = 0           # gray level (0 black .. 255 white) that transparent images are composited on
    steps: int = 1500                   # optimizer steps (1500 x 32 = 48k images: a median of 4.3 minutes over 3 seeds
                                        # on a 2-core AVX-512 EPYC restricted to AVX2 in fp32, 2.7 in bf16; 2000 x 32
                                        # beat 1000 x 64 at the same images)
    minutes: float | None = None        # train for about this many minutes instead: `steps` is fixed from the
                                        # speed of steps 10-60 and stored (minutes -> None), so resume stays exact
    batch_size: int = 32                # images per step per process (before gradient accumulation)
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 3e-3                    # peak AdamW learning rate (with adam_beta2 0.99: Fashion-MNIST's strict FD
                                        # 2.75/1.78/2.52x -> 2.06/1.46/2.10x over 3 seeds, MNIST a tie with 2e-3
                                        # and 0.999; benchmarks/README.md, "AdamW for short runs")
    warmup_steps: int = 100             # linear warmup from 0 to lr
    lr_schedule: str = "cosine"         # cosine (to 0 at `steps`) | constant, after warmup
    weight_decay: float = 0.0           # AdamW decoupled weight decay
    adam_beta2: float = 0.99            # AdamW second-moment decay; lower adapts faster in short runs (0.999
                                        # averages over ~1000 steps, most of a 1500-step run)
    grad_clip: float = 1.0              # max global gradient norm; 0 disables clipping
    ema: str = "exponential"            # the EMA that samples use: exponential | power (Karras et al. 2024, EDM2)
    ema_max_decay: float = 0.999        # exponential: cap on the warm-up decay (1+t)/(10+t), which reaches 0.999
                                        # at step 8990; a 2000-step run ends at 0.9955 (see diffunet.ema.ema_decay)
    ema_warmup: bool = True             # exponential: ramp the decay up as (1+t)/(10+t) (TensorFlow's num_updates
                                        # rule, Ho et al. 2020); False: ema_max_decay from the first step
    ema_std: float = 0.1                # power: sigma_rel, the averaging window's std as a fraction of the steps
                                        # so far (EDM2: 0.05-0.10); 0.1 ends a 2000-step run at decay 0.9960
    schedule: str = "rectified_flow"    # path: rectified_flow (alpha = 1 - t, sigma = t) | linear | cosine | sigmoid (VP);
                                        # the flow wins on Fashion-MNIST and ties on MNIST at 5x fewer calls (benchmarks/README.md)
    flow_shift: float = 1.0             # rectified_flow: SD3 shift of the sampling grid (Esser et al. 2024, eq. 23)
    num_timesteps: int = 1000           # T, diffusion steps
    zero_terminal_snr: bool = False     # rescale so alpha_bar[T-1] = 0 (Lin et al. 2024); needs v or x0
    prediction: str = "flow"            # what the network predicts: flow (the velocity, eps - x0 on the flow) | eps | x0 | v
    loss_weighting: str = "none"        # none (plain v-MSE: far better bits/dim, same FD) | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0          # gamma of min-SNR weighting
    timestep_sampling: str = "logit_normal"  # logit_normal (SD3) | uniform t | lognormal log-SNR (Karras et al. 2022)
    logsnr_mean: float = 1.0            # lognormal: mean of the training log-SNR (EDM's P_mean for std-1 data)
    logsnr_std: float = 2.4             # lognormal: its standard deviation (EDM's 2 x P_std)
    logit_mean: float = 0.0             # logit_normal: mean of logit(t / T) (SD3's rf/lognorm(0, 1))
    logit_std: float = 1.0              # logit_normal: its standard deviation
    flip: bool = False                  # random horizontal flips (off for digits and text, on for faces, emoji, ...)
    class_conditional: bool = True      # use labels when the data has them
    label_dropout: float = 0.1          # probability of dropping a label (trains the guidance branch)
    task: str = "none"                  # image to image (diffunet/tasks.py): none | superres:F | inpaint | colorize
    objective: str = "diffusion"        # diffusion | direct: no noise, the network maps the condition to the target
                                        # with a per-pixel loss and overlap-tile padding (diffunet/direct.py); needs a task
    data_cond: str | None = None        # your own aligned pairs: a folder with inputs/ and targets/, or an .npz
    cond_dropout: float = 0.0           # probability of zeroing an example's condition (trains condition guidance)
    border_weight: float = 0.0          # direct runs with mask targets: w0 of the 2015 weight map on the cross-entropy
                                        # (Ronneberger et al. 2015, eq. 2; the paper's 10); 0 = unweighted
    precision: str = "auto"             # auto (bf16 where the CPU/GPU has native bf16, else fp32) | fp32 | bf16
    compile: bool = False               # torch.compile the model for training
    device: str = "auto"                # auto | cpu | cuda | mps
    seed: int = 0                       # seeds the model init, data order, noise and samples
    log_every: int = 25                 # steps between metrics-log rows
    save_every: int = 250               # steps between resumable checkpoints
    sample_every: int = 500             # steps between sample grids (also written at the end)
    num_samples: int = 64               # images in each grid
    sampler: str = "heun"               # grids, `sample` and `eval`: heun | dpmpp_2m | ddpm | ddim | euler
    sample_steps: int = 10              # sampler steps (heun: 2 model calls a step but the first and last, 18;
                                        # MNIST, guidance 1.2: FD 1.79-1.81x the floor, dpmpp_2m 10 calls 1.73-1.84x)
    guidance: float = 1.2               # classifier-free guidance of grids, `sample` and `eval` (1.0: none; 1.2 took
                                        # the strict FD from 2.1-2.4x to 1.1-1.3x on MNIST; > 1.5: bolder, less varied);
                                        # needs label_dropout > 0 (else 1.0 is used)
    quiet: bool = False                 # no progress bar
    resume: bool = False                # continue the run in `out` if it has a training state

    def __post_init__(self):
        choices = {"lr_schedule": ("cosine", "constant"), "schedule": ("linear", "cosine", "sigmoid", "rectified_flow"),
                   "prediction": PREDICTIONS, "loss_weighting": WEIGHTINGS, "timestep_sampling": TIMESTEP_DISTRIBUTIONS,
                   "precision": ("auto", "fp32", "bf16"), "device": ("auto", "cpu", "cuda", "mps"),
                   "sampler": tuple(samplers.SAMPLERS), "preset": ("auto", *PRESETS), "ema": ("exponential", "power")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_named(name)} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        positive = ("steps", "batch_size", "grad_accum", "num_timesteps", "log_every", "save_every",
                    "sample_every", "num_samples", "sample_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{_named(name)} must be positive; got {getattr(self, name)}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"{_named('minutes')} must be a positive number of minutes; got {self.minutes}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"{_named('image_size')} must be positive; got {self.image_size}")
        if not 0 <= self.alpha_background <= 255:
            raise ValueError(f"{_named('alpha_background')} must be a gray level in 0..255 (0 black, 255 white); "
                             f"got {self.alpha_background}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"{_named('channels')} must be 1 or 3; got {self.channels}")
        for name in ("lr", "weight_decay", "adam_beta2", "grad_clip", "ema_max_decay", "ema_std", "min_snr_gamma",
                     "logsnr_mean", "logsnr_std", "logit_mean", "logit_std", "flow_shift", "label_dropout", "guidance"):
            if not math.isfinite(getattr(self, name)):  # nan or inf, e.g. --lr 1e999
                raise ValueError(f"{_named(name)} must be a finite number; got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.ema_max_decay < 1 and 0 <= self.label_dropout < 1):
            raise ValueError(f"need {_named('lr')} > 0 and {_named('ema_max_decay')} and {_named('label_dropout')} "
                             f"in [0, 1); got {self.lr}, {self.ema_max_decay} and {self.label_dropout}")
        if not 0 < self.ema_std < POWER_EMA_MAX_STD:
            raise ValueError(f"{_named('ema_std')} must be in (0, {POWER_EMA_MAX_STD:.4f}) (EDM2 uses 0.05-0.10); "
                             f"got {self.ema_std}")
        for name in ("logsnr_std", "logit_std", "flow_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_named(name)} must be positive; got {getattr(self, name)}")
        if self.schedule == "rectified_flow" and (self.prediction == "eps" or self.zero_terminal_snr):
            raise ValueError(f"{_named('schedule')} rectified_flow reaches pure noise at t = 1000, where eps gives no "
                             f"x0: use {_named('prediction')} flow, v or x0 (and no {_named('zero_terminal_snr')}), "
                             f"or a VP {_named('schedule')} such as linear")
        if self.schedule == "rectified_flow" and self.num_timesteps != 1000:
            raise ValueError(f"{_named('num_timesteps')} is for VP schedules: rectified_flow's model time is always "
                             f"1000 tau (set {_named('sample_steps')} for fewer steps); got {self.num_timesteps}")
        if not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"{_named('adam_beta2')} must be in [0, 1); got {self.adam_beta2}")
        if self.lr > 1e3 or not 0 <= self.lr * self.weight_decay < 1:  # AdamW overflows float32, or flips weights
            raise ValueError(f"need {_named('lr')} <= 1000 and 0 <= lr x {_named('weight_decay')} < 1 (AdamW scales "
                             f"the weights by "
                             f"1 - lr * weight_decay each step); got {self.lr} and {self.weight_decay}")
        for name in ("warmup_steps", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_named(name)} must be >= 0 (0 disables it); got {getattr(self, name)}")
        if self.sample_steps > self.num_timesteps:  # found now, not at the first grid after hours of training
            raise ValueError(f"{_named('sample_steps')} must be at most {_named('num_timesteps')} "
                             f"({self.num_timesteps}); "
                             f"got {self.sample_steps}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"{_named('seed')} must be in 0..{2**32 - 1}; got {self.seed}")
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError(f"{_named('zero_terminal_snr')} needs {_named('prediction')} v or x0 (eps is undefined "
                             f"at SNR 0)")
        task = tasks.parse_task(self.task, self.data_cond)  # a bad --task is refused now, before the data loads
        if self.objective not in direct.OBJECTIVES:
            raise ValueError(f"{_named('objective')} must be one of {', '.join(direct.OBJECTIVES)}; "
                             f"got {self.objective!r}")
        if self.objective == "direct" and task.kind == "none":
            raise ValueError(f"{_named('objective')} direct maps a condition image to its target: give "
                             f"{_named('task')} (superres:F, inpaint, colorize) or {_named('data_cond')} pairs")
        if not (math.isfinite(self.cond_dropout) and 0 <= self.cond_dropout < 1):
            raise ValueError(f"{_named('cond_dropout')} must be in [0, 1); got {self.cond_dropout}")
        if not (math.isfinite(self.border_weight) and self.border_weight >= 0) or \
                (self.border_weight > 0 and self.objective != "direct"):
            raise ValueError(f"{_named('border_weight')} must be a number >= 0 and weights the cross-entropy of "
                             f"{_named('objective')} direct (Ronneberger et al. 2015, eq. 2); got {self.border_weight} "
                             f"with objective {self.objective}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 0 at cfg.steps (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_schedule(cfg: TrainConfig) -> NoiseSchedule:
    """The noise schedule named by the config."""
    if cfg.schedule == "rectified_flow":
        return NoiseSchedule.rectified_flow(cfg.flow_shift)
    schedule = getattr(NoiseSchedule, cfg.schedule)(cfg.num_timesteps)
    return schedule.rescale_zero_terminal_snr() if cfg.zero_terminal_snr else schedule


def choose_preset(image_shape: tuple[int, ...]) -> tuple[str, str]:
    """`--preset auto`: (preset name, why) for [C, H, W] images. Gray images get small28 (built for 28x28;
    it runs at any size divisible by 4), colour up to 40 pixels small32, larger colour small64."""
    channels, height, width = image_shape
    size = max(height, width)
    if channels == 1:
        return "small28", f"gray {height}x{width} images: small28 (sized for 28x28 on a CPU)"
    if size <= 40:
        return "small32", f"colour {height}x{width} images: small32 (sized for 32x32 on a CPU)"
    return "small64", f"colour {height}x{width} images: small64 (sized for 64x64 on a CPU)"


def model_config(cfg: TrainConfig, data: ImageData, overrides: dict | None = None,
                 cond_channels: int = 0) -> UNetConfig:
    """The preset (chosen from the data for "auto"), sized to the data's channels and classes and to the
    task's condition (`cond_channels`), with user overrides applied."""
    num_classes = data.num_classes if cfg.class_conditional else None
    fields = {"in_channels": data.images.shape[1], "num_classes": num_classes, "cond_channels": cond_channels,
              **(overrides or {})}
    preset = choose_preset(tuple(data.images.shape[1:]))[0] if cfg.preset == "auto" else cfg.preset
    config = PRESETS[preset](**fields)
    channels = data.images.shape[1]
    if config.in_channels != channels or (config.out_channels or channels) != channels:
        raise UserError(f"the data has {channels} channel(s) but the model takes {config.in_channels} and predicts "
                        f"{config.out_channels or config.in_channels}; drop --model-in-channels/--model-out-channels "
                        f"or convert the data with --channels")
    if not config.time_conditional or config.cond_channels != cond_channels or config.padding != "same":
        raise UserError(f"a denoiser needs time_conditional=True, cond_channels={cond_channels} (from --task) and "
                        f"padding='same'; the {cfg.preset} "
                        f"preset with these --model-* flags has {config.time_conditional}, {config.cond_channels} "
                        f"and {config.padding!r}. Change the flags or the --preset")
    return config


def batch_indices(num_images: int, global_batch: int, position: int, seed: int) -> torch.Tensor:
    """Indices of the `position`-th global batch: epochs of seeded permutations, last partial batch dropped."""
    per_epoch = num_images // global_batch
    if per_epoch == 0:
        raise UserError(f"the dataset has {num_images} images, fewer than one batch of {global_batch}; "
                        f"lower {_named('batch_size')}")
    epoch, offset = divmod(position, per_epoch)
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return permutation[offset * global_batch:(offset + 1) * global_batch]


def resume_config(out: str | Path, **changes) -> TrainConfig:
    """The TrainConfig of the run in `out`, with `changes` (e.g. steps=4000) and resume=True: continue a
    run with its own settings, `train(resume_config("runs/a", steps=4000))`. A field the run predates
    takes its default; with no run in `out` yet this is TrainConfig(out=out, resume=True, **changes)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    stored = {k: v for k, v in stored_train_config(out).items() if k in known}
    return TrainConfig(**{**stored, **changes, "out": str(out), "resume": True})


def pick_device(name: str) -> torch.device:
    """Resolve --device auto to cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{_named('device')} must be auto, cpu, cuda, cuda:N or mps; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{_named('device')} {name} was asked for but CUDA is not available; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{_named('device')} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of those")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{_named('device')} {name} was asked for but MPS is not available; use cpu")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for --precision bf16, or for auto where the hardware has native bf16.

    On this project's 2-core AMX CPU, bf16 trains small28 1.8x faster than fp32 with the same final
    loss and bits/dim (see benchmarks/README.md); without native bf16 it would be slower, so auto keeps fp32.
    """
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world_size, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return rank, world, device


def train(cfg: TrainConfig, model_overrides: dict | None = None) -> Path:
    """Train a denoiser as `cfg` says; returns the run folder.

    With cfg.resume and a training state in cfg.out, continues that run with the stored architecture
    (`model_overrides` on top) and refuses, with a CheckpointError naming the field, a config whose
    model, schedule, prediction or image shape differs from the run's. `resume_config(out)` gives the
    run's own TrainConfig.
    """
    out = Path(cfg.out)
    started = time.perf_counter()                 # --minutes counts from here: data loading included
    rank, world, device = setup_distributed(pick_device(cfg.device))
    state = _resume_state(cfg, out, world)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    # Data: one uint8 tensor in memory; batches are sliced from it, not decoded per step.
    # A task run (--task, --data-cond) also has a condition per image: derived from it, or the user's `paired` input.
    task, data, paired = tasks.load_task_data(cfg, progress=not cfg.quiet and rank == 0)
    images = data.images
    labels = data.labels if cfg.class_conditional else None
    if state is not None:  # continue the stored architecture; overrides that change it are refused below
        cond_field = {"cond_channels": task.cond_channels} if cfg.objective == "diffusion" else {}  # direct: an input
        model_overrides = {**stored_model_fields(out), **cond_field, **(model_overrides or {})}
    if cfg.objective == "direct":  # the condition is the network's input; no time, no labels
        model_cfg = direct.model_config(cfg.preset, images.shape[1], task.cond_channels, model_overrides)
    else:
        model_cfg = model_config(cfg, data, model_overrides, task.cond_channels)
    schedule = make_schedule(cfg)
    run_config = make_run_config(model_cfg, schedule, cfg.prediction, cfg.to_dict(), images.shape[1:], data.name,
                                 task.to_dict())
    if cfg.preset == "auto":  # say what was chosen and why, in config.json and on the console
        run_config["preset_choice"] = choose_preset(tuple(images.shape[1:])) if cfg.objective == "diffusion" else \
            (direct.PRESET, f"--objective direct: {direct.PRESET} (trained directly, Ronneberger et al. 2015)")
        if rank == 0 and not cfg.quiet:
            print(f"--preset auto: {run_config['preset_choice'][1]}", flush=True)
    preview = tasks.preview(task, images, paired, labels, cfg.seed) if task.kind != "none" else None
    if state is not None:
        check_continues(out, run_config)  # same architecture, schedule, prediction and image shape

    # Model, EMA copy and optimizer.
    model = UNet(model_cfg).to(device)
    ema = ema_copy(model)
    gamma = power_ema_exponent(cfg.ema_std) if cfg.ema == "power" else None  # the power EMA's exponent
    if world > 1:  # the weights above are the same on every rank; dropout (the global RNG) differs per rank
        torch.manual_seed(_rank_seed(cfg.seed, rank))
    optimizer = make_optimizer(model.parameters(), cfg, device)
    noise_generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    step, saved_step = 0, None  # saved_step: the last checkpoint written, named in error messages
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        load_optimizer_state(optimizer, state["optimizer"])
        noise_generator.set_state(state["rng"]["noise"][rank].clone())  # a row view: see _restore_rank_rng_states
        restore_rng_states(state["rng"])
        _restore_rank_rng_states(state["rng"], rank, device)
        step = saved_step = int(state["step"])
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    forward = torch.compile(ddp_model) if cfg.compile else ddp_model
    bf16 = use_bf16(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    for stale in out.glob(".*.tmp") if rank == 0 else ():  # temp files of writes a killed run left behind
        stale.unlink(missing_ok=True)
    log = MetricsLog(out / "metrics.jsonl", up_to_step=step) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, disable=cfg.quiet or rank != 0, desc="train", unit="step")
    last_time, images_since = time.perf_counter(), 0
    loss_sum, loss_count, probe_times = 0.0, 0, []
    model.train()
    interrupt = _defer_ctrl_c()
    try:
        while step < cfg.steps:
            # One optimizer step: accumulate gradients over micro-batches.
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                position = step * cfg.grad_accum + micro
                index = batch_indices(len(images), cfg.batch_size * world, position, cfg.seed)
                index = index[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                x0 = to_model_range(images[index]).to(device, non_blocking=True)
                if paired is not None:  # the user's inputs ride along as channels, so that a flip mirrors both
                    x0 = torch.cat([x0, to_model_range(paired[index]).to(device, non_blocking=True)], dim=1)
                if cfg.flip:  # each image mirrored with probability 1/2, drawn from the saved generator
                    x0 = random_flip(x0, noise_generator)
                x0, cond = tasks.split_batch(task, x0, noise_generator, cfg.cond_dropout)  # cond: SR3's y, or None
                denoiser = forward if cond is None else tasks.with_condition(forward, cond)
                y = _drop_labels(labels[index], cfg.label_dropout, noise_generator, device) if labels is not None else None
                sync = micro == cfg.grad_accum - 1 or world == 1
                # no_sync spans forward and backward (DDP reads it in both); autocast the forward and loss
                # only, as torch.autocast asks: backward runs each op in the dtype its forward chose.
                with ddp_model.no_sync() if not sync else contextlib.nullcontext():
                    with autocast:
                        if cfg.objective == "direct":  # no noise: a per-pixel loss of the network's map of cond
                            loss = direct.direct_loss(forward, model, cond, x0, cfg.border_weight).mean()
                        else:
                            loss = training_loss(denoiser, x0, schedule, prediction=cfg.prediction,
                                                 weighting=cfg.loss_weighting, min_snr_gamma=cfg.min_snr_gamma,
                                                 timestep_sampling=cfg.timestep_sampling, logsnr_mean=cfg.logsnr_mean,
                                                 logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                                 logsnr_std=cfg.logsnr_std, y=y, generator=noise_generator).mean()
                    (loss / cfg.grad_accum).backward()
                step_loss = step_loss + loss.detach().float() / cfg.grad_accum   # summed on the device
            if world > 1:  # the mean over ranks: all log it, and all stop at the same step when one diverges
                dist.all_reduce(step_loss)
                step_loss = step_loss / world
            step_loss = step_loss.item()  # the one host sync of a step: the divergence check needs the value
            if not math.isfinite(step_loss):
                raise UserError(f"loss became {step_loss} at step {step + 1}; {_kept(out, saved_step, bf16)}")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # EMA weights give visibly cleaner samples; sample from them.
            decay = power_ema_decay(step, gamma) if gamma is not None else \
                ema_decay(step, cfg.ema_max_decay, warmup=cfg.ema_warmup)
            ema_update(ema, model, decay)
            step += 1
            if cfg.minutes is not None and state is None and step in PROBE_STEPS:
                probe_times.append(time.perf_counter())
                if step == PROBE_STEPS[1]:  # fix the step count now, before the cosine decay depends on it
                    cfg = _steps_for_budget(cfg, schedule, started, probe_times, world, device,
                                            guided=bool(model_cfg.num_classes))
                    run_config = {**run_config, "train": cfg.to_dict()}
                    bar.total = cfg.steps
            loss_sum, loss_count = loss_sum + step_loss, loss_count + 1
            images_since += cfg.batch_size * cfg.grad_accum * world
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - last_time
                row = {"step": step, "loss": loss_sum / loss_count, "lr": learning_rate(cfg, step - 1),
                       "images_per_s": images_since / max(elapsed, 1e-9)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                if log is not None:
                    log.add(row)
                    log.plot(out / "loss.png")
                last_time, images_since, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
            if step % cfg.save_every == 0 or step == cfg.steps:
                _check_finite(model, step, out, saved_step, bf16)
                _save(out, rank, world, step, model, ema, optimizer, noise_generator, run_config)
                saved_step = step
            if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
                _sample_grid(cfg, ema, schedule, model_cfg, images.shape[1:], device,
                             out / f"samples_{step:06d}.png", preview)
            if step < cfg.steps and _stop_requested(interrupt, world, device):  # Ctrl-C: save whole steps, stop
                _check_finite(model, step, out, saved_step, bf16)
                _save(out, rank, world, step, model, ema, optimizer, noise_generator, run_config)
                bar.close()
                if rank == 0:
                    print(f"interrupted at step {step}; state saved in {out}. Continue with --resume", flush=True)
                raise KeyboardInterrupt
    finally:
        interrupt["restore"]()
    bar.close()
    if rank == 0 and state is not None and int(state["step"]) == cfg.steps:
        # Resuming a finished run, perhaps killed between its last save and its grid: draw the grid.
        _sample_grid(cfg, ema, schedule, model_cfg, images.shape[1:], device,
                     out / f"samples_{step:06d}.png", preview)
    if world > 1:
        dist.barrier()
    return out


def make_optimizer(parameters, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with cfg's learning rate, weight decay and beta2.

    Fused where this torch has a fused kernel for the device: one kernel for all parameters instead of
    ~6 small ops each (6.1 -> 1.7 ms a step for small28 on CPU). Torch before 2.4 has no CPU kernel and
    refuses fused=True when the optimizer is built; then torch's default loop (foreach on CUDA, one
    tensor at a time on CPU) does the same update. Found by asking torch, not by reading its version.
    """
    parameters = list(parameters)
    options = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2))
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(parameters, fused=True, **options)
        except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
            pass
    return torch.optim.AdamW(parameters, **options)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimizer state but keep this optimizer's kernel choice (fused / foreach): a run saved
    with a fused AdamW resumes on a torch without one. Then give each moment its parameter's layout."""
    kernels = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)
    _match_parameter_layouts(optimizer)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, C, H, W] with each image mirrored left-right with probability 1/2 (draws on the generator's device)."""
    mirror = torch.rand(len(x), generator=generator, device=generator.device) < 0.5
    return torch.where(mirror.to(x.device)[:, None, None, None], x.flip(-1), x)


def _steps_for_budget(cfg: TrainConfig, schedule, started: float, probe_times: list[float], world: int,
                      device: torch.device, guided: bool) -> TrainConfig:
    """The config with `steps` fixed so that the run ends about cfg.minutes after `started`, from the time
    per step between PROBE_STEPS (step 1 pays one-off costs), less the sample grids the run will draw (one every
    sample_every steps and one at the end, each num_samples x the sampler's model calls, guidance doubling the
    batch of a class-conditional model's grids (`guided`), a forward costing FORWARD_SHARE of a step's per-image
    time); minutes -> None. All ranks agree."""
    per_step = (probe_times[1] - probe_times[0]) / (PROBE_STEPS[1] - PROBE_STEPS[0])
    forward_per_image = per_step / (cfg.batch_size * cfg.grad_accum) * FORWARD_SHARE
    grid = cfg.num_samples * samplers.model_calls(cfg.sampler, schedule, cfg.sample_steps) * forward_per_image * \
        (2 if guided and run_guidance(cfg.to_dict()) != 1 else 1)
    remaining = cfg.minutes * 60 - (time.perf_counter() - started) - grid      # the last grid
    more = max(0, int(remaining / (per_step + grid / cfg.sample_every)))      # steps, with a grid every sample_every
    steps = torch.tensor([PROBE_STEPS[1] + more], device=device)
    if world > 1:
        dist.broadcast(steps, src=0)
    return dataclasses.replace(cfg, steps=int(steps.item()), minutes=None)


def _defer_ctrl_c() -> dict:
    """Make Ctrl-C (SIGINT) set flag["requested"], checked between steps, so that no half-done step (noise
    drawn, weights half updated) is ever saved; a second Ctrl-C stops at once. flag["restore"]() undoes it."""
    flag = {"requested": False, "restore": lambda: None}
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return flag

    def handler(signum, frame):
        if flag["requested"]:
            raise KeyboardInterrupt
        flag["requested"] = True

    previous = signal.signal(signal.SIGINT, handler)
    flag["restore"] = lambda: signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    return flag


def _stop_requested(flag: dict, world: int, device: torch.device) -> bool:
    """True once Ctrl-C was pressed on any rank, so that every rank stops after the same step."""
    if world == 1:
        return flag["requested"]
    requested = torch.tensor([int(flag["requested"])], device=device)
    dist.all_reduce(requested, op=dist.ReduceOp.MAX)
    return bool(requested.item())


def _kept(out: Path, saved_step: int | None, bf16: bool) -> str:
    """The end of a divergence message: what is kept, and what to do (fp32 is a remedy only if the run was bf16)."""
    kept = f"the last good checkpoint (step {saved_step}) in {out} is kept" if saved_step is not None \
        else f"no checkpoint was saved in {out} yet"
    fp32 = f" or set {_named('precision')} fp32" if bf16 else ""
    return f"{kept}. Lower {_named('lr')}{fp32}, then resume (--resume)"


def _check_finite(model: torch.nn.Module, step: int, out: Path, saved_step: int | None, bf16: bool) -> None:
    """Refuse to save weights that became inf or NaN (a finite loss does not guarantee finite weights)."""
    if not all(bool(parameter.isfinite().all()) for parameter in model.parameters()):
        raise UserError(f"the weights became inf or nan at step {step} and were not saved; "
                        f"{_kept(out, saved_step, bf16)}")


def _resume_state(cfg: TrainConfig, out: Path, world: int) -> dict | None:
    """The saved training state when resuming; refuses to overwrite a run without --resume, and to
    continue a run on another number of processes (each one's batch share and noise stream are saved)."""
    has_state = (out / "training_state.safetensors").exists()
    if has_state and not cfg.resume:
        raise UserError(f"{out} already holds a training run; set resume to continue it "
                        f"or choose another output folder")
    state = load_training_state(out) if has_state else None
    if state is not None and len(state["rng"]["noise"]) != world:
        saved = len(state["rng"]["noise"])
        raise CheckpointError(f"the run in {out} was trained by {saved} process(es) and cannot continue exactly on "
                              f"{world}: resume it with torchrun --nproc_per_node {saved}"
                              f"{' (or without torchrun)' if saved == 1 else ''}, or start a new run")
    return state


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment its parameter's memory layout (the model is channels_last, the saved
    moments are contiguous): fused AdamW walks parameter, gradient and moments as flat arrays and
    silently mixes elements when their layouts differ."""
    for parameter, moments in optimizer.state.items():
        for name, value in moments.items():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                moments[name] = torch.empty_like(parameter).copy_(value)


def _drop_labels(y: torch.Tensor, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """Replace each label by -1 ("no label") with probability p, so the model learns the guidance branch."""
    y = y.to(device)
    drop = torch.rand(y.shape, generator=generator, device=device) < p
    return torch.where(drop, torch.full_like(y, -1), y)


def _rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of `rank` in a multi-process run: a hash of (seed, rank), so it repeats no
    rank's and no other seed of the run (the noise generators use seed * 1000 + rank)."""
    return int.from_bytes(hashlib.sha256(f"diffunet global rng {seed} {rank}".encode()).digest()[:8], "little")


def _rank_rng_states(noise_generator: torch.Generator, world: int) -> dict:
    """Every rank's own RNG states, each stacked [world, ...]: its noise generator and, with more than one
    rank, its global torch RNG (dropout) on the CPU and on its CUDA device. Called on every rank."""
    device = noise_generator.device
    mine = {"noise": noise_generator.get_state()}
    if world > 1:
        mine["rank_torch"] = torch.get_rng_state()
        if device.type == "cuda":
            mine["rank_cuda"] = torch.cuda.get_rng_state(device)
    every = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    return {key: torch.stack([states[key] for states in every]) for key in mine}


def _restore_rank_rng_states(rng: dict, rank: int, device: torch.device) -> None:
    """Give this rank its own global RNG states back (after restore_rng_states set rank 0's everywhere).
    Each row is cloned: set_state does not honour a row view of the stacked [world, N] states (rank 1 got
    "Invalid mt19937 state", or a segfault, in torch 2.13)."""
    if "rank_torch" in rng:
        torch.set_rng_state(rng["rank_torch"][rank].clone())
    if "rank_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["rank_cuda"][rank].clone(), device)


def _save(out, rank, world, step, model, ema, optimizer, noise_generator, run_config) -> None:
    """Write the resumable state and the EMA model (rank 0 only; every rank's own RNG states are gathered)."""
    rank_states = _rank_rng_states(noise_generator, world)
    if rank != 0:
        return
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "rng": {**capture_rng_states(), **rank_states}}
    save_model(out, ema, {**run_config, "step": step, "diffunet_version": __version__})
    save_training_state(out, state)


@torch.no_grad()
def _sample_grid(cfg, ema, schedule, model_cfg, image_shape, device, path, preview=None) -> None:
    """Sample a grid from the EMA weights (one digit class per column when class-conditional); for a task run,
    rows of conditions, outputs and targets of a few training examples (a `tasks.Preview`)."""
    labels = None
    if model_cfg.num_classes:
        labels = torch.arange(cfg.num_samples) % model_cfg.num_classes
    if preview is not None:
        labels = preview.labels
    if cfg.objective == "direct":  # the network's own output: no sampler
        x0 = direct.predict(ema, preview.cond, image_shape[0])
    else:
        x0 = generate(ema, schedule, len(preview.cond) if preview else cfg.num_samples, tuple(image_shape),
                      sampler=cfg.sampler, steps=cfg.sample_steps, prediction=cfg.prediction, labels=labels,
                      guidance=run_guidance(cfg.to_dict()), seed=cfg.seed, device=device,
                      cond=preview.cond if preview else None)
    rows = preview.grid_rows(x0) if preview else x0
    grid = make_grid(to_uint8(rows), nrow=len(x0) if preview else model_cfg.num_classes or None)
    for target in (path, path.parent / "samples_latest.png"):
        save_image(grid, target)
