"""`diffunet export`: a trained UNet as an ONNX file or a `torch.export` ExportedProgram.

    diffunet export --checkpoint runs/mnist --out mnist.onnx
    session = onnxruntime.InferenceSession("mnist.onnx")
    out = session.run(None, {"x": x, "t": t, "y": y})[0]     # y only for class-conditional models

Inputs: `x` float32 [B, C, H, W] noisy images, `t` float32 [B] timesteps (index units, fractional
allowed) and, for class-conditional models, `y` int64 [B] labels with -1 = no label. The batch axis
is dynamic, H and W are fixed at export. The output `out` is the model's raw prediction (eps, x0 or v,
as it was trained); the sampler runs outside the graph. ONNX needs only `onnx` (the TorchScript
exporter); onnxruntime runs the file.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .errors import UserError

OPSET = 17             # ONNX opset version; onnxruntime >= 1.14 runs it
EXAMPLE_BATCH = 2      # traced batch; any batch size runs (a batch of 1 could be specialised away)


class _Signature(nn.Module):
    """The UNet called positionally, model(x, t, y), so the exported inputs are named and ordered."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model(x, t, y=y)


def _example_inputs(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """(x, t) or (x, t, y) with EXAMPLE_BATCH images of `image_shape` (C, H, W), on the model's device."""
    if len(image_shape) != 3 or image_shape[0] != model.config.in_channels:
        raise ValueError(f"image_shape must be (C, H, W) with C = in_channels = {model.config.in_channels}; "
                         f"got {tuple(image_shape)}")
    device = next(model.parameters()).device
    x = torch.randn(EXAMPLE_BATCH, *image_shape, device=device)
    t = torch.linspace(0, 10, EXAMPLE_BATCH, device=device)
    if model.config.num_classes is None:
        return x, t
    return x, t, torch.tensor([0, -1][:EXAMPLE_BATCH], device=device)


def export_onnx(model: nn.Module, path: str | Path, image_shape: tuple[int, ...], opset: int = OPSET) -> Path:
    """Write `model` as an ONNX file, atomically.

    Args:
        model: a diffunet `UNet` (exported in eval mode; its mode is restored afterwards).
        path: where to write; must end in `.onnx`.
        image_shape: (C, H, W) of the images it will be run on (H, W are fixed in the graph).
        opset: ONNX opset version.
    Returns:
        The path written. Inputs `x` [B, C, H, W] float32, `t` [B] float32, and `y` [B] int64
        (-1 = no label) when `model.config.num_classes` is set; output `out`, the raw prediction.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"--out {path} must end in .onnx; e.g. --out {path.with_suffix('.onnx').name}")
    try:
        import onnx  # noqa: F401  (the TorchScript exporter writes through it)
    except ImportError:
        raise UserError("ONNX export needs the onnx package; pip install 'diffunet[interop]'") from None
    inputs = _example_inputs(model, image_shape)
    names = ["x", "t", "y"][:len(inputs)]
    dynamic = {name: {0: "batch"} for name in names + ["out"]}
    training = model.training
    model.eval()

    def write(temp: str) -> None:
        # kernels.py's fused CPU GroupNorm + SiLU steps aside for the plain ops under ONNX export (it has no
        # ONNX symbolic). Quiet the tracer's constant-shape warnings (H, W are fixed by design) and the legacy
        # exporter's notice.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding")   # strided slices stay unfolded
            torch.onnx.export(_Signature(model), inputs, temp, input_names=names, output_names=["out"],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)

    try:
        atomic_write(path, write)
    finally:
        model.train(training)
    return path


def export_program(model: nn.Module, image_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """`torch.export.export` of the model with a dynamic batch axis.

    Args:
        model: a diffunet `UNet` (exported in eval mode; its mode is restored afterwards).
        image_shape: (C, H, W) of the images (H, W are fixed in the program).
    Returns:
        The ExportedProgram; `program.module()(x, t)` or `(x, t, y)` runs it, y int64 with -1 = no label.
    """
    inputs = _example_inputs(model, image_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes = {name: {0: batch} for name in ("x", "t", "y")[:len(inputs)]}
    training = model.training
    try:
        return torch.export.export(_Signature(model.eval()), inputs, dynamic_shapes=shapes)
    finally:
        model.train(training)


# ---- the CLI subcommand ------------------------------------------------------------------------

def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The `diffunet export` flags."""
    parser.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    parser.add_argument("--out", required=True, help="ONNX file to write (ends in .onnx)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset version (default: {OPSET})")


def run_export(args: argparse.Namespace) -> None:
    """`diffunet export`: load the run, write the ONNX file, print one line."""
    from .run import load_run

    if Path(args.out).suffix != ".onnx":   # checked before the (slower) load
        raise UserError(f"--out {args.out} must end in .onnx; e.g. --out {Path(args.out).with_suffix('.onnx').name}")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a file path ending in .onnx")
    run = load_run(args.checkpoint)
    path = export_onnx(run.model, args.out, run.image_shape, opset=args.opset)
    inputs = "x, t, y" if run.num_classes else "x, t"
    print(f"wrote {path}: inputs {inputs} (batch dynamic, {run.image_shape[1]}x{run.image_shape[2]}), "
          f"output the {run.prediction} prediction")
