"""``hollownet train-many JOBS.jsonl``: personalize many subjects, one ``hollownet train`` per line.

Each line is a JSON object whose keys are ``hollownet train``'s flag names (``model``, ``images``,
``prompt``, ``output``, ``steps``, ``grad_checkpointing``: true, ``hollow_blocks``: [...], ...); blank
lines and lines starting with ``#`` are skipped. Every job runs ``hollownet train`` in its own
subprocess through :mod:`hollownet.executor` (here, N at once, or on Ray). A job whose OUTPUT/train.json
exists is finished and skipped on a rerun; a killed job is retried and resumes from its store and
checkpoints (train's own resume); a failed job changes no other job's folder. Its output goes to
OUTPUT/train-many.log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from hollownet.errors import HollownetError
from hollownet.executor import EXECUTORS, Executor, Job, JobKilled, describe, die_with_parent, job_memory
from hollownet.requests import PlanRequest
from hollownet.settings import Modes

LOG_NAME = "train-many.log"


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    """--executor, --address, --workers, --cpus-per-job (bench and train-many)."""
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: on this machine (default); ray: each job a Ray task (pip install 'hollownet[ray]')")
    p.add_argument("--address", help="--executor ray: an existing cluster, e.g. auto or ray://head:10001 "
                                      "(default: start a local Ray)")
    p.add_argument("--workers", type=int, help="jobs at once (default 1 locally; with ray: as many as the "
                                               "cluster's CPUs, GPUs and memory fit)")
    p.add_argument("--cpus-per-job", type=int, help="threads / Ray CPUs per job (default: cores / workers; 1 with "
                                                    "--address, --device cuda, or ray without --workers)")


def executor_from_args(args, device: str | None) -> Executor:
    return Executor(kind=args.executor, workers=args.workers, address=args.address, cpus_per_job=args.cpus_per_job,
                    gpu=str(device or "").startswith("cuda"))


def add_train_many_parser(sub) -> None:
    """The ``train-many`` subcommand; ``sub`` already has ``train``, whose flags the lines use."""
    m = sub.add_parser("train-many", help="personalize many subjects: one 'hollownet train' per JSON line, here or on Ray",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  hollownet train-many jobs.jsonl --workers 2                  # two at once on this machine
  hollownet train-many jobs.jsonl --executor ray --address auto   # on a running Ray cluster

jobs.jsonl, one subject per line, keys = 'hollownet train' flag names:
  {"model": "./sd21", "images": "photos/dog", "prompt": "a photo of sks dog", "output": "runs/dog"}
  {"model": "./sd21", "images": "photos/cat", "prompt": "a photo of sks cat", "output": "runs/cat", "steps": 800}
A job whose OUTPUT/train.json exists is skipped; rerun the same command after a crash to finish the rest.
""")
    m.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON object per line: a 'hollownet train' run")
    add_executor_flags(m)
    m.add_argument("--device", default=None, help="cuda makes each Ray job reserve one GPU (default: cuda if present)")
    m.add_argument("--verbose", action="store_true", help="show the libraries' logs, progress bars and warnings")
    m.set_defaults(train_parser=sub.choices["train"])


def job_argv(entry: dict, train_parser: argparse.ArgumentParser, where: str) -> tuple[list[str], argparse.Namespace]:
    """A JSON line -> ``hollownet train`` arguments, checked by train's own parser (one-line errors)."""
    flags = {s for a in train_parser._actions for s in a.option_strings}
    argv = []
    for key, value in entry.items():
        flag = "--" + key.replace("_", "-")
        if flag not in flags or flag in ("-h", "--help"):
            raise HollownetError(f"{where}: {key!r} is not a 'hollownet train' flag")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv += [f"--no-{flag[2:]}"] if f"--no-{flag[2:]}" in flags else []
        elif value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]

    def refuse(message):
        raise HollownetError(f"{where}: {message}")

    train_parser.error = refuse  # argparse would print usage and exit; one line instead
    return argv, train_parser.parse_args(argv)


