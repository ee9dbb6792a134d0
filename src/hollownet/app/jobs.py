"""The app's background work: one job at a time, its state in the server and on disk.

Plain Python (no Gradio), so it is tested as functions. A job is a training run or a generation
batch, run in a thread of the server. Its state (phase, step, losses, measured memory, the one-line
error) is kept in the :class:`Job` and written to ``FOLDER/app-<kind>.json`` at every change, so a
reloaded page re-attaches to the server's job and a restarted server finds the last run on disk (a
job that was running when the server died reads as ``interrupted``: resume it). Nothing computed is
lost: stage 1 and stage 2 resume from their store and checkpoints (``TrainRequest(resume=True)``).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hollownet.evaluation.datasets import DatasetError
from hollownet.photos import PhotoError
from hollownet.errors import HollownetError
from hollownet.stages.generate import GenerateConfig, run_generate
from hollownet.files import disk_error, read_json, save_json
from hollownet.stages.train import TrainingStopped
from hollownet.settings import Modes
from hollownet.workflow import TrainRequest, personalize


RUNNING, DONE, STOPPED, FAILED, INTERRUPTED = "running", "done", "stopped", "failed", "interrupted"
KINDS = ("train", "generate")


def one_line_error(exc: BaseException) -> str | None:
    """The CLI's one-line message for a problem the user can fix; None for a bug (shown as such)."""
    if isinstance(exc, (HollownetError, PhotoError, DatasetError)):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError):
        mapped = disk_error(exc, exc.filename or "the output")
        return " ".join(str(mapped).split()) if mapped is not None else None
    return None


def train_request(settings: dict) -> TrainRequest:
    """The app's ONE place that builds a TrainRequest: the basic fields, and the modes (precision, ...)."""
    keys = ("model", "images", "prompt", "output", "steps", "rank", "resolution", "lr", "batch", "seed", "device",
            "method", "sample_every", "save_every", "sample_steps")
    modes, _ = Modes.split(settings)
    return TrainRequest(**{k: settings[k] for k in keys if k in settings}, modes=modes, resume=True)


