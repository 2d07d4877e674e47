"""`diffunet train | sample | eval | inpaint | export`: the command line. Flags come from the config dataclasses.

Every error a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import math
import os
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

from .allocator import keep_freed_memory
from .atomic import atomic_write_bytes
from .errors import UserError

MAX_NUM_SAMPLES = 100_000  # more than this from the CLI is almost certainly a typo


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """Add one `--flag` per field of dataclass `cls`; unset flags stay absent from the namespace."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + prefix + field.name.replace("_", "-")
        kind, nullable = _unwrap_optional(hints[field.name])
        dest = prefix.replace("-", "_") + field.name
        default_text = f" (default: {field.default})" if field.default is not dataclasses.MISSING else ""
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=default_text.strip())
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=dest, type=_int_tuple, default=argparse.SUPPRESS,
                                metavar="A,B,...", help="comma-separated integers" + default_text)
        else:
            parser.add_argument(flag, dest=dest, type=_nullable(kind) if nullable else kind,
                                default=argparse.SUPPRESS, help=default_text.strip())


def _unwrap_optional(hint):
    """(T, True) for `T | None`, else (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _nullable(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .training import TrainConfig
    from .unet import UNetConfig

    parser = _Parser(prog="diffunet", description="Train and sample diffusion denoisers.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a denoiser on an image dataset")
    add_dataclass_flags(train, TrainConfig)
    model_flags = train.add_argument_group("model (override the preset's fields)")
    add_dataclass_flags(model_flags, UNetConfig, prefix="model-")

    sample = commands.add_parser("sample", help="draw images from a trained run")
    sample.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    sample.add_argument("--num", type=int, default=None,
                        help="number of images (default: 64); with --cond, outputs per input (default: 1)")
    sample.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m | euler | heun (default: the run's)")
    sample.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    sample.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    sample.add_argument("--out", default="samples.png", help="grid PNG to write")
    sample.add_argument("--npz", default=None, help="also write uint8 samples under key 'samples'")
    sample.add_argument("--out-dir", default=None, help="also write one PNG per image here")
    sample.add_argument("--label", type=int, default=None, help="class label for every image")
    sample.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    sample.add_argument("--cond", default=None, help="a task run's input image, or a folder of them: one row per "
                        "input (the input, then its outputs); --out-dir writes NAME.png (NAME_K.png for --num > 1)")
    sample.add_argument("--mask", default=None, help="inpaint runs: same-size picture, WHITE (>= 128) = keep")
    sample.add_argument("--cond-guidance", type=float, default=1.0,
                        help="classifier-free guidance on --cond (runs trained with --cond-dropout; default: 1)")
    sample.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    sample.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    sample.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    from .evaluate import add_eval_arguments
    add_eval_arguments(commands.add_parser("eval", help="bits/dim, FD with its real-vs-real floor, "
                                                        "class entropy and memorisation of a run; PSNR, SSIM "
                                                        "(or IoU, Dice) of an image-to-image run on test pairs"))
    from .inpaint import add_inpaint_arguments
    add_inpaint_arguments(commands.add_parser("inpaint", help="fill in the masked part of an image (RePaint); "
                                                              "mask WHITE = KEEP"))
    from .export import add_export_arguments
    add_export_arguments(commands.add_parser("export", help="write a run's model as an ONNX file"))
    return parser


def run_train(args: argparse.Namespace) -> None:
    from .checkpoint import read_config
    from .training import TrainConfig, resume_config, train

    given = {k: v for k, v in vars(args).items() if k != "command" and not k.startswith("model_")}
    model_overrides = {k[len("model_"):]: v for k, v in vars(args).items() if k.startswith("model_")}
    cfg = TrainConfig(**given)
    if cfg.resume:  # continue with the run's own settings; flags given now (e.g. --steps) take precedence
        cfg = resume_config(cfg.out, **{k: v for k, v in given.items() if k != "out"})
    run = train(cfg, model_overrides)
    steps = read_config(run)["train"]["steps"]  # --minutes fixed it during the run
    print(f"done: {steps} steps; samples in {run / 'samples_latest.png'}, weights in {run / 'model.safetensors'}")


def run_sample(args: argparse.Namespace) -> None:
    from .images import make_grid, save_image, to_uint8
    from .inputs import check_label_and_guidance, read_cond
    from .run import load_run
    from .training import pick_device

    per_input = args.num if args.num is not None else 1
    args.num = args.num if args.num is not None else 64
    if not 0 < args.num <= MAX_NUM_SAMPLES:
        raise UserError(f"--num must be between 1 and {MAX_NUM_SAMPLES}; got {args.num}")
    if not math.isfinite(args.cond_guidance):
        raise UserError(f"--cond-guidance must be a finite number; got {args.cond_guidance}")
    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps must be a positive number of sampler steps; got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number; got {args.guidance}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in 0..{2**32 - 1}; got {args.seed}")
    outputs = (("--out", args.out, "file"), ("--npz", args.npz, "file"), ("--out-dir", args.out_dir, "folder"))
    for flag, path, want in outputs:
        if path and Path(path).exists() and Path(path).is_dir() != (want == "folder"):  # found before sampling
            raise UserError(f"{flag} {path} is {'a file' if want == 'folder' else 'a folder'}; give a {want} path")
    run = load_run(args.checkpoint, device=pick_device(args.device))
    check_label_and_guidance(args, run.num_classes)
    names, cond, mask = read_cond(args, run)
    if cond is not None:  # a task run: `per_input` outputs per input, input n's k-th is image n * per_input + k
        args.num = len(cond) * per_input
        if args.num > MAX_NUM_SAMPLES:
            raise UserError(f"{len(cond)} inputs x --num {per_input} is over {MAX_NUM_SAMPLES} images; lower --num")
        cond = cond.repeat_interleave(per_input, dim=0)
    x0 = run.sample(args.num, seed=args.seed, label=args.label, guidance=args.guidance, sampler=args.sampler,
                    steps=args.steps, batch_size=args.batch_size, progress=args.progress, cond=cond, mask=mask,
                    cond_guidance=args.cond_guidance)
    images = to_uint8(x0)                                                   # [N, C, H, W] uint8
    if cond is None:
        save_image(make_grid(images, nrow=run.num_classes if run.num_classes and args.label is None else None), args.out)
    else:
        from .tasks import cond_picture
        inputs = to_uint8(cond_picture(run.task, run.condition(args.num, cond, mask), images.shape[1]))
        rows = torch.cat([inputs[::per_input, None], images.reshape(len(names), per_input, *images.shape[1:])], 1)
        save_image(make_grid(rows.flatten(0, 1), nrow=per_input + 1), args.out)
    if args.npz:
        arrays = images[:, 0].numpy() if images.shape[1] == 1 else images.numpy()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, samples=arrays)
        atomic_write_bytes(args.npz, buffer.getvalue())
    if args.out_dir:
        for i, image in enumerate(images):
            name = f"{i:06d}" if cond is None else Path(names[i // per_input]).stem + \
                (f"_{i % per_input}" if per_input > 1 else "")
            save_image(image, Path(args.out_dir) / f"{name}.png")
    print(f"wrote {args.num} samples to {args.out}")


def run_eval(args: argparse.Namespace) -> None:
    from .evaluate import run_eval as evaluate_run
    evaluate_run(args)


def _message(error: Exception, args: argparse.Namespace) -> str:
    """One line: the error's message, or for a bare OSError what failed on which path (and the fix)."""
    if isinstance(error, OSError) and error.strerror:
        path = error.filename2 or error.filename  # a failed rename names the temp file first, the target second
        if path is None and args.command == "train":  # a failed write() names no file; train writes only here
            path = f"a file in {args.out}"
        full = error.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
        fix = "; free disk space or choose another folder" if full else ""
        return f"{error.strerror}{f': {path}' if path else ''}{fix}"
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()   # reuse activation buffers step after step instead of page-faulting them in anew
    from .export import run_export
    from .inpaint import run_inpaint
    commands = {"train": run_train, "sample": run_sample, "eval": run_eval, "inpaint": run_inpaint,
                "export": run_export}
    try:
        commands[args.command](args)
    except (UserError, ValueError, OSError) as error:  # OSError: full disk, missing folder, no permission
        if os.environ.get("DIFFUNET_DEBUG"):
            raise
        print(f"diffunet {args.command}: error: {_message(error, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffunet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