def train_job(argv: list[str], output: str) -> dict:
    """One job in its worker: ``hollownet train`` in a subprocess that dies with the worker."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / LOG_NAME, "ab") as log:
        code = subprocess.run([sys.executable, "-m", "hollownet.cli", "train", *argv], stdout=log,
                              stderr=subprocess.STDOUT, preexec_fn=die_with_parent).returncode
    if code < 0:  # killed (OOM killer, kill -9): worth another try, train resumes where it was
        raise JobKilled(f"hollownet train was killed by signal {-code}")
    if code != 0:
        lines = (out / LOG_NAME).read_text(errors="replace").splitlines()
        raise HollownetError(next((s for s in reversed(lines) if "error:" in s), f"hollownet train exited with {code}"))
    return {"seconds": round(time.perf_counter() - t0, 1)}


def _memory(ns: argparse.Namespace) -> int | None:
    """The planner's prediction for a job's settings (train's defaults for the flags it leaves unset)."""
    from hollownet.photos import IMAGE_EXTENSIONS  # lazy: photos.py imports torch, and the CLI imports this module

    images = Path(ns.images)
    photos = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in images.iterdir()) if images.is_dir() else 4
    modes, rest = Modes.split(vars(ns))
    names = {f.name for f in fields(PlanRequest)}  # a flag left unset (None): the request's model default
    return job_memory(PlanRequest(**{k: v for k, v in rest.items() if k in names and v is not None}, modes=modes,
                                  photos=max(1, photos), class_photos=4 if ns.class_images else 0))


def run_train_many(path: str | Path, executor: Executor, train_parser: argparse.ArgumentParser, log=print) -> dict:
    """Every unfinished line of ``path`` through ``executor``; returns the summary (also printed by the CLI)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise HollownetError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise HollownetError(f"{path.name} line {line} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                             "save the file as UTF-8") from None
    jobs, skipped, outputs, plans = [], [], set(), {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path.name} line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise HollownetError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not entry.get("output"):
            raise HollownetError(f"{where}: a job is a JSON object with at least model, images, prompt and output")
        argv, ns = job_argv(entry, train_parser, where)
        output = str(Path(ns.output).resolve())
        if output in outputs:
            raise HollownetError(f"{where}: output {ns.output!r} is another line's too; each job needs its own folder")
        outputs.add(output)
        if (Path(output) / "train.json").is_file():
            skipped.append(ns.output)
            continue
        memory = None
        if executor.kind == "ray":  # only Ray reserves memory
            key = json.dumps({k: v for k, v in vars(ns).items() if k not in ("images", "prompt", "output", "seed")},
                             sort_keys=True, default=str)
            memory = plans[key] if key in plans else plans.setdefault(key, _memory(ns))
        jobs.append(Job(ns.output, train_job, (argv, ns.output), memory=memory))
    log(f"train-many: {len(jobs) + len(skipped)} job(s), {len(skipped)} already finished, {len(jobs)} to run"
        + (f" ({executor.kind} executor)" if jobs else ""))
    outcomes = executor.run(jobs, log)
    rows = [{"output": s, "status": "finished before"} for s in skipped]
    rows += [{"output": o.job.name, "status": "ok" if o.ok else "failed", "error": o.error,
              "seconds": (o.value or {}).get("seconds"), "attempts": o.attempts} for o in outcomes]
    summary = {"jobs": rows, "n_ok": sum(o.ok for o in outcomes), "n_failed": sum(not o.ok for o in outcomes),
               "n_skipped": len(skipped)}
    for r in rows:
        what = r["status"] if r["status"] != "ok" else f"ok in {r['seconds']} s"
        log(f"  {r['output']}: {what}" + (f": {r['error']}" if r.get("error") else ""))
    log(f"train-many: {describe(outcomes)}" + (f", {len(skipped)} skipped (finished before)" if skipped else "")
        + (f"; rerun the same command to retry the failed (logs: OUTPUT/{LOG_NAME})" if summary["n_failed"] else ""))
    return summary


def cmd_train_many(args) -> int:
    from hollownet.devices import resolve_device  # lazily: the device probe imports torch

    summary = run_train_many(args.jobs, executor_from_args(args, resolve_device(args.device)), args.train_parser)
    return 1 if summary["n_failed"] else 0
