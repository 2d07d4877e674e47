"""Faults: SIGKILL at random moments, a full disk, a NaN loss and Ctrl-C never lose or corrupt a run.

Training runs as `python -m diffunet.cli train` subprocesses on a tiny model and a 12x12 npz set,
each with one thread (OMP_NUM_THREADS=1): CPU float results depend on the thread count, so the
uninterrupted reference run uses one thread too (in-process, `torch.set_num_threads(1)`).
The long kill test is marked slow: `pytest -m slow tests/test_faults.py -s` prints its figures.
"""
from __future__ import annotations

import collections
import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import diffunet.training as training
from diffunet.checkpoint import load_training_state
from diffunet.run import load_model
from diffunet.cli import main
from helpers import FAST, TINY, write_tiny_npz

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = 10          # the short runs of the default suite
STATE, MODEL = "training_state.safetensors", "model.safetensors"
RNG_KEYS = ("rng/python", "rng/numpy")  # Python and NumPy RNGs are never seeded or used by training


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """32 random 12x12 grayscale images in two classes: a training step takes milliseconds."""
    return write_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 32)


def train_argv(data: Path, out: Path, steps: int, save_every: int = 1) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--save-every", str(save_every), "--precision", "fp32", "--device", "cpu", *FAST, *TINY]


def main_one_thread(argv: list[str]) -> int:
    """`diffunet.cli.main(argv)` in this process with one torch thread, like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def launch(argv: list[str], **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffunet.cli", *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must end up bit-identical to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main_one_thread(train_argv(data, out, STEPS)) == 0
    return out


# ---- checks ------------------------------------------------------------------------------------

def check_run_folder(out: Path) -> list[str]:
    """Assert every file in the run folder is whole and parseable; returns the names of the files whose
    writes a kill cut short (their hidden `.NAME.*.tmp` temp files: never read, removed by the next run)."""
    temps = []
    for path in sorted(out.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            temps.append(path.name.split(".")[1] + "." + path.name.split(".")[2])  # .NAME.EXT.random.tmp
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as file:
                for key in file.keys():
                    file.get_tensor(key)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        else:
            raise AssertionError(f"unexpected file {path.name} in the run folder")
    if (out / STATE).exists():
        state = load_training_state(out)
        assert all(torch.isfinite(value).all() for value in state["model"].values())
    if (out / "config.json").exists() and (out / MODEL).exists():
        load_model(out)  # config and weights agree
    return temps


def mismatches(out: Path, reference: Path) -> list[str]:
    """Tensors of the model and training state that differ from the reference run (bitwise)."""
    different = []
    for name in (MODEL, STATE):
        with safe_open(str(out / name), framework="pt") as a, safe_open(str(reference / name), framework="pt") as b:
            assert set(a.keys()) == set(b.keys()), name
            different += [f"{name}:{key}" for key in a.keys() if not key.startswith(RNG_KEYS)
                          and not torch.equal(a.get_tensor(key), b.get_tensor(key))]
    return different


def check_finished(out: Path, reference: Path, steps: int) -> None:
    """The finished run: same weights and state as the reference, one log row per step, final grid."""
    assert mismatches(out, reference) == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in expected]
    assert (out / f"samples_{steps:06d}.png").exists() and (out / "samples_latest.png").exists()
    assert not list(out.glob(".*.tmp")), "temp files of killed writes were left behind"


# ---- SIGKILL at random moments ------------------------------------------------------------------

def file_id(path: Path) -> tuple | None:
    """Identity of the file now at `path` (an atomic rename gives a new inode)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def kill_at_random_moments(argv: list[str], out: Path, kills: int, seed: int,
                           finish_in_process: bool = False) -> dict:
    """Run `argv`, SIGKILL it `kills` times, resuming with `--resume` each time, then let it finish.

    Each process is allowed to complete one save first, so every kill makes progress; then it is
    killed (a) while a checkpoint write is in flight (a new temp file exists), (b) just after a
    checkpoint landed, or (c) after a random delay of up to 0.3 s (a step, a log write, a grid, a save).
    """
    rng = random.Random(seed)
    figures = {"kills": 0, "resumes": 0, "kills_during_write": 0, "kills_leaving_temp_file": 0,
               "kill_steps": [], "interrupted_writes": []}
    resume = ["train", "--out", str(out), "--resume", "--quiet"]
    process = launch(argv)
    while figures["kills"] < kills:
        mode = ("during_write", "after_save", "random")[figures["kills"] % 3]
        if not wait_and_kill(process, out, mode, rng):
            break  # the run finished first
        figures["kills"] += 1
        figures["kills_during_write"] += mode == "during_write"
        temps = check_run_folder(out)
        figures["kills_leaving_temp_file"] += bool(temps)
        figures["interrupted_writes"] += temps
        figures["kill_steps"].append(load_training_state(out)["step"])
        figures["resumes"] += 1
        if figures["kills"] == kills and finish_in_process:
            assert main_one_thread(resume) == 0
            return figures
        process = launch(resume)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return figures


