"""Run many independent jobs (bench cells, ``train-many`` subjects): here or as Ray tasks on a cluster.

A job is a picklable function call that writes its own results (a cell's result.json, a subject's
OUTPUT/train.json); the executor only runs it, retries it when its process died (kill -9, the OOM
killer, a lost node) and reports how each ended. Every job runs in a fresh process
(``python -m hollownet.executor``), so the memory one job held is back before the next starts:

* ``local``  ``workers`` jobs at once on this machine (needs nothing);
* ``ray``    each job a Ray task reserving ``num_gpus=1`` for a CUDA job, else ``num_cpus=cpus_per_job``,
  and ``memory=`` the planner's prediction of its whole-run peak (:func:`job_memory`), so a cluster
  packs as many as fit. Without ``address`` a local Ray is started; with it, that cluster is used
  (``pip install hollownet[ray]``; Ray is imported only here).

Paths in a job are taken from the driver's current folder (workers change to it first); on a
cluster, keep the model, data and output on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hollownet.errors import HollownetError

EXECUTORS = ("local", "ray")
RETRIES = 2  # extra tries for a job whose process died; a job that fails by itself is not retried
PROCESS_OVERHEAD = 1 << 30  # Python, torch, diffusers and the allocator on top of the predicted tensor peak


class JobKilled(RuntimeError):
    """A job's own child process died by a signal: the job is worth another try."""


@dataclass
class Job:
    name: str
    fn: Callable
    args: tuple = ()
    memory: int | None = None  # bytes to reserve (Ray's memory=); None: no reservation


@dataclass
class Outcome:
    job: Job
    ok: bool
    value: object = None
    error: str | None = None
    attempts: int = 1