@dataclass
class Job:
    kind: str  # train | generate
    folder: str  # the run folder; the state file is FOLDER/app-<kind>.json
    settings: dict
    status: str = RUNNING
    phase: str = "starting"
    step: int = 0
    total: int = 0
    losses: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # measured: tensor peaks per stage, the process's peak RSS
    warnings: list = field(default_factory=list)
    error: str | None = None
    result: dict | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._saved = 0.0

    @property
    def path(self) -> Path:
        return Path(self.folder) / f"app-{self.kind}.json"

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    def update(self, force: bool = False, **fields) -> None:
        """Change fields; written to disk at once for a change of phase or status, else at most once a second."""
        with self._lock:
            for k, v in fields.items():
                setattr(self, k, v)
            if force or time.time() - self._saved >= 1.0:
                self._saved = time.time()
                save_json(self.path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Job:
        data = read_json(path, "delete it: the app then forgets that job (its files are kept)")
        job = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        if job.status == RUNNING:  # the server that ran it is gone: its work is on disk, resumable
            job.status, job.error = INTERRUPTED, "the app stopped while this ran; finished work is kept: resume to continue"
        return job

    def one_line(self) -> str:
        """The status line the page shows."""
        what = "training" if self.kind == "train" else "generation"
        if self.status == RUNNING:
            steps = f", step {self.step}/{self.total}" if self.total else ""
            return f"{what} running: {self.phase}{steps}"
        if self.status == DONE:
            return f"{what} done in {self.finished - self.started:.0f} s"
        return f"{what} {self.status}: {self.error}" if self.error else f"{what} {self.status}"


def peak_rss() -> int:
    """This process's peak resident memory in bytes (the server and its jobs)."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


class Jobs:
    """The server's job registry: at most one job runs; the newest job of each kind is kept."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self._lock = threading.Lock()
        self.latest: dict[str, Job] = {}
        self._threads: list[threading.Thread] = []
        for kind in KINDS:  # a restarted server re-attaches to the newest run on disk
            found = sorted(self.workdir.glob(f"runs/*/app-{kind}.json"), key=lambda p: p.stat().st_mtime)
            if found:
                try:
                    self.latest[kind] = Job.load(found[-1])
                except HollownetError as e:  # a damaged record must not stop the server: that job is forgotten
                    warnings.warn(str(e))

    def running(self) -> Job | None:
        return next((j for j in self.latest.values() if j.running), None)

    def refusal(self) -> str | None:
        """The one line that refuses a second run while one runs; None when nothing runs."""
        busy = self.running()
        if busy is None:
            return None
        return (f"{busy.one_line()} (started {time.strftime('%H:%M:%S', time.localtime(busy.started))}): "
                "wait for it to finish or stop it first; one run at a time")

    def new_run_folder(self) -> Path:
        folder = self.workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while folder.exists():
            n += 1
            folder = folder.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        return folder

    def start(self, kind: str, folder: str | Path, settings: dict, work, **fields) -> Job:
        """Run ``work(job)`` in a thread; refused in one line while another job runs. ``fields``: the Job's first state."""
        with self._lock:
            if self.refusal():
                raise HollownetError(self.refusal())
            job = Job(kind=kind, folder=str(folder), settings=dict(settings), **fields)
            Path(folder).mkdir(parents=True, exist_ok=True)
            job.update(force=True)
            self.latest[kind] = job
        thread = threading.Thread(target=self._run, args=(job, work), name=f"hollownet-{kind}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return job

    def _run(self, job: Job, work) -> None:
        # (warnings are not captured here: warnings.catch_warnings is process-global, not per thread; the
        # handlers collect the pre-flight warnings before a job starts)
        try:
            result = work(job)
            status, error = DONE, None
        except TrainingStopped as e:
            result, status, error = None, STOPPED, str(e)
        except Exception as e:  # noqa: BLE001  the job's thread must record every failure, not die silently
            result, status = None, FAILED
            error = one_line_error(e) or f"internal error ({type(e).__name__}: {e}); please report it"
        job.update(force=True, status=status, error=error, result=result, finished=time.time(),
                   memory={**job.memory, "process_peak_rss": peak_rss()})

    def stop(self) -> str:
        job = self.running()
        if job is None:
            return "nothing is running"
        if job.kind != "train":
            return "generation cannot be stopped midway; it ends after its images"
        job.request_stop()
        if job.phase.startswith("stage 1"):  # stage 1 has no stop hook; its store is kept shard by shard anyway
            job.update(force=True, phase=job.phase + " (stopping when it ends)")
            return "stopping when stage 1 (pre-compute) ends; its store and a checkpoint are kept"
        job.update(force=True, phase=job.phase + " (stopping after this step)")
        return "stopping after the current step; the checkpoint is kept"

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the job threads (tests, and the server at exit)."""
        for t in list(self._threads):
            t.join(timeout)


# ------------------------------------------------------------------------------- the two jobs


def train_work(job: Job) -> dict:
    """Stage 1, stage 2 (progress per step, stop on request), export: ``workflow.personalize``."""
    req = train_request(job.settings)
    job.update(force=True, phase="stage 1: pre-compute (text encoder, VAE, U-Net hollow)", total=req.steps, step=0)

    def on_step(step: int, losses: list, memory: dict | None) -> bool:
        if job.phase.startswith("stage 1"):
            job.update(force=True, phase="stage 2: training the LoRA")
        mem = {**job.memory, "process_peak_rss": peak_rss()}
        if memory:
            mem["train_peak_bytes"] = memory["peak_bytes"]
        job.update(step=step, losses=[round(x, 6) for x in losses], memory=mem)
        return job.stop_requested

    record = personalize(req, on_step=on_step)
    measured = {f"{stage}_peak_bytes": (record["memory"][stage] or {}).get("peak_bytes") for stage in ("precompute", "train")}
    # a resumed run skips what was done (and measured) before: keep those figures
    job.update(force=True, phase="done", step=req.steps, losses=record["loss"]["history"],
               memory={**job.memory, **{k: v for k, v in measured.items() if v}})
    return {"lora_files": record["outputs"]["lora_files"], "summary": record["summary"]}


def generate_config(settings: dict) -> GenerateConfig:
    keys = ("model", "lora", "prompt", "output", "steps", "guidance", "seed", "num_images", "merged", "device",
            "negative_prompt", "step")
    return GenerateConfig(**{k: settings[k] for k in keys if k in settings})


def generate_work(job: Job) -> dict:
    cfg = generate_config(job.settings)
    job.update(force=True, phase=f"generating {cfg.num_images} image(s), {'merged' if cfg.merged else 'two-path'}",
               total=cfg.num_images)
    record = run_generate(cfg)
    out = Path(cfg.output)
    job.update(force=True, phase="done", step=cfg.num_images,
               memory={**job.memory, "generate_peak_bytes": (record.get("memory") or {}).get("peak_bytes")})
    return {"images": [str(out / f) for f in record["images"]], "mode": record["mode"]}
