"""Checkpoints: round trips, bit-identical resume, atomic writes, and a clear error for every bad file."""
from __future__ import annotations

import json
import math
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffunet.checkpoint as checkpoint
from diffunet import UNet, UNetConfig
from diffunet.checkpoint import (capture_rng_states, load_torch_file, load_training_state,
                                 read_config, restore_rng_states, save_model, save_training_state)
from diffunet.ema import ema_copy, ema_decay, ema_update
from diffunet.errors import CheckpointError
from diffunet.run import load_model
from diffunet.loss import training_loss
from diffunet.serialiser import flatten, restore
from samplers import NoiseSchedule

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), norm_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    """A tiny UNet whose weights are all random (so a round trip that drops any weight shows)."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**{"in_channels": 1, **TINY, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1)
    return model


def extra_config() -> dict:
    return {"schedule": NoiseSchedule.cosine(100).to_dict(), "prediction": "v", "train": {"steps": 3, "lr": 1e-3}}


def outputs(model: UNet, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, model.config.in_channels, 8, 16, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([1, -1]) if model.config.num_classes else None
    with torch.no_grad():
        return model.eval()(x, torch.tensor([3, 70]), y=y)


def assert_same(a, b, where="state"):
    """Deep equality that also checks types, key types, tensor dtypes and bits."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for key in a:
            assert type(key) is type(next(k for k in b if k == key)), (where, key)
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


# ---- model round trips ------------------------------------------------------------------------

def test_save_and_load_run_folder_reproduces_outputs(tmp_path):
    model = tiny_unet(num_classes=3)
    weights = save_model(tmp_path / "run", model, extra_config())
    assert weights == tmp_path / "run" / "model.safetensors"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["format_version"] == checkpoint.FORMAT_VERSION and "diffunet_version" in config
    assert config["model"] == model.config.to_dict() and config["prediction"] == "v"
    loaded, loaded_config = load_model(tmp_path / "run")
    assert not loaded.training and loaded_config == config == read_config(tmp_path / "run")
    assert loaded.config == model.config
    assert torch.equal(outputs(loaded), outputs(model))
    NoiseSchedule.from_dict(loaded_config["schedule"])  # the schedule round-trips through JSON too


def test_lone_safetensors_file_rebuilds_the_model(tmp_path):
    model = tiny_unet(in_channels=3)
    save_model(tmp_path / "run", model, extra_config())
    alone = tmp_path / "elsewhere" / "weights.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((tmp_path / "run" / "model.safetensors").read_bytes())
    loaded, config = load_model(alone, device="cpu")
    assert config["model"]["in_channels"] == 3 and torch.equal(outputs(loaded), outputs(model))
    # Saving straight to a .safetensors name writes that file alone.
    save_model(tmp_path / "single.safetensors", model)
    assert torch.equal(outputs(load_model(tmp_path / "single.safetensors")[0]), outputs(model))
    # Without config.json a run folder falls back on the config in the weights' metadata.
    (tmp_path / "run" / "config.json").unlink()
    assert torch.equal(outputs(load_model(tmp_path / "run")[0]), outputs(model))


def test_extra_config_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_model(tmp_path / "run", tiny_unet(), {"schedule": object()})


# ---- training state ---------------------------------------------------------------------------

def test_training_state_round_trip_keeps_structure_types_and_dtypes(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "step": 1200, "data_position": 3, "lr": 1e-3, "flags": [True, False, None], "name": "run",
        "huge": 2**62 + 1, "special": [float("nan"), float("inf"), -float("inf"), -0.0],
        "by_int": {0: {"a": torch.ones(2)}, 7: (1, 2.5, "x")}, "by_tuple": {(1, "a"): 2, None: 3},
        "dtypes": {str(d): torch.arange(6).to(d).reshape(2, 3) for d in
                   (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                    torch.uint8, torch.int8, torch.bool)},
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "views": [base[:6], base[6:], base.view(3, 4)],
        "numpy": (np.arange(5, dtype=np.uint32), np.float64(2.5), np.zeros((2, 0)), np.array(7, dtype=np.int16)),
        "looks_like_marker": {"__tensor__": "not a tensor"}, "nested": [[{"deep": [torch.full((2,), -1)]}]],
        "empty_containers": ({}, [], ()),
    }
    save_training_state(tmp_path, state)
    loaded = load_training_state(tmp_path)
    expected = dict(state, numpy=(state["numpy"][0], 2.5, state["numpy"][2], state["numpy"][3]))  # np scalar -> float
    assert_same(expected, loaded)
    # Tensor names in the file follow the state's structure.
    keys = load_file(tmp_path / "training_state.safetensors").keys()
    assert {"by_int/0/a", "scalar", "dtypes/torch.bfloat16"} <= set(keys)


