"""Property-based tests (hypothesis) over UNetConfig and over the flags of `diffunet train` and `sample`.

UNetConfig: a valid config builds and runs a forward pass on a valid input; an invalid one raises
ValueError with a one-line message, never another exception, at construction or later.
CLI: any flags either run or end in one line on stderr with exit 1 or 2, never a traceback.
`train` is checked up to its first step (a stand-in for the loop, see `checks_before_training`);
`sample` really samples, with small sizes.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import diffunet.cli as cli
import diffunet.training as training
import samplers
from diffunet import UNet, UNetConfig
from diffunet.data import load_data
from diffunet.training import TrainConfig
from diffunet.unet import CHOICES
from helpers import TINY

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ---- UNetConfig ---------------------------------------------------------------------------------

def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


# Every UNetConfig field, valid or not (small numbers, so that valid configs stay tiny).
ANY_FIELDS = {
    "in_channels": st.integers(-1, 4), "out_channels": maybe(st.integers(-1, 4)),
    "base_channels": st.integers(-1, 12), "channel_mults": st.lists(st.integers(-1, 3), max_size=3),
    "num_res_blocks": st.integers(-1, 2), "attention_levels": st.lists(st.integers(-1, 3), max_size=2),
    "mid_attention": st.booleans(), "num_heads": st.integers(-1, 4), "head_channels": maybe(st.integers(-1, 8)),
    "dropout": st.floats(-0.5, 1.5) | st.just(math.nan), "norm_groups": st.integers(-1, 8),
    "time_conditional": st.booleans(), "emb_channels": maybe(st.integers(-1, 16)),
    "num_classes": maybe(st.integers(-1, 4)), "cond_channels": st.integers(-1, 2), "zero_init": st.booleans(),
    **{name: st.sampled_from(values + ("bogus",)) for name, values in CHOICES.items()},
}


@st.composite
def valid_config_fields(draw) -> dict:
    """Fields that satisfy every documented constraint."""
    base = draw(st.sampled_from([2, 4, 6, 8]))
    divisors = [d for d in range(1, base + 1) if base % d == 0]
    block = draw(st.sampled_from(CHOICES["block"]))
    mults = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    top = len(mults) - 1 if block == "resnet" else len(mults) - 2
    head_channels = draw(st.none() | st.sampled_from(divisors))
    fields = {
        "in_channels": draw(st.integers(1, 4)), "out_channels": draw(st.none() | st.integers(1, 4)),
        "base_channels": base, "channel_mults": mults, "num_res_blocks": draw(st.integers(1, 2)),
        "attention_levels": draw(st.lists(st.integers(0, top), max_size=2, unique=True)) if top >= 0 else [],
        "mid_attention": draw(st.booleans()), "num_heads": draw(st.sampled_from(divisors)),
        "head_channels": head_channels, "dropout": draw(st.floats(0, 0.9)),
        "norm_groups": draw(st.sampled_from([0, *divisors])), "block": block,
        "time_conditional": draw(st.booleans()), "emb_channels": draw(st.none() | st.integers(1, 16)),
        "num_classes": draw(st.none() | st.integers(1, 4)), "cond_channels": draw(st.integers(0, 2)),
        "zero_init": draw(st.booleans()),
    }
    fields.update({name: draw(st.sampled_from(values)) for name, values in CHOICES.items() if name != "block"})
    return fields


def input_side(model: UNet, side: int) -> int:
    """`side` itself for same padding; for valid padding, a side the model's error message suggests."""
    try:
        model.output_size(side, side)
        return side
    except ValueError as error:
        found = re.search(r"nearest sides that fit are (\d+)", str(error))
        assert found, str(error)
        return int(found[1])


def run_forward(config: UNetConfig, height: int, width: int) -> None:
    """Build the model, pick a valid input of about height x width, run it, check shape and values."""
    model = UNet(config).eval()
    height, width = input_side(model, height), input_side(model, width)
    levels = [*config.attention_levels, config.depth] if config.mid_attention else list(config.attention_levels)
    if height * width > 128 * 128 or any(height * width / 4 ** level > 48 * 48 for level in levels):
        event("input too big to run")  # valid padding can need big inputs; attention on them is slow and huge
        return
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, height, width, generator=generator)
    t = torch.tensor([0.0, 999.0]) if config.time_conditional else None
    y = torch.tensor([-1, config.num_classes - 1]) if config.num_classes else None
    cond = torch.randn(2, config.cond_channels, height, width, generator=generator) if config.cond_channels else None
    with torch.no_grad():
        out = model(x, t, y=y, cond=cond)
    assert out.shape == (2, config.out_channels or config.in_channels, *model.output_size(height, width))
    assert torch.isfinite(out).all()


@settings(FUZZ, max_examples=30)
@given(fields=valid_config_fields(), height=st.integers(1, 20), width=st.integers(1, 20))
def test_every_valid_unet_config_builds_and_runs(fields, height, width):
    run_forward(UNetConfig(**fields), height, width)


