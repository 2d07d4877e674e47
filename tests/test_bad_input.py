"""Bad input through the command line: one clear line on stderr, a non-zero exit, no traceback, and
nothing written.

Covered elsewhere and not repeated here: at the library level, test_data.py (BAD_INPUTS: missing path,
empty folder, no images, truncated PNG, not an image, mixed sizes, npz keys/dtype/shape/labels/pickle;
test_mixed_*_modes) and test_checkpoint.py (not a run folder, truncated or corrupt files, config that
does not match the weights, newer format, crafted pickles); through the CLI,
test_training.py::test_cli_errors_are_one_line (missing data path, empty folder, not an image,
--prediction, --steps 0, unknown flag, empty or missing checkpoint).

Each test runs its cases in one child interpreter (RUNNER: `diffunet.cli.main(argv)` per case, with
file descriptor 2 captured, as a user's terminal would show it), so start-up is paid once per test.
`pytest -s` prints the table of what the user sees.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet.cli import main
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--quiet"]

RUNNER = r"""
import json, os, sys, tempfile, traceback
from diffunet.cli import main

def run(argv):
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
            except BaseException:
                traceback.print_exc()
                code = "uncaught exception"
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return {"code": code, "stderr": captured.read().decode("utf-8", "replace")}

cases = json.loads(open(sys.argv[1]).read())
results = {name: run(argv) for name, argv in cases.items()}
open(sys.argv[2], "w").write(json.dumps(results))
"""


def run_cases(cases: dict[str, list[str]], scratch: Path) -> dict[str, dict]:
    """Run `diffunet ARGV` for every case in one child interpreter; {case: {"code", "stderr"}}."""
    scratch.mkdir(exist_ok=True)
    (scratch / "cases.json").write_text(json.dumps(cases))
    child = subprocess.run([sys.executable, "-c", RUNNER, str(scratch / "cases.json"), str(scratch / "results.json")],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads((scratch / "results.json").read_text())


def check_one_line_errors(results: dict[str, dict], expected: dict[str, tuple[str, ...]]) -> None:
    """Each case exits non-zero with one stderr line holding its fragments; prints the table."""
    problems = []
    for case, fragments in expected.items():
        result = results[case]
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        if result["code"] in (0, None) or "Traceback" in result["stderr"] or len(lines) != 1 \
                or not all(fragment in lines[0] for fragment in fragments):
            problems.append(f"{case}: exit {result['code']}, stderr {result['stderr']!r}, wanted {fragments}")
        else:
            print(f"| {case} | `{lines[0]}` |")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def data(tiny_npz) -> Path:
    return tiny_npz


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """A class-conditional (2 classes) and an unconditional run of one step each."""
    folder = tmp_path_factory.mktemp("runs")
    for name, extra in (("conditional", []), ("unconditional", ["--no-class-conditional"])):
        assert main(["train", "--data", str(data), "--out", str(folder / name), "--steps", "1",
                     *FAST, *TINY, *extra]) == 0
    return {"conditional": folder / "conditional", "unconditional": folder / "unconditional"}


# ---- data ---------------------------------------------------------------------------------------

def write_mixed_modes(folder: Path) -> None:
    """Two 10x12 images in each of the modes L, LA, RGB, RGBA, P, P with transparency, I;16 and 1."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        gray = rng.integers(0, 256, (10, 12), dtype=np.uint8)
        rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(gray).save(folder / f"l_{i}.png")
        Image.fromarray(np.stack([gray, 255 - gray], -1), "LA").save(folder / f"la_{i}.png")
        Image.fromarray(rgb).save(folder / f"rgb_{i}.png")
        Image.fromarray(np.concatenate([rgb, gray[..., None]], -1), "RGBA").save(folder / f"rgba_{i}.png")
        Image.fromarray(rgb).convert("P").save(folder / f"p_{i}.png")
        Image.fromarray(rgb).convert("P").save(folder / f"p_transparent_{i}.png", transparency=0)
        Image.fromarray(gray.astype(np.uint16) * 257).save(folder / f"i16_{i}.png")
        Image.fromarray(gray).convert("1").save(folder / f"bilevel_{i}.png")
    assert {Image.open(path).mode for path in folder.iterdir()} >= {"L", "LA", "RGB", "RGBA", "P", "I;16", "1"}