@dataclass
class Executor:
    kind: str = "local"
    workers: int | None = None  # jobs at once (local default 1; ray default: as many as the cluster fits)
    address: str | None = None  # ray: an existing cluster (e.g. ray://head:10001 or auto)
    cpus_per_job: int | None = None  # default: this machine's cores / workers (1 on Ray without workers)
    gpu: bool = False  # the jobs run on CUDA: each reserves one GPU
    retries: int = RETRIES

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise HollownetError(f"--executor {self.kind!r} is not one of {', '.join(EXECUTORS)}")
        if self.workers is not None and self.workers < 1:
            raise HollownetError(f"--workers must be at least 1 (got {self.workers})")
        if self.address and self.kind != "ray":
            raise HollownetError("--address is for --executor ray")

    @property
    def in_process(self) -> bool:
        """One local worker: the caller may just run its jobs itself, one after another."""
        return self.kind == "local" and (self.workers or 1) == 1

    @property
    def cpus(self) -> int:
        if self.cpus_per_job:
            return self.cpus_per_job
        if self.address or self.gpu or (self.kind == "ray" and not self.workers):
            return 1  # a GPU job needs little CPU; without a cap, Ray packs one job per core
        return max(1, (os.cpu_count() or 1) // (self.workers or 1))

    def run(self, jobs: list[Job], log: Callable[[str], None] = print) -> list[Outcome]:
        """Run every job; outcomes in the order of ``jobs``. A job's exception is its outcome, not raised."""
        if not jobs:
            return []
        return (_run_ray if self.kind == "ray" else _run_local)(self, jobs, log)


def describe(outcomes: list[Outcome]) -> str:
    ok = sum(o.ok for o in outcomes)
    retried = sum(o.attempts > 1 for o in outcomes)
    return (f"{ok} of {len(outcomes)} job(s) finished" + (f", {len(outcomes) - ok} failed" if ok < len(outcomes) else "")
            + (f", {retried} after a retry" if retried else ""))


def job_memory(request) -> int | None:
    """Bytes a job reserves: the planner's peak over the whole run (pre-compute, training and the
    batch-2 inference of generation) plus :data:`PROCESS_OVERHEAD`; None where it cannot predict."""
    # lazily: the planner imports torch, and the job wrapper and --help must stay light
    from hollownet.memory.planner import plan_memory

    try:
        plan = plan_memory(request, stages=("precompute", "train", "inference"))  # generation's own plan: not used here
    except Exception:  # noqa: BLE001 - no prediction (an unplanned model): the job reserves nothing
        return None
    return max(plan.peak, *(r.peak_bytes for r in plan.inference.values())) + PROCESS_OVERHEAD


# ------------------------------------------------------------------------------------ in a worker


try:  # looked up here, not in the forked child (where little is safe to do)
    _PRCTL = ctypes.CDLL(None).prctl
except (OSError, AttributeError, TypeError):  # not Linux
    _PRCTL = None


def die_with_parent() -> None:
    """``preexec_fn`` for a job's process: it is killed when its parent dies, so a retry never races it."""
    if _PRCTL is not None:
        _PRCTL(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _in_subprocess(payload: bytes, cpus: int) -> tuple[str, object]:
    """One try of a pickled job in a fresh ``python -m hollownet.executor``: ("ok", value), ("error",
    text) when the job raised, ("killed", text) when its process died."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}
    with tempfile.TemporaryDirectory(prefix="hollownet-job-") as tmp:
        src, dst = Path(tmp) / "job.pkl", Path(tmp) / "outcome.pkl"
        src.write_bytes(payload)
        proc = subprocess.run([sys.executable, "-m", "hollownet.executor", str(src), str(dst)], env=env,
                              preexec_fn=die_with_parent if _PRCTL else None)
        if not dst.exists():
            return "killed", f"exit code {proc.returncode}"
        return pickle.loads(dst.read_bytes())


def _child_main(argv: list[str]) -> int:
    """``python -m hollownet.executor IN OUT``: run the pickled job in IN, pickle how it ended to OUT."""
    try:
        with open(argv[0], "rb") as f:
            fn, args, cwd = pickle.load(f)
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths mean what they mean to the driver
        reply = ("ok", fn(*args))
    except JobKilled as e:
        reply = ("killed", str(e))
    except BaseException as e:  # noqa: BLE001 - reported to the driver as the job's outcome
        reply = ("error", f"{type(e).__name__}: {e}")
    with open(argv[1], "wb") as f:
        pickle.dump(reply, f)
    return 0


def _payload(job: Job) -> bytes:
    return pickle.dumps((job.fn, job.args, os.getcwd()))


# ------------------------------------------------------------------------------------ local


def _run_local(ex: Executor, jobs: list[Job], log) -> list[Outcome]:
    lock = threading.Lock()

    def one(job: Job) -> Outcome:
        payload = _payload(job)
        for attempt in range(1, ex.retries + 2):
            kind, value = _in_subprocess(payload, ex.cpus)
            if kind != "killed":
                return Outcome(job, kind == "ok", value if kind == "ok" else None, None if kind == "ok" else value, attempt)
            with lock:
                log(f"    {job.name}: its process died ({value}); " + ("retrying" if attempt <= ex.retries else "giving up"))
        return Outcome(job, False, error=f"its process died {attempt} times ({value})", attempts=attempt)

    with ThreadPoolExecutor(max_workers=ex.workers or 1) as pool:
        return list(pool.map(one, jobs))


# ------------------------------------------------------------------------------------ ray


def _ray_task(payload: bytes, cpus: int):
    """A Ray task: the job in a child process (fresh memory each time); a killed child is a retryable failure."""
    kind, value = _in_subprocess(payload, cpus)
    if kind == "killed":
        raise JobKilled(f"the job's process died ({value})")
    return kind, value


def _run_ray(ex: Executor, jobs: list[Job], log) -> list[Outcome]:
    try:
        import ray  # the optional extra: only this executor needs it
    except ImportError:
        raise HollownetError("--executor ray needs Ray: pip install 'hollownet[ray]'") from None
    started = not ray.is_initialized()
    if started:
        cpus = None if ex.address or not ex.workers else ex.workers * ex.cpus
        os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 starves the jobs on a busy machine
        ray.init(address=ex.address, num_cpus=cpus, include_dashboard=False, configure_logging=False)
    try:
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        for job in jobs:
            if job.memory and largest and job.memory > largest:
                raise HollownetError(f"{job.name} needs {job.memory / 2**30:.1f} GiB (predicted) but the largest "
                                     f"Ray node offers {largest / 2**30:.1f} GiB")
        remote = ray.remote(_ray_task)
        cap = ex.workers or len(jobs)
        queue, pending, outcomes = list(enumerate(jobs)), {}, [None] * len(jobs)
        while queue or pending:
            while queue and len(pending) < cap:
                i, job = queue.pop(0)
                ref = remote.options(
                    name=f"hollownet {job.name}", num_cpus=ex.cpus, num_gpus=1 if ex.gpu else 0,
                    memory=job.memory or None, max_retries=ex.retries, retry_exceptions=[JobKilled],
                ).remote(_payload(job), ex.cpus)
                pending[ref] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                kind, value = ray.get(done[0])
                outcomes[i] = Outcome(jobs[i], kind == "ok", value if kind == "ok" else None, None if kind == "ok" else value)
            except ray.exceptions.RayError as e:  # killed more often than max_retries allows, or its node lost
                cause = getattr(e, "cause", None) or e
                outcomes[i] = Outcome(jobs[i], False, error=f"{type(cause).__name__}: {str(cause).splitlines()[0]}",
                                      attempts=ex.retries + 1)
                log(f"    {jobs[i].name}: {outcomes[i].error}")
        return outcomes
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    from hollownet.executor import _child_main as main  # the module's own classes, not __main__'s copies

    sys.exit(main(sys.argv[1:]))
