"""Issue 16: bench cells and train-many jobs as jobs in their own processes, locally or on Ray.

The Ray tests share one local 2-CPU cluster (module fixture) and are skipped, saying so, where Ray is
not installed; .ci/run installs the ``ray`` extra, so CI runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import RES
from executor_jobs import child_killed, crash_once, fails
from helpers_models import build_tiny_clip, build_tiny_vit
from hollownet.cli import build_parser, main
from hollownet.errors import HollownetError
from hollownet.evaluation import bench as B
from hollownet.executor import PROCESS_OVERHEAD, Executor, Job, Outcome
from hollownet.memory.planner import plan_memory
from hollownet.requests import PlanRequest
from hollownet.trainmany import job_argv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPTS = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
]

Live Subject Prompts

prompt_list = [
'a {0} {1} on the beach'.format(unique_token, class_token),
]
"""


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hollownet[ray]'; CI installs it)")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as the executor's own local Ray: not starved by other load
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, dreambooth):
    root = tmp_path_factory.mktemp("dataset")
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    for name in ("backpack", "dog"):
        (root / name).mkdir()
        for photo in sorted((dreambooth / name).glob("*.jpg"))[:3]:
            shutil.copy(photo, root / name / photo.name)
    return root


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Tiny DINO / CLIP folders: each worker process builds its own scorers from them."""
    root = tmp_path_factory.mktemp("scorers")
    return str(build_tiny_vit(root / "vit")), str(build_tiny_clip(root / "clip"))


def config(model, dataset, out, scorers, **kw) -> B.BenchConfig:
    return B.BenchConfig(**{**dict(model=str(model), dataset=str(dataset), output=str(out), methods="hollow",
                                   seeds="0", steps=2, rank=2, lr=1e-3, resolution=RES, images_per_prompt=1,
                                   gen_steps=2, dino_model=scorers[0], clip_model=scorers[1], device="cpu"), **kw})


def comparable(summary: dict) -> list[dict]:
    """The summary's rows less the timings (wall-clock differs between runs)."""
    return [{k: v for k, v in row.items() if k != "timings"} for row in summary["methods"]]


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the command name in (...) may hold spaces


def _descends_from_us(pid: int) -> bool:
    """Whether this test process is an ancestor of ``pid`` (the Ray cluster it started, its workers)."""
    me = os.getpid()
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == me:
                return True
    except (OSError, ValueError, IndexError):
        pass
    return False