def test_bad_data_through_the_cli(tmp_path):
    write_mixed_modes(tmp_path / "modes")
    (tmp_path / "sizes").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sizes" / "a.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "sizes" / "b.png")
    images = np.zeros((16, 8, 8), np.uint8)
    np.savez(tmp_path / "keys.npz", pixels=images, targets=np.zeros(16, np.int64))
    np.savez(tmp_path / "dtype.npz", images=images.astype(np.float32) / 255)
    np.savez(tmp_path / "labels.npz", images=images, labels=np.zeros(16, np.float32))

    def train(name: str, data: str, *extra: str) -> list[str]:
        return ["train", "--data", str(tmp_path / data), "--out", str(tmp_path / "out" / name), "--steps", "1",
                *FAST, *TINY, *extra]

    expected = {
        "images of different sizes, no --image-size": (train("sizes", "sizes"), ("differ in size", "--image-size")),
        "npz with wrong keys": (train("keys", "keys.npz"), ("arrays ['pixels', 'targets']", "rename them")),
        "npz with float images": (train("dtype", "dtype.npz"), ("float32", "uint8")),
        "npz with float labels": (train("labels", "labels.npz"), ("labels in", "integers")),
        "--image-size 0": (train("size0", "modes", "--image-size", "0"),
                           ("image_size (--image-size) must be positive",)),
        "--image-size -4": (train("size-4", "modes", "--image-size", "-4"),
                            ("image_size (--image-size) must be positive",)),
    }
    results = run_cases({"mixed modes": train("modes", "modes"), **{k: v[0] for k, v in expected.items()}},
                        tmp_path / "scratch")
    check_one_line_errors(results, {case: fragments for case, (_, fragments) in expected.items()})
    # Mixed modes are converted, not refused: one RGB run of 16 images.
    assert results["mixed modes"]["code"] == 0, results["mixed modes"]["stderr"]
    config = json.loads((tmp_path / "out" / "modes" / "config.json").read_text())
    assert config["image_shape"] == [3, 10, 12]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["modes"]  # failures wrote nothing


# ---- checkpoints --------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates the marker file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def copy_run(run: Path, folder: Path, change=None) -> Path:
    shutil.copytree(run, folder)
    if change:
        change(folder)
    return folder


def edit_config(**changes):
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if key == "model":
                config["model"].update(value)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