def wait_and_kill(process: subprocess.Popen, out: Path, mode: str, rng: random.Random) -> bool:
    """SIGKILL `process` as `mode` says, after its first completed save; False if it exited first."""
    deadline = time.monotonic() + 300
    before = file_id(out / STATE)
    while file_id(out / STATE) == before:
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training process never saved"
        time.sleep(0.002)
    if mode == "during_write":  # a checkpoint's temp file appears: its write is in flight
        old_temps = set(out.glob(".*.safetensors.*.tmp"))
        while not set(out.glob(".*.safetensors.*.tmp")) - old_temps:
            if process.poll() is not None:
                return False
            time.sleep(0.0002)
    elif mode == "random":
        time.sleep(rng.uniform(0, 0.3))
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def test_sigkill_and_resume_gives_bit_identical_weights(data, reference, tmp_path):
    """Short version for the default suite: two kills, then a resume finishes the run."""
    out = tmp_path / "run"
    figures = kill_at_random_moments(train_argv(data, out, STEPS), out, kills=2, seed=0, finish_in_process=True)
    assert figures["kills"] == 2, figures
    check_run_folder(out)
    check_finished(out, reference, STEPS)


@pytest.mark.slow
def test_sigkill_many_times_during_a_run(data, tmp_path):
    """At least 20 SIGKILLs over one run, a third of them while a checkpoint write is in flight."""
    steps, kills = 50, 24
    reference = tmp_path / "reference"
    straight = launch(train_argv(data, reference, steps))  # runs alongside the killed one
    out = tmp_path / "run"
    figures = kill_at_random_moments(train_argv(data, out, steps), out, kills=kills, seed=1)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    check_run_folder(out)
    different = mismatches(out, reference)
    print(f"\nfault injection: {figures['kills']} SIGKILLs ({figures['kills_during_write']} aimed at a checkpoint write "
          f"in flight, {figures['kills_leaving_temp_file']} left a temp file behind), {figures['resumes']} resumes, "
          f"{len(different)} mismatching tensors of {steps} steps; killed at steps {figures['kill_steps']}; "
          f"writes cut short: {sorted(collections.Counter(figures['interrupted_writes']).items())}")
    assert figures["kills"] >= 20, figures
    check_finished(out, reference, steps)


# ---- Ctrl-C -------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_resumable_state_and_exits_cleanly(data, reference, tmp_path):
    out = tmp_path / "run"
    # No periodic saves: the only training state is the one written on Ctrl-C.
    process = launch(train_argv(data, out, STEPS, save_every=1000))
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists():  # a first step is done
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and stderr.strip() == "diffunet train: interrupted", stderr
    step = load_training_state(out)["step"]
    assert 1 <= step < STEPS
    assert f"interrupted at step {step}; state saved in {out}. Continue with --resume" in stdout
    check_run_folder(out)
    assert main_one_thread(["train", "--out", str(out), "--resume", "--save-every", "1", "--quiet"]) == 0
    assert load_training_state(out)["step"] == STEPS
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))  # continued from the saved step, nothing redone twice
    assert mismatches(out, reference) == []


def interrupt_at_step(step: int, signals: int):
    """An ema_update that first sends SIGINT `signals` times at `step`: mid-step, after the optimizer step."""
    real_update, calls = training.ema_update, {"n": 0}

    def update(*args):
        calls["n"] += 1
        for _ in range(signals if calls["n"] == step else 0):
            signal.raise_signal(signal.SIGINT)
        real_update(*args)
    return update