@st.composite
def near_valid_config_fields(draw) -> dict:
    """A valid config with one to three fields replaced by arbitrary values: it probes the boundaries."""
    fields = draw(valid_config_fields())
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True)):
        fields[name] = draw(ANY_FIELDS[name])
    return fields


@settings(FUZZ, max_examples=60)
@given(fields=near_valid_config_fields() | st.fixed_dictionaries(ANY_FIELDS), height=st.integers(1, 20),
       width=st.integers(1, 20))
def test_any_unet_config_is_refused_with_a_message_or_runs(fields, height, width):
    try:
        config = UNetConfig(**fields)
    except ValueError as error:
        message = str(error)
        assert message.strip() and "\n" not in message
        event("refused")
        return
    event("valid")
    run_forward(config, height, width)
    assert UNetConfig.from_dict(config.to_dict()) == config  # what a checkpoint stores rebuilds it


# ---- the command line ---------------------------------------------------------------------------

def run_main(argv: list[str]) -> tuple[int, str]:
    """`diffunet ARGV` in this process: (exit code, stderr). Any other exception propagates."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
    return code, stderr.getvalue()


def assert_ran_or_one_line_error(argv: list[str], code, stderr: str) -> None:
    event(f"exit {code}")  # `pytest --hypothesis-show-statistics` shows how often each outcome came up
    if code == 0:
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("diffunet"), (argv, code, stderr)


def mostly(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`strategy` four times in five, else junk text."""
    return st.one_of(strategy, strategy, strategy, strategy, garbage)


garbage = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=6)
ints = st.integers(-3, 6).map(str) | st.sampled_from(["0", "-1", str(10**12), str(-10**12), str(2**64), "1.5", "1e3"])
floats = (st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.floats(-3, 3).map(repr)
          | st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-0.0"]))


def flag_values(cls) -> dict[str, st.SearchStrategy[str]]:
    """A strategy of command-line text for each field of dataclass `cls`, by the field's type."""
    hints = {name: str(hint) for name, hint in cls.__annotations__.items()}
    values = {}
    for name, hint in hints.items():
        if "tuple" in hint:
            values[name] = st.lists(st.integers(-1, 3), max_size=3).map(lambda v: ",".join(map(str, v)))
        elif "int" in hint:
            values[name] = ints | st.just("none") if "None" in hint else ints
        elif "float" in hint:
            values[name] = floats
        elif name in CHOICES:
            values[name] = st.sampled_from(CHOICES[name])
        else:
            values[name] = garbage
        values[name] = mostly(values[name])
    return values


TRAIN_CHOICES = {"preset": ["small28", "small32", "ddpm_cifar10", "ronneberger2015"],
                 "sampler": sorted(samplers.SAMPLERS),
                 "lr_schedule": ["cosine", "constant"], "schedule": ["linear", "cosine", "sigmoid"],
                 "prediction": ["eps", "x0", "v"], "loss_weighting": ["none", "min_snr"],
                 "precision": ["fp32", "bf16"], "device": ["auto", "cpu", "cuda", "mps"]}


@st.composite
def train_flags(draw) -> list[str]:
    """A random subset of `diffunet train` flags with random values (bools as --x / --no-x)."""
    flags = []
    for prefix, cls in (("", TrainConfig), ("model-", UNetConfig)):
        values = flag_values(cls)
        for name in draw(st.lists(st.sampled_from(sorted(values)), max_size=6, unique=True)):
            if name in ("out", "data", "resume", "compile", "quiet"):
                continue  # fixed below: no downloads, no compiling, no output outside tmp
            flag = "--" + prefix + name.replace("_", "-")
            hint = str(cls.__annotations__[name])
            if hint == "bool":
                flags.append(flag if draw(st.booleans()) else flag.replace("--", "--no-", 1))
            elif prefix == "" and name in TRAIN_CHOICES:
                flags.append(f"{flag}={draw(mostly(st.sampled_from(TRAIN_CHOICES[name])))}")
            else:
                flags.append(f"{flag}={draw(values[name])}")
    return flags


def checks_before_training(cfg: TrainConfig, model_overrides: dict | None = None) -> Path:
    """Stand-in for train(): the device, the data and the model config it would start from."""
    training.pick_device(cfg.device)
    data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels, progress=False)
    training.model_config(cfg, data, model_overrides)
    return Path(cfg.out)


@pytest.fixture(scope="module")
def tiny_data(tiny_npz) -> Path:
    return tiny_npz


@settings(FUZZ, max_examples=100)
@given(flags=train_flags(), missing_data=st.booleans())
def test_train_flags_run_or_give_one_line(flags, missing_data, tiny_data, tmp_path):
    data = tmp_path / "missing.npz" if missing_data else tiny_data
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet", *flags]
    with mock.patch.object(training, "train", checks_before_training):
        code, stderr = run_main(argv)
    assert_ran_or_one_line_error(argv, code, stderr)


