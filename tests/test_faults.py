"""Faults that really happen: a full file system (a small tmpfs), a read-only one, and ``kill -9``
of a real ``hollownet train`` process, then a rerun. Nothing is mocked.

The mounts need root (CI containers run as root); elsewhere those tests skip with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RES

LORA = "pytorch_lora_weights.safetensors"
PAGE = 4096


def cli_env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    import torch

    env = dict(os.environ)
    # the child computes with as many threads as this process (a module's one_thread fixture included): the
    # resume-exactly tests compare its bytes with a run made here, and a float sum's order follows the thread count
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if env.pop("PYTHONDONTWRITEBYTECODE", None):  # compile the libraries once, not per process (kept out of the venv)
        env.setdefault("PYTHONPYCACHEPREFIX", str(Path(os.environ.get("TMPDIR", "/tmp")) / "hollownet-test-pycache"))
    return env


def train_argv(model, photos, out, *extra) -> list[str]:
    return [sys.executable, "-m", "hollownet.cli", "train", "--model", str(model), "--images", str(photos),
            "--prompt", "a photo of sks dog", "--output", str(out), "--steps", "6", "--checkpoint-every", "2",
            "--resolution", str(RES), "--rank", "2", "--lr", "1e-3", "--device", "cpu", *extra]


def run_cli(argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def run_main(capsys, argv) -> tuple[int, str]:
    """``hollownet ...`` in this process (the disk faults are real either way); returns (code, stderr)."""
    from hollownet.cli import main

    code = main(argv[3:])
    return code, capsys.readouterr().err


class Tmpfs:
    """A real tmpfs of ``size`` bytes at ``path`` (resizable, remountable read-only)."""

    def __init__(self, path: Path, size: int, ro: bool = False):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root")

    def remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(self.path)], check=True)

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = []

    def make(size: int, ro: bool = False, name: str = "mnt") -> Tmpfs:
        fs = Tmpfs(tmp_path / name, size, ro)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.umount()


@pytest.fixture(scope="module")
def reference(tiny_model, dog_photos, tmp_path_factory):
    """An uninterrupted run: the bytes every faulted run must end with."""
    from hollownet.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(tiny_model, dog_photos, out)[3:]) == 0
    return out


def disk_use(folder: Path) -> int:
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in folder.rglob("*") if f.is_file())


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("hollownet ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


def test_stage1_disk_full_then_resume_gives_the_same_lora(tiny_model, dog_photos, reference, tmpfs, capsys):
    fs = tmpfs(disk_use(reference / "store") // 2)
    out = fs.path / "run"
    code, err = run_main(capsys, train_argv(tiny_model, dog_photos, out))
    assert code == 2
    line = error_line(err)
    assert "no space left on device" in line and "resume" in line, line
    assert not no_temp_files(fs.path)
    fs.remount("size=64m")  # space freed
    code, err = run_main(capsys, train_argv(tiny_model, dog_photos, out))
    assert code == 0, err
    assert (out / LORA).read_bytes() == (reference / LORA).read_bytes()


def test_stage2_disk_full_leaves_no_temp_file_and_resumes(tiny_model, dog_photos, reference, tmpfs, capsys):
    ckpt = max((reference / "checkpoints").glob("step-*.pt"))
    fs = tmpfs(disk_use(reference / "store") + 4 * PAGE + ckpt.stat().st_size // 2)
    out = fs.path / "run"
    code, err = run_main(capsys, train_argv(tiny_model, dog_photos, out))
    assert code == 2
    line = error_line(err)
    assert "no space left on device" in line and "step-000002.pt" in line, line
    assert not no_temp_files(fs.path) and not list((out / "checkpoints").glob("*.pt"))
    assert (out / "store" / "manifest.json").exists()  # stage 1's work is kept
    fs.remount("size=64m")
    code, err = run_main(capsys, train_argv(tiny_model, dog_photos, out))
    assert code == 0, err
    assert (out / LORA).read_bytes() == (reference / LORA).read_bytes()


def test_stage1_full_disk_keeps_finished_shards(tiny_model, dog_photos, hollow_store, tmpfs):
    """Shard 0 fits, shard 1 does not: one line, shard 0 kept, no temp file; then it resumes."""
    from hollownet.errors import HollownetError
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute
    from hollownet.stages.store import Store

    def pages(name):
        return -(-(hollow_store / name).stat().st_size // PAGE) * PAGE

    size = 2 * pages("manifest.json") + sum(pages(n) for n in ("prompts.safetensors", "latents.safetensors",
                                                                 "shard-00000.safetensors"))
    fs = tmpfs(size + pages("shard-00001.safetensors") // 2)
    cfg = lambda: PrecomputeConfig(model=str(tiny_model), images=str(dog_photos), prompt="a photo of sks dog",  # noqa: E731
                                   output=str(fs.path / "s"), resolution=RES, num_samples=12, shard_size=5)
    with pytest.raises(HollownetError, match=r"^no space left on device writing .*shard-00001\.safetensors: "
                                             r"free some space .*rerun the same command to resume$"):
        run_precompute(cfg(), track_memory=False)
    assert Store(fs.path / "s").done_shards() == {0}
    assert not no_temp_files(fs.path)
    fs.remount("size=64m")
    assert run_precompute(cfg(), track_memory=False).resumed_shards == 1
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (fs.path / "s" / name).read_bytes() == (hollow_store / name).read_bytes()


def test_export_on_a_full_disk_keeps_the_old_lora(reference, tiny_model, tmpfs):
    """save_lora onto a really full file system: one HollownetError line, the old file untouched."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from hollownet.errors import HollownetError
    from hollownet.stages.export import save_lora
    from hollownet.builder import add_lora, init_lora

    size = (reference / LORA).stat().st_size
    fs = tmpfs(-(-size // PAGE) * PAGE + PAGE)
    (fs.path / LORA).write_bytes((reference / LORA).read_bytes())  # an earlier export fills the disk
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")  # a new, larger LoRA to export
    add_lora(unet, [n for n, _ in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v"))], 2)
    init_lora(unet, torch.float32, "cpu")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    with pytest.raises(HollownetError, match="no space left on device writing .*" + LORA) as e:
        save_lora(unet, fs.path, {"format": "hollownet-lora/1"})
    assert "\n" not in str(e.value)
    assert (fs.path / LORA).read_bytes() == (reference / LORA).read_bytes()
    assert not no_temp_files(fs.path)
    load_file(fs.path / LORA)


def test_read_only_output_is_refused_in_one_line(tiny_model, dog_photos, tmpfs, tmp_path):
    from hollownet.cli import main

    fs = tmpfs(1 << 20, ro=True)
    for argv in (train_argv(tiny_model, dog_photos, fs.path / "run")[3:],
                 ["generate", "--model", str(tiny_model), "--prompt", "a sks dog", "--output", str(fs.path / "gen"),
                  "--device", "cpu"]):
        code = main(argv)
        assert code == 2
    assert not any(fs.path.iterdir())


def test_write_bytes_maps_every_disk_error(tmpfs):
    from hollownet.errors import HollownetError
    from hollownet.files import save_json, save_tensors

    import torch

    ro = tmpfs(1 << 20, ro=True, name="ro")
    with pytest.raises(HollownetError, match=r"^read-only file system writing .*a\.json: pick a writable --output$"):
        save_json(ro.path / "a.json", {"a": 1})
    full = tmpfs(2 * PAGE, name="full")
    with pytest.raises(HollownetError, match=r"^no space left on device writing .*x\.safetensors: free some space"):
        save_tensors(full.path / "x.safetensors", {"x": torch.zeros(10_000)})
    assert not list(full.path.iterdir())


def _kill_when(argv, ready, timeout=240) -> subprocess.Popen:
    """Start ``hollownet train``, SIGKILL it as soon as ``ready()`` holds; it must not have finished."""
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, "the run finished before the kill point"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc


@pytest.mark.parametrize("point", ["stage 1", "stage 2"])
def test_kill_9_then_rerun_gives_the_same_lora(tiny_model, dog_photos, reference, tmp_path, point):
    out = tmp_path / "run"
    argv = train_argv(tiny_model, dog_photos, out)
    if point == "stage 1":  # the prompts are embedded, the shard not yet written
        _kill_when(argv, lambda: (out / "store" / "prompts.safetensors").exists())
        assert not (out / "checkpoints").exists()
    else:  # a checkpoint written, training going on
        _kill_when(argv, lambda: (out / "checkpoints" / "step-000002.pt").exists())
        assert not (out / LORA).exists()
    r = run_cli(argv)  # the same command, no --resume
    assert r.returncode == 0, r.stderr
    if point == "stage 2":
        assert "resuming from step 2" in r.stderr or "resuming from step 4" in r.stderr, r.stderr
    assert (out / LORA).read_bytes() == (reference / LORA).read_bytes()
    assert not no_temp_files(out)