def truncate(name: str):
    def change(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return change


def test_bad_checkpoints_through_the_cli(runs, tmp_path):
    run, marker = runs["conditional"], tmp_path / "code_ran"
    folders = tmp_path / "checkpoints"
    folders.mkdir()
    not_a_run = folders / "photos"
    not_a_run.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(not_a_run / "a.png")
    (folders / "notes.txt").write_text("hello")
    truncated = copy_run(run, folders / "truncated", truncate("model.safetensors"))
    lone = folders / "lone.safetensors"
    lone.write_bytes((run / "model.safetensors").read_bytes()[:1000])
    mismatch = copy_run(run, folders / "mismatch", edit_config(model={"base_channels": 16}))
    newer = copy_run(run, folders / "newer", edit_config(format_version=99))
    evil = copy_run(run, folders / "evil")
    (evil / "weights.pt").write_bytes(pickle.dumps({"weight": Payload(marker)}, protocol=2))
    torch.save({"weight": torch.ones(2), "evil": Payload(marker)}, evil / "zipped.pth")
    evil_safetensors = copy_run(run, folders / "evil_safetensors")
    (evil_safetensors / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    bad_state = copy_run(run, folders / "bad_state", truncate("training_state.safetensors"))
    evil_state = copy_run(run, folders / "evil_state")
    (evil_state / "training_state.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    before = {path: path.read_bytes() for path in folders.rglob("*") if path.is_file()}

    def sample(checkpoint: Path) -> list[str]:
        return ["sample", "--checkpoint", str(checkpoint), "--num", "2", "--steps", "2", "--no-progress",
                "--out", str(tmp_path / "grids" / f"{checkpoint.name}.png")]

    def resume(folder: Path) -> list[str]:
        return ["train", "--out", str(folder), "--resume", "--steps", "2", "--quiet"]

    expected = {
        "a folder that is not a run": (sample(not_a_run), ("photos is not a run folder", "diffunet train --out")),
        "a file that is not a checkpoint": (sample(folders / "notes.txt"),
                                            ("neither a run folder nor a .safetensors",)),
        "truncated model.safetensors": (sample(truncated), ("model.safetensors is truncated or corrupt",)),
        "truncated lone .safetensors": (sample(lone), ("lone.safetensors is truncated or corrupt",)),
        "config does not match weights": (sample(mismatch), ("does not match its config", "shape mismatches")),
        "newer format version": (sample(newer), ("format 99, newer", "upgrade")),
        "crafted pickle (.pt)": (sample(evil / "weights.pt"), ("refused", "could run code")),
        "crafted pickle (torch.save .pth)": (sample(evil / "zipped.pth"), ("refused", "could run code")),
        "pickle named model.safetensors": (sample(evil_safetensors), ("truncated or corrupt",)),
        "--resume, truncated training state": (resume(bad_state), ("training_state.safetensors is truncated",)),
        "--resume, pickle as training state": (resume(evil_state), ("training_state.safetensors is truncated",)),
    }
    results = run_cases({case: argv for case, (argv, _) in expected.items()}, tmp_path / "scratch")
    check_one_line_errors(results, {case: fragments for case, (_, fragments) in expected.items()})
    assert not marker.exists(), "a pickle ran code"
    assert not (tmp_path / "grids").exists()  # no grid, no temp file
    assert {path: path.read_bytes() for path in folders.rglob("*") if path.is_file()} == before  # untouched


# ---- flags --------------------------------------------------------------------------------------

def test_bad_flags_through_the_cli(runs, data, tmp_path):
    conditional, unconditional = runs["conditional"], runs["unconditional"]
    grids = tmp_path / "grids"
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()

    def sample(*flags: str, run: Path = conditional, out: Path | None = None) -> list[str]:
        return ["sample", "--checkpoint", str(run), "--num", "2", "--steps", "2", "--no-progress",
                "--out", str(out or grids / "grid.png"), *flags]

    def train(*flags: str) -> list[str]:
        return ["train", "--data", str(data), "--out", str(tmp_path / "train"), "--steps", "1", *FAST, *TINY, *flags]

    expected = {
        "sample: unknown sampler": (sample("--sampler", "lms"), ("unknown sampler 'lms'", "ddpm, ddim, dpmpp_2m, euler, heun")),
        "sample: --steps 0": (sample("--steps", "0"), ("--steps must be a positive", "got 0")),
        "sample: --steps -3": (sample("--steps", "-3"), ("--steps must be a positive", "got -3")),
        "sample: --steps 5000 (> T)": (sample("--steps", "5000"), ("1000", "5000")),
        "sample: --num -5": (sample("--num", "-5"), ("--num must be between 1 and 100000; got -5",)),
        "sample: --num 0": (sample("--num", "0"), ("--num must be between 1 and 100000; got 0",)),
        "sample: --num 1000000000": (sample("--num", "1000000000"), ("--num must be between 1 and 100000",)),
        "sample: --num abc": (sample("--num", "abc"), ("--num: invalid int value: 'abc'",)),
        "sample: --label 2 (2 classes)": (sample("--label", "2"), ("--label must be in 0..1", "got 2")),
        "sample: --label -1": (sample("--label", "-1"), ("--label must be in 0..1", "got -1")),
        "sample: --guidance, unconditional": (sample("--guidance", "2", run=unconditional),
                                              ("--guidance needs a class-conditional model",)),
        "sample: --label, unconditional": (sample("--label", "0", run=unconditional), ("unconditional",)),
        "sample: --guidance nan": (sample("--guidance", "nan"), ("--guidance must be a finite number",)),
        "sample: --batch-size 0": (sample("--batch-size", "0"), ("batch_size (--batch-size) must be positive",)),
        "sample: --device bogus": (sample("--device", "bogus"), ("device (--device) must be auto, cpu, cuda",)),
        "sample: --seed -1": (sample("--seed", "-1"), ("--seed must be in 0..4294967295",)),
        "sample: --out is a folder": (sample(out=tmp_path / "a_folder"), ("a_folder is a folder; give a file path",)),
        "sample: --out-dir is a file": (sample("--out-dir", str(tmp_path / "a_file")), ("a_file is a file",)),
        "sample: --out under a file": (sample(out=tmp_path / "a_file" / "grid.png"), ("a_file",)),
        "train: --image-size 0": (train("--image-size", "0"), ("image_size (--image-size) must be positive; got 0",)),
        "train: unknown sampler": (train("--sampler", "lms"), ("sampler (--sampler) must be one of",)),
        "train: --steps -1": (train("--steps", "-1"), ("steps (--steps) must be positive; got -1",)),
        "train: --lr inf": (train("--lr", "inf"), ("lr (--lr) must be a finite number; got inf",)),
        "train: --lr 1e39": (train("--lr", "1e39"), ("lr (--lr) <= 1000",)),
        "train: --timestep-sampling beta": (train("--timestep-sampling", "beta"),
                                            ("timestep_sampling (--timestep-sampling) must be one of uniform, "
                                             "lognormal",)),
        "train: --logsnr-std 0": (train("--logsnr-std", "0"), ("logsnr_std (--logsnr-std) must be positive; got 0.0",)),
        "train: --seed 2**70": (train("--seed", str(2**70)), ("seed (--seed) must be in 0..4294967295",)),
        "train: --device bogus": (train("--device", "bogus"), ("device (--device) must be one of",)),
        "train: --sample-steps > T": (train("--sample-steps", "2000"),
                                      ("sample_steps (--sample-steps) must be at most",)),
        "train: --model-in-channels 3 on gray data": (train("--model-in-channels", "3"), ("1 channel(s)",)),
        "train: no timestep input": (train("--no-model-time-conditional"), ("time_conditional=True",)),
        "train: --model-norm-groups 3": (train("--model-norm-groups", "3"), ("divisible by norm_groups=3",)),
    }
    results = run_cases({case: argv for case, (argv, _) in expected.items()}, tmp_path / "scratch")
    check_one_line_errors(results, expected={case: fragments for case, (_, fragments) in expected.items()})
    assert not (tmp_path / "train").exists() and not grids.exists()  # nothing written
    assert (tmp_path / "a_file").read_text() == "" and not any((tmp_path / "a_folder").iterdir())