def test_one_train_step_with_fuzzed_looking_but_valid_flags(tiny_data, tmp_path):
    """The stand-in above skips the loop; this runs it once with unusual (valid) values."""
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--steps", "1", "--quiet",
            "--batch-size", "3", "--grad-accum", "2", "--lr", "1000", "--warmup-steps", "0", "--grad-clip", "0",
            "--num-timesteps", "3", "--sample-steps", "3", "--num-samples", "1", "--sampler", "ddpm",
            "--guidance", "-2.5", "--seed", str(2**32 - 1), "--label-dropout", "0", "--ema-max-decay", "0",
            "--prediction", "x0", "--schedule", "sigmoid", "--zero-terminal-snr", *TINY]
    code, stderr = run_main(argv)
    assert code == 0, stderr


@pytest.fixture(scope="module")
def sample_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz_runs")
    for name, extra in (("conditional", []), ("unconditional", ["--no-class-conditional"])):
        assert cli.main(["train", "--data", str(tiny_data), "--out", str(folder / name), "--steps", "1",
                         "--batch-size", "8", "--num-samples", "2", "--sample-steps", "2", "--quiet",
                         *TINY, *extra]) == 0
    (folder / "notes.txt").write_text("not a checkpoint")
    return {"conditional": folder / "conditional", "unconditional": folder / "unconditional",
            "missing": folder / "missing", "notes.txt": folder / "notes.txt"}


@st.composite
def sample_flags(draw, tmp: Path) -> list[str]:
    """`diffunet sample` flags: small valid values mixed with zeros, negatives, huge numbers and junk."""
    small = st.integers(1, 3).map(str)
    options = {
        "--num": mostly(small | ints), "--steps": mostly(small | ints | st.just("5000")),
        "--sampler": mostly(st.sampled_from(sorted(samplers.SAMPLERS))), "--seed": mostly(ints | st.just(str(2**32))),
        "--label": mostly(st.integers(-1, 2).map(str) | ints), "--guidance": mostly(floats),
        "--batch-size": mostly(small | ints),
        "--device": st.sampled_from(["cpu"] * 4 + ["auto", "cuda:1", "bogus", ""]),
        "--npz": st.sampled_from([str(tmp / "s.npz")] * 3 + [str(tmp)]),
        "--out-dir": st.sampled_from([str(tmp / "each")] * 3 + [str(tmp / "grid.png")]),
    }
    chosen = {"--out": draw(st.sampled_from([str(tmp / "grid.png")] * 4 + [str(tmp)]))}
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True)):
        chosen[flag] = draw(options[flag])
    # Keep real sampling small: at most 3 images and 3 steps, unless the value is one that is refused.
    for flag, refused_from in (("--num", 100_001), ("--steps", 1001)):
        if flag not in chosen or not cheap(chosen[flag], refused_from):
            chosen[flag] = draw(small | st.sampled_from(["0", "-1", str(refused_from)]))
    return ["--no-progress", *(f"{flag}={value}" for flag, value in chosen.items())]


def cheap(text: str, refused_from: int) -> bool:
    """Whether `--flag=text` costs little: refused by the parser, at most 3, or refused as too big."""
    try:
        number = int(text)
    except ValueError:
        return True
    return number <= 3 or number >= refused_from


@settings(FUZZ, max_examples=40)
@given(data=st.data(),
       checkpoint=st.sampled_from(["conditional"] * 3 + ["unconditional"] * 2 + ["missing", "notes.txt"]))
def test_sample_flags_run_or_give_one_line(data, checkpoint, sample_runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    argv = ["sample", "--checkpoint", str(sample_runs[checkpoint]), *data.draw(sample_flags(tmp))]
    code, stderr = run_main(argv)
    assert_ran_or_one_line_error(argv, code, stderr)
    if code == 0:
        assert (tmp / "grid.png").is_file()
    else:
        assert not list(tmp.rglob(".*.tmp"))  # no temp file left behind


COMMANDS = ["train", "sample", "eval"]
FLAG_WORDS = sorted({"--" + name.replace("_", "-") for name in TrainConfig.__annotations__}
                    | {"--model-" + name.replace("_", "-") for name in UNetConfig.__annotations__}
                    | {"--checkpoint", "--num", "--steps", "--sampler", "--label", "--guidance", "--out-dir", "--npz"})


@settings(FUZZ, max_examples=100)
@given(argv=st.lists(st.sampled_from(COMMANDS) | st.sampled_from(FLAG_WORDS) | ints | floats | garbage, max_size=8))
def test_any_argument_list_parses_or_gives_one_line(argv):
    """The parser alone (the commands are stubbed): never a traceback, whatever the words."""
    if "--help" in argv or "-h" in argv:
        return
    with mock.patch.multiple(cli, run_train=lambda args: None, run_sample=lambda args: None,
                             run_eval=lambda args: None):
        code, stderr = run_main(argv)
    assert_ran_or_one_line_error(argv, code, stderr)