def job_processes() -> dict[int, str]:
    """pid -> command line of every live ``python -m hollownet.executor`` (a job's real process) that this test
    started: never another's (a benchmark running beside the suite on the same machine)."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if d.name.isdigit() and b"hollownet.executor" in cmd and _descends_from_us(int(d.name)):
            found[int(d.name)] = b" ".join(cmd).decode(errors="replace")
    return found


def test_ray_bench_with_two_workers_gives_the_local_summary_though_a_worker_is_killed(
        ray_cluster, tiny_model, dataset, scorers, tmp_path):
    local = B.run_bench(config(tiny_model, dataset, tmp_path / "local", scorers), log=lambda m: None)
    out, logs, done, seen, killed = tmp_path / "ray", [], {}, {}, []
    cells = [out / "cells" / name / "hollow" / "seed-0" for name in ("backpack", "dog")]

    def run():
        done["summary"] = B.run_bench(config(tiny_model, dataset, out, scorers), log=logs.append,
                                      executor=Executor("ray", workers=2))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        now = job_processes()
        seen.update(now)
        mid_cell = any((c / "train").is_dir() for c in cells) and not any((c / "result.json").exists() for c in cells)
        if not killed and mid_cell and now:
            killed.append(next(iter(now)))
            os.kill(killed[0], signal.SIGKILL)  # the real process running a cell, mid-cell
        time.sleep(0.2)
    thread.join(timeout=60)
    remote = done["summary"]
    assert killed, "no cell could be killed mid-cell"
    assert len(seen) >= 3, seen  # two cells at once, and the killed one again in a new process
    assert any("2 cell(s) with the ray executor, 2 at once" in line for line in logs), logs
    assert (local["n_cells"], local["n_ok"]) == (remote["n_cells"], remote["n_ok"]) == (2, 2)
    mine, theirs = comparable(local), comparable(remote)
    for a, b in zip(mine, theirs):  # the workers use 1 thread, this process 2: scores agree to rounding
        for k in a["scores"]:
            assert b["scores"][k]["mean"] == pytest.approx(a["scores"][k]["mean"], abs=1e-4)
            a["scores"][k]["mean"] = b["scores"][k]["mean"]
        a.pop("per_subject"), b.pop("per_subject"), a.pop("over_seeds"), b.pop("over_seeds")
        for k in a["scores"]:
            a["scores"][k].pop("std"), b["scores"][k].pop("std")
    assert mine == theirs  # memory peaks, parameters, plans, counts: exactly the same
    for cell in cells:
        result = json.loads((cell / "result.json").read_text())
        assert result["status"] == "ok" and result["memory"]["train_peak_bytes"] > 0
        assert not (cell / "train" / "store").exists()  # cleaned as in the local run
    md = [(tmp_path / run / "summary.md").read_text().splitlines() for run in ("local", "ray")]
    assert md[0][:2] == md[1][:2] and "- 2 of 2 cells finished." in md[1]


def test_train_many_on_ray_runs_each_job_once_and_skips_finished(ray_cluster, tiny_model, dataset, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative outputs: the workers resolve them in the driver's folder
    jobs = tmp_path / "jobs.jsonl"
    common = {"model": str(tiny_model), "steps": 2, "rank": 2, "resolution": RES, "checkpoint_every": 0}
    jobs.write_text("# two subjects\n" + "".join(
        json.dumps({**common, "images": str(dataset / name), "prompt": f"a photo of sks {name}",
                    "output": f"runs/{name}", "format": "diffusers"}) + "\n" for name in ("dog", "backpack")))
    assert main(["train-many", str(jobs), "--executor", "ray", "--workers", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 job(s), 0 already finished, 2 to run" in out and "2 of 2 job(s) finished" in out
    for name in ("dog", "backpack"):
        record = json.loads((tmp_path / "runs" / name / "train.json").read_text())
        assert record["settings"]["steps"] == 2 and record["settings"]["prompt"] == f"a photo of sks {name}"
        assert (tmp_path / "runs" / name / "pytorch_lora_weights.safetensors").is_file()
        assert not (tmp_path / "runs" / name / "pytorch_lora_weights_kohya.safetensors").exists()  # format=diffusers
    assert main(["train-many", str(jobs), "--executor", "ray"]) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out


# --------------------------------------------------------------------------
# No Ray needed.
# --------------------------------------------------------------------------


def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_job_lines_become_train_arguments_checked_by_trains_parser():
    argv, ns = job_argv({"model": "m", "images": "i", "prompt": "p", "output": "o", "grad_checkpointing": True,
                         "resume": False, "hollow_blocks": ["mid_block", "up_blocks.0"], "seed": None},
                        _train_parser(), "jobs.jsonl line 1")
    assert argv == ["--model", "m", "--images", "i", "--prompt", "p", "--output", "o", "--grad-checkpointing",
                    "--no-resume", "--hollow-blocks", "mid_block,up_blocks.0"]
    assert ns.grad_checkpointing and not ns.resume and ns.hollow_blocks == ["mid_block", "up_blocks.0"]
    with pytest.raises(HollownetError, match=r"^jobs.jsonl line 2: 'epochs' is not a 'hollownet train' flag$"):
        job_argv({"output": "o", "epochs": 3}, _train_parser(), "jobs.jsonl line 2")
    with pytest.raises(HollownetError, match=r"^jobs.jsonl line 3: .*--images"):
        job_argv({"model": "m", "prompt": "p", "output": "o"}, _train_parser(), "jobs.jsonl line 3")


def test_train_many_refuses_bad_files_in_one_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    for text, why in (("{not json\n", "line 1: not JSON"), ('{"model": "m"}\n', "line 1: a job is a JSON object"),
                      ('{"model": "m", "images": "i", "prompt": "p", "output": "o"}\n' * 2, "line 2: output 'o' is another")):
        jobs.write_text(text)
        assert main(["train-many", str(jobs)]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err


def test_local_executor_retries_a_killed_process_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    logs = []
    outcomes = Executor("local", workers=2, retries=1).run(
        [Job("crash", crash_once, (str(tmp_path / "m"),)), Job("fails", fails, (0,)),
         Job("killed", child_killed, (0,))], logs.append)
    crashed, failed, child = outcomes
    assert (crashed.ok, crashed.value, crashed.attempts) == (True, "second try", 2)
    assert (failed.ok, failed.error, failed.attempts) == (False, "HollownetError: bad photos", 1)  # not retried
    assert not child.ok and child.attempts == 2 and "died 2 times" in child.error
    assert any("crash: its process died (exit code -9); retrying" in line for line in logs), logs


class _Recorder(Executor):
    """A Ray-kind executor that runs nothing: every job's worker 'died' (what the bench does then)."""

    def run(self, jobs, log=print):
        self.jobs = jobs
        return [Outcome(j, False, error="WorkerCrashedError: the worker died", attempts=3) for j in jobs]


def test_cells_reserve_the_planners_whole_run_peak_and_a_lost_cell_stays_retryable(tiny_model, dataset, scorers,
                                                                                    tmp_path):
    recorder = _Recorder("ray", workers=2)
    summary = B.run_bench(config(tiny_model, dataset, tmp_path, scorers, methods="hollow,lora:r=2", subjects=["dog"]),
                          log=lambda m: None, executor=recorder)
    plan = plan_memory(PlanRequest(model=str(tiny_model), method="hollow", rank=2, resolution=RES, steps=2, photos=3),
                       stages=("precompute", "train", "inference"))
    assert recorder.jobs[0].memory == max(plan.peak, plan.inference[2].peak_bytes) + PROCESS_OVERHEAD
    assert PROCESS_OVERHEAD < recorder.jobs[0].memory < recorder.jobs[1].memory  # the hollowed net needs less
    assert summary["n_failed"] == 2 and "worker: WorkerCrashedError" in summary["failed"][0]["error"]
    cell = json.loads((tmp_path / "cells" / "dog" / "hollow" / "seed-0" / "result.json").read_text())
    assert cell["status"] == "failed"  # a rerun retries failed cells
