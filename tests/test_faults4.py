"""Issue 25, the last items, for real: requests larger than the machine, absurd sample counts, a store of many
shards, and the app's uploads, port and start-up line. Real files, real processes, no mocks of our own code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import RES, error_line, run

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a store of many shards: progress appended (constant cost), the manifest written once; kill -9 resumes exactly


STAGE1 = """
import sys
from hollownet.stages.precompute import PrecomputeConfig, run_precompute
run_precompute(PrecomputeConfig(model=sys.argv[1], images=sys.argv[2], prompt="a photo of sks dog", output=sys.argv[3],
                                resolution={res}, num_samples=10, shard_size=1), track_memory=False)
"""


def stage1_config(tiny_model, dog_photos, out):
    from hollownet.stages.precompute import PrecomputeConfig

    return PrecomputeConfig(model=str(tiny_model), images=str(dog_photos), prompt="a photo of sks dog", output=str(out),
                            resolution=RES, num_samples=10, shard_size=1)


def test_many_shards_append_progress_and_kill_9_resumes_exactly(tiny_model, dog_photos, tmp_path):
    from test_faults import cli_env

    from hollownet.stages.precompute import run_precompute
    from hollownet.stages.store import Store

    ref = tmp_path / "ref"
    run_precompute(stage1_config(tiny_model, dog_photos, ref), track_memory=False)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STAGE1.format(res=RES), str(tiny_model), str(dog_photos), str(out)],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest, t0, first = out / "manifest.json", time.monotonic(), None
    while not (out / "shard-00004.safetensors").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < 300
        if first is None and manifest.exists():
            first = manifest.stat()
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    now = manifest.stat()
    assert (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten after each shard
    lines = (out / "progress.jsonl").read_text().splitlines()
    assert {json.loads(x).get("shard") for x in lines} >= {0, 1, 2, 3}, lines
    with open(out / "progress.jsonl", "ab") as f:  # a line cut off by the kill, mid-append
        f.write(b'{"shard": 7, "file": "shard-0000')
    assert Store(out).done_shards() >= {0, 1, 2, 3}
    assert run_precompute(stage1_config(tiny_model, dog_photos, out), track_memory=False).resumed_shards >= 4
    for p in sorted(ref.glob("*.safetensors")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    m = json.loads(manifest.read_text())  # finished: the progress folded into the manifest, as before
    assert m["done_shards"] == list(range(10)) and set(m["files"]) == {p.name for p in ref.glob("*.safetensors")}
    assert not (out / "progress.jsonl").exists() and Store(out).is_complete() and not Store(out).damaged()


# ---- requests larger than the machine: the planner's figure against the available one, before anything loads


FIGURE = r"needs about ([\d.]+) MiB \((\w+) peak, predicted by the planner\) but cpu has 3\.00 MiB \(HOLLOWNET_AVAILABLE_MEMORY\)"


def test_train_larger_than_the_machine_is_refused_with_the_settings_that_fit(tiny_model, dog_photos, tmp_path, capsys,
                                                                              monkeypatch):
    import re

    monkeypatch.setenv("HOLLOWNET_AVAILABLE_MEMORY", "3MiB")  # the tiny model's fp32 run predicts ~3.4 MiB
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", tiny_model, "--images", dog_photos, "--prompt", "a photo of sks dog",
                       "--output", out, "--resolution", RES, "--steps", 2, "--rank", 4, "--device", "cpu")
    line = error_line(err)
    assert code == 2 and re.search(FIGURE, line) and float(re.search(FIGURE, line).group(1)) > 3.0, line
    assert "these settings fit: " in line and "--precision " in line and line.endswith("--ignore-memory-check to run it anyway")
    assert not out.exists()  # refused before stage 1: nothing written


def test_generate_larger_than_the_machine_is_refused_and_the_flag_overrides(tiny_model, tmp_path, capsys, monkeypatch):
    import re

    argv = ["generate", "--model", tiny_model, "--prompt", "a dog", "--output", tmp_path / "gen", "--steps", 1,
            "--num-images", 1, "--resolution", RES, "--device", "cpu"]
    monkeypatch.setenv("HOLLOWNET_AVAILABLE_MEMORY", "3MiB")  # fp32 generation predicts ~3.6 MiB, bf16 less
    code, _, err = run(capsys, *argv)
    line = error_line(err)
    assert code == 2 and re.search(FIGURE, line), line
    assert "this fits: --precision bf16" in line, line
    assert not (tmp_path / "gen").exists()
    code, _, err = run(capsys, *argv, "--ignore-memory-check")  # the machine here has the memory: it runs
    assert code == 0 and (tmp_path / "gen" / "000.png").is_file(), err
    monkeypatch.setenv("HOLLOWNET_AVAILABLE_MEMORY", "64GiB")  # an ordinary request with room to spare: no prediction
    from hollownet.memory.machine import clearly_fits

    assert clearly_fits(str(tiny_model), tiny_model, 64 << 30, RES) and not clearly_fits(str(tiny_model), tiny_model, 64 << 30, 1024)


def test_absurd_sample_counts_are_refused_before_the_table_is_built(tiny_model, dog_photos, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--model", tiny_model, "--images", dog_photos, "--prompt", "a photo of sks dog",
                       "--output", tmp_path / "run", "--resolution", RES, "--steps", 1_000_000_000, "--device", "cpu")
    line = error_line(err)
    assert code == 2 and "1,000,000,000 pre-computed samples" in line and "--num-samples" in line, line