def test_serialiser_splits_a_state_into_json_and_tensors_and_back():
    """In memory, without a file: the skeleton is plain JSON; colliding paths get distinct tensor names."""
    state = {"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}, "t": (1, np.arange(3, dtype=np.int16))}
    skeleton, tensors = flatten(state)
    assert set(tensors) == {"a/b", "a/b#", "t/1"}
    assert_same(state, restore(json.loads(json.dumps(skeleton)), tensors))


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="at 'extra/0'"):
        save_training_state(tmp_path, {"extra": [object()]})
    assert not (tmp_path / "training_state.safetensors").exists()


def adamw_step(model: UNet, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One AdamW step on a fixed random regression target."""
    x = torch.randn(2, 1, 8, 16, generator=torch.Generator().manual_seed(seed))
    loss = ((model(x, torch.tensor([5, 60])) - x) ** 2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_optimizer_round_trip_gives_identical_next_step(tmp_path):
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for seed in range(2):
        adamw_step(model, optimizer, seed)
    save_training_state(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    state = load_training_state(tmp_path)
    assert_same(optimizer.state_dict(), state["optimizer"])       # int keys, betas tuple, step tensors
    resumed = tiny_unet(seed=99)
    resumed.load_state_dict(state["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1.0)
    resumed_optimizer.load_state_dict(state["optimizer"])
    adamw_step(model, optimizer, 2)
    adamw_step(resumed, resumed_optimizer, 2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_rng_states_restore_identical_draws(tmp_path):
    generator = torch.Generator().manual_seed(5)
    torch.randn(3, generator=generator)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # also sets numpy's cached gaussian
    save_training_state(tmp_path, {"rng": capture_rng_states(), "noise": generator.get_state()})
    draws = (random.random(), np.random.rand(3), np.random.randn(), torch.rand(3),
             torch.randn(3, generator=generator))
    random.seed(10), np.random.seed(20), torch.manual_seed(30)
    state = load_training_state(tmp_path)
    restore_rng_states(state["rng"])
    fresh = torch.Generator()
    fresh.set_state(state["noise"])
    again = (random.random(), np.random.rand(3), np.random.randn(), torch.rand(3), torch.randn(3, generator=fresh))
    assert draws[0] == again[0] and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    assert torch.equal(draws[3], again[3]) and torch.equal(draws[4], again[4])


def train_steps(model, ema, optimizer, generator, schedule, first: int, last: int) -> None:
    """Steps first..last-1 of a tiny EMA + min-SNR v-prediction training run."""
    for step in range(first, last):
        x0 = torch.rand(2, 1, 8, 16, generator=torch.Generator().manual_seed(step)) * 2 - 1
        training_loss(model, x0, schedule, prediction="v", weighting="min_snr", generator=generator).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, model, ema_decay(step, 0.99))


def test_resume_from_saved_state_is_bit_identical(tmp_path):
    def fresh():
        model = tiny_unet(seed=1)
        return model, ema_copy(model), torch.optim.AdamW(model.parameters(), lr=1e-3), torch.Generator().manual_seed(0)

    schedule = NoiseSchedule.cosine(100)
    model, ema, optimizer, generator = fresh()
    train_steps(model, ema, optimizer, generator, schedule, 0, 4)

    model2, ema2, optimizer2, generator2 = fresh()
    train_steps(model2, ema2, optimizer2, generator2, schedule, 0, 2)
    save_training_state(tmp_path, {"model": model2.state_dict(), "ema": ema2.state_dict(), "step": 2,
                                   "optimizer": optimizer2.state_dict(), "rng": {"noise": generator2.get_state()}})
    model3, ema3, optimizer3, generator3 = fresh()
    state = load_training_state(tmp_path)
    model3.load_state_dict(state["model"]), ema3.load_state_dict(state["ema"])
    optimizer3.load_state_dict(state["optimizer"]), generator3.set_state(state["rng"]["noise"])
    train_steps(model3, ema3, optimizer3, generator3, schedule, state["step"], 4)
    for a, b in zip([*model.state_dict().values(), *ema.state_dict().values()],
                    [*model3.state_dict().values(), *ema3.state_dict().values()]):
        assert torch.equal(a, b)


# ---- atomic writes ----------------------------------------------------------------------------

def fill_the_disk(monkeypatch) -> None:
    """From now on, each checkpoint write puts half its bytes in the temp file, then fails like a full disk."""
    import diffunet.atomic as atomic

    def write_half(path, data):
        def write(temp):
            with open(temp, "wb") as file:
                file.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        atomic.atomic_write(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", write_half)


def test_failed_state_write_keeps_previous_state(tmp_path, monkeypatch):
    save_training_state(tmp_path, {"step": 1, "w": torch.ones(3)})
    fill_the_disk(monkeypatch)
    message = raises_one_line("could not write .*training_state.safetensors .*No space left on device.* kept",
                              save_training_state, tmp_path, {"step": 2, "w": torch.zeros(3)})
    assert str(tmp_path) in message
    state = load_training_state(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state.safetensors"]  # no temp files left


def test_failed_model_write_keeps_previous_model(tmp_path, monkeypatch):
    model = tiny_unet()
    save_model(tmp_path, model, extra_config())
    fill_the_disk(monkeypatch)
    raises_one_line("could not write .*model.safetensors", save_model, tmp_path, tiny_unet(seed=5), {"train": {}})
    loaded, config = load_model(tmp_path)
    assert torch.equal(outputs(loaded), outputs(model)) and config["train"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


FILE_SIZE_LIMIT_CHILD = """
import resource, signal, sys, torch
from diffunet.checkpoint import save_training_state
from diffunet.errors import CheckpointError
from diffunet.run import load_model
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_training_state(sys.argv[1], {"step": 2, "w": torch.zeros(1_000_000)})
except CheckpointError as error:
    print(error)
"""


def test_real_write_failure_from_a_file_size_limit(tmp_path):
    """Not a monkeypatch: the kernel refuses the write (RLIMIT_FSIZE); the old state survives."""
    save_training_state(tmp_path, {"step": 1, "w": torch.ones(10)})
    child = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_CHILD, str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "could not write" in child.stdout and "File too large" in child.stdout, child.stdout
    state = load_training_state(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["training_state.safetensors"]


KILL_CHILD = """
import sys, torch
from diffunet.checkpoint import save_training_state
for step in range(1, 10**6):
    save_training_state(sys.argv[1], {"step": step, "weights": torch.full((1_000_000,), float(step))})
"""


def test_sigkill_during_state_write_leaves_a_loadable_state(tmp_path):
    """Kill a process while it is inside a write (its temp file exists); the last state stays whole."""
    for kill in range(2):
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path)])
        try:
            deadline = time.monotonic() + 60
            state_file = tmp_path / "training_state.safetensors"
            while not (list(tmp_path.glob(".training_state*.tmp")) and state_file.exists()):
                assert time.monotonic() < deadline and child.poll() is None, "the child never started writing"
                time.sleep(0.001)
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            child.kill() if child.poll() is None else None
        state = load_training_state(tmp_path)
        assert state["step"] >= 1 and torch.equal(state["weights"], torch.full((1_000_000,), float(state["step"])))
    save_training_state(tmp_path, {"step": 0})  # the next save clears what the killed writes left
    assert [p.name for p in tmp_path.iterdir()] == ["training_state.safetensors"]


def test_wrapped_model_and_non_unet(tmp_path):
    model = tiny_unet()

    class Wrapper(torch.nn.Module):  # like DistributedDataParallel: the model is in .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    save_model(tmp_path, Wrapper(model))
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())
    with pytest.raises(TypeError, match="UNet"):
        save_model(tmp_path, torch.nn.Linear(2, 2))


def test_read_config_of_a_run_without_weights_yet(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1, "model": {"base_channels": 8}}))
    assert read_config(tmp_path)["model"] == {"base_channels": 8}


# ---- bad input: one line naming the fix -------------------------------------------------------

def raises_one_line(match: str, function, *args):
    with pytest.raises(CheckpointError, match=match) as info:
        function(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_path_and_not_a_run_folder(tmp_path):
    raises_one_line("does not exist", load_model, tmp_path / "nope")
    raises_one_line("does not exist", read_config, tmp_path / "nope")
    raises_one_line("not a run folder", load_model, tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    raises_one_line("neither a run folder nor a .safetensors file", load_model, tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1, "model": TINY}))
    raises_one_line("no model.safetensors", load_model, tmp_path)
    raises_one_line("no training_state.safetensors .* from the start", load_training_state, tmp_path)


def test_truncated_or_corrupt_files(tmp_path):
    save_model(tmp_path, tiny_unet(), extra_config())
    save_training_state(tmp_path, {"w": torch.ones(1000)})
    for name, loader in (("model.safetensors", load_model), ("training_state.safetensors", load_training_state)):
        data = (tmp_path / name).read_bytes()
        for cut in (len(data) - 64, 40, 3, 0):
            (tmp_path / name).write_bytes(data[:cut])
            raises_one_line("truncated or corrupt", loader, tmp_path)
        (tmp_path / name).write_bytes(b"garbage" * 50)
        raises_one_line("truncated or corrupt", loader, tmp_path)


def test_unreadable_config_json_and_its_fix(tmp_path):
    model = tiny_unet()
    save_model(tmp_path, model, extra_config())
    (tmp_path / "config.json").write_text('{"model": {"base_channels": 8,')
    message = raises_one_line("config.json is unreadable", load_model, tmp_path)
    assert "delete it" in message
    (tmp_path / "config.json").unlink()  # the named fix works: the metadata has the config
    assert torch.equal(outputs(load_model(tmp_path)[0]), outputs(model))


@pytest.mark.parametrize("change, words", [({"base_channels": 16}, "shape mismatches"),
                                           ({"num_res_blocks": 2}, "missing weights"),
                                           ({"channel_mults": [1]}, "unexpected weights")])
def test_config_that_does_not_match_the_weights(tmp_path, change, words):
    save_model(tmp_path, tiny_unet(), extra_config())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = raises_one_line("does not match its config", load_model, tmp_path)
    assert words in message


def test_invalid_model_config(tmp_path):
    save_model(tmp_path, tiny_unet(), extra_config())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["no_such_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    raises_one_line("model config .* is invalid", load_model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1}))
    raises_one_line("no \"model\" section", load_model, tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    model = tiny_unet()
    save_model(tmp_path / "run", model, extra_config())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    raises_one_line("format 99, newer .* upgrade", load_model, tmp_path / "run")
    raises_one_line("format 99, newer", read_config, tmp_path / "run")
    # The same check for a lone .safetensors file and for the training state.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, tmp_path / "new.safetensors",
              metadata={"diffunet_config": json.dumps({**config, "format_version": 99})})
    raises_one_line("newer", load_model, tmp_path / "new.safetensors")
    save_file({}, tmp_path / "training_state.safetensors", metadata={"format_version": "99", "diffunet_state": "{}"})
    raises_one_line("newer", load_training_state, tmp_path)
    save_file({}, tmp_path / "plain.safetensors")
    raises_one_line("holds no diffunet config", load_model, tmp_path / "plain.safetensors")


# ---- .pt files: never unpickle code -----------------------------------------------------------

class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_pickle_never_runs(tmp_path):
    # The payload is live: plain pickle.loads runs it (on a marker in a separate folder).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    save_model(tmp_path / "run", tiny_unet(), extra_config())
    (tmp_path / "run" / "raw.pt").write_bytes(pickle.dumps({"weight": Payload(marker)}, protocol=2))
    torch.save({"weight": torch.ones(2), "evil": Payload(marker)}, tmp_path / "run" / "zipped.pth")
    for name in ("raw.pt", "zipped.pth"):
        raises_one_line("refused .* could run code", load_torch_file, tmp_path / "run" / name)
        raises_one_line("refused", load_model, tmp_path / "run" / name)
    assert not marker.exists()


def test_plain_pt_state_dict_loads_safely(tmp_path):
    model = tiny_unet()
    save_model(tmp_path, model, extra_config())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert set(load_torch_file(tmp_path / "weights.pt")) == set(model.state_dict())
    assert torch.equal(outputs(load_model(tmp_path / "weights.pt")[0]), outputs(model))
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    raises_one_line("not a state dict", load_model, tmp_path / "list.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    raises_one_line("not a readable PyTorch file", load_torch_file, tmp_path / "broken.pt")
    raises_one_line("does not exist", load_torch_file, tmp_path / "missing.pt")