def test_ctrl_c_in_the_middle_of_a_step_finishes_and_saves_that_step(data, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(training, "ema_update", interrupt_at_step(3, signals=1))
    assert main_one_thread(train_argv(data, out, STEPS, save_every=1000)) == 130
    captured = capsys.readouterr()
    assert captured.err == "diffunet train: interrupted\n"
    assert f"interrupted at step 3; state saved in {out}. Continue with --resume" in captured.out
    monkeypatch.undo()
    assert main_one_thread(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert mismatches(out, reference) == []  # no half-done step was saved


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(training, "ema_update", interrupt_at_step(3, signals=2))
    assert main(train_argv(data, out, STEPS, save_every=2)) == 130
    captured = capsys.readouterr()
    assert captured.err == "diffunet train: interrupted\n" and "state saved" not in captured.out
    assert check_run_folder(out) == [] and load_training_state(out)["step"] == 2


def test_resume_clears_temp_files_and_draws_a_missing_final_grid(data, tmp_path):
    """What a kill between writes leaves: temp files, and a finished run whose final grid is missing."""
    out = tmp_path / "run"
    assert main(train_argv(data, out, steps=2)) == 0
    for name in (".metrics.jsonl.x1.tmp", ".samples_latest.png.x2.tmp", ".model.safetensors.x3.tmp"):
        (out / name).write_bytes(b"half")
    (out / "samples_000002.png").unlink()
    (out / "samples_latest.png").unlink()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert not list(out.glob(".*.tmp"))
    assert (out / "samples_000002.png").exists() and (out / "samples_latest.png").exists()


# ---- a full disk -------------------------------------------------------------------------------

def limit_file_size(limit: int):
    """preexec_fn: files may not grow beyond `limit` bytes; write() then fails with EFBIG, as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_full_disk_while_saving_keeps_the_previous_checkpoint(data, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the next checkpoint write, as a full disk would."""
    out = tmp_path / "run"
    assert main(train_argv(data, out, steps=2)) == 0  # the first checkpoint, at step 2
    before = {name: (out / name).read_bytes() for name in (MODEL, STATE, "config.json")}
    # The logs and small PNGs fit under the limit; the model (~190 kB) and state (~870 kB) do not.
    process = launch(["train", "--out", str(out), "--resume", "--steps", "4", "--quiet"],
                     preexec_fn=limit_file_size(64_000))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0] == (f"diffunet train: error: could not write {out / MODEL} (File too large); the previous "
                        f"file is kept intact. Free disk space or choose another output folder")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert check_run_folder(out) == [] and load_training_state(out)["step"] == 2
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 0  # space freed
    assert load_training_state(out)["step"] == 4


def test_full_disk_while_logging_names_the_run_folder(data, tmp_path, monkeypatch, capsys):
    """A failed write() names no file; the error still says what happened and where."""
    import diffunet.runlog as runlog

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runlog, "atomic_write_text", no_space)
    out = tmp_path / "run"
    assert main(train_argv(data, out, steps=2)) == 1
    assert capsys.readouterr().err == (f"diffunet train: error: No space left on device: a file in {out}; "
                                       f"free disk space or choose another folder\n")


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or not can_mount_tmpfs(),
                    reason="needs `unshare -rm` and tmpfs (a private mount namespace)")
def test_really_full_disk_on_a_tiny_tmpfs(data, tmp_path):
    """A real ENOSPC: the run folder is copied onto a tmpfs with room for little more than it holds."""
    out = tmp_path / "run"
    assert main(train_argv(data, out, steps=2)) == 0
    used = sum(-(-path.stat().st_size // 4096) * 4096 for path in out.iterdir())
    mount, after = tmp_path / "mount", tmp_path / "after"
    mount.mkdir()
    after.mkdir()
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" && cp -a "$3"/. "$2"/ && '
              '"$5" -m diffunet.cli train --out "$2" --resume --steps 4 --quiet; '
              'code=$?; cp -a "$2"/. "$4"/; exit $code')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(used + 100_000), str(mount), str(out),
                             str(after), sys.executable], capture_output=True, text=True, cwd=REPO, env=ENV,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"diffunet train: error: could not write {mount}/") and \
        "(No space left on device); the previous file is kept intact" in lines[0], lines[0]
    assert check_run_folder(after) == [] and load_training_state(after)["step"] == 2


# ---- a loss that turns NaN ----------------------------------------------------------------------

def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_loss, calls, kept = training.training_loss, {"n": 0}, {}

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        if calls["n"] == 5:  # the fifth step; the last checkpoint is the one of step 4
            kept.update({name: (out / name).read_bytes() for name in (MODEL, STATE, "config.json")})
            return loss * float("nan")
        return loss

    monkeypatch.setattr(training, "training_loss", nan_at_step_5)
    assert main(train_argv(data, out, steps=8, save_every=2)) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"diffunet train: error: loss became nan at step 5; the last good checkpoint (step 4) in {out} "
                     f"is kept. Lower lr (--lr), then resume (--resume)")
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert check_run_folder(out) == [] and load_training_state(out)["step"] == 4


def test_weights_that_turn_nan_are_never_saved(data, tmp_path, monkeypatch, capsys):
    """A finite loss with an update that makes the weights NaN: the save refuses, the old one stays."""
    out = tmp_path / "run"
    real_update, calls, kept = training.ema_update, {"n": 0}, {}

    def poison_at_step_3(ema, model, decay):
        calls["n"] += 1
        if calls["n"] == 3:
            kept.update({name: (out / name).read_bytes() for name in (MODEL, STATE)})
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        real_update(ema, model, decay)

    monkeypatch.setattr(training, "ema_update", poison_at_step_3)
    assert main(train_argv(data, out, steps=6)) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"diffunet train: error: the weights became inf or nan at step 3 and were not saved; "
                     f"the last good checkpoint (step 2) in {out} is kept. Lower lr (--lr), then resume (--resume)")
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert check_run_folder(out) == [] and load_training_state(out)["step"] == 2


def test_huge_learning_rate_stops_with_a_clear_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*train_argv(data, out, steps=8), "--lr", "1000", "--warmup-steps", "0"]) == 1
    error = capsys.readouterr().err.strip()
    found = re.fullmatch(rf"diffunet train: error: loss became (nan|inf) at step (\d+); the last good checkpoint "
                         rf"\(step (\d+)\) in {re.escape(str(out))} is kept. Lower lr \(--lr\), then resume "
                         rf"\(--resume\)", error)
    assert found and int(found[3]) == int(found[2]) - 1, error
    assert check_run_folder(out) == [] and load_training_state(out)["step"] == int(found[3])
