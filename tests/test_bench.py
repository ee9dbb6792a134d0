"""hollownet bench: method specs, aggregation math, an end-to-end run on a tiny dataset, resume, failures."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest

from conftest import RES
from helpers_models import build_tiny_clip, build_tiny_vit
from hollownet.evaluation import bench as B
from hollownet.evaluation import report as R
from hollownet.evaluation import specs as S
from hollownet.cli import main
from hollownet.evaluation.metrics import evaluate_folder
from hollownet.errors import HollownetError

# "requires torchvision, falling back to PIL", dataset notices: not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HEADER = "| Method | base params | LoRA params | peak memory | vs inference | DINO | CLIP-I | CLIP-T |"
PROMPTS_FILE = """Classes

subject_name,class
backpack,backpack
dog,dog
ghost,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
]
"""


# --------------------------------------------------------------------------
# Pure parts: specs, seeds, aggregation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, fields", [
    ("hollow", "hollow", {}),
    (" hollow@0.56 ", "hollow@0.56", {"fraction": 0.56}),
    ("lora:r=1", "lora:r=1", {"rank": 1}),
    ("LORA:alpha=8:r=4", "lora:r=4:alpha=8", {"rank": 4, "alpha": 8.0}),
    ("full:lr=5e-6", "full:lr=5e-06", {"lr": 5e-6}),
    ("hollow:blocks=down_blocks.3+mid_block+up_blocks.0:steps=50", "hollow:steps=50:blocks=down_blocks.3+mid_block+up_blocks.0",
     {"steps": 50, "blocks": ("down_blocks.3", "mid_block", "up_blocks.0")}),
    ("hollow:opt=in-backward:weights=NF4", "hollow:weights=nf4:opt=in-backward", {"weights": "nf4", "optimizer": "adamw-in-backward"}),
    ("hollow:stream=yes:weights=bf16", "hollow:weights=bf16:stream=1", {"stream": True, "weights": "bf16"}),
    ("lora:weights=int8:opt=adamw", "lora:weights=int8", {"weights": "int8", "optimizer": None}),
])
def test_method_specs_parse_to_canonical_form(text, key, fields):
    spec = S.parse_method(text)
    assert spec.key == key
    assert ":" not in spec.slug
    for k, v in fields.items():
        assert getattr(spec, k) == v
    assert S.parse_method(spec.key) == spec  # the canonical form parses back to the same spec


@pytest.mark.parametrize("text, why", [
    ("dreambooth", "unknown method"),
    ("lora@0.5", "only for hollow"),
    ("hollow@1.5", "between 0 and 1"),
    ("hollow@half", "not a number"),
    ("lora:r", "not KEY=VALUE"),
    ("lora:rank=4", "unknown option"),
    ("lora:r=0", "must be positive"),
    ("lora:r=2.5", "not an integer"),
    ("full:r=4", "no LoRA"),
    ("hollow@0.5:blocks=mid_block", "not both"),
    ("lora:r=1:r=2", "twice"),
    ("hollow:weights=int4", "not one of"),
    ("full:weights=int8", "no LoRA"),
    ("lora:stream=1", "only for hollow"),
    ("hollow:stream=1:weights=nf4", "float weights"),
    ("hollow:opt=sgd", "not adamw or in-backward"),
])
def test_bad_method_specs_say_why_in_one_line(text, why):
    with pytest.raises(HollownetError, match=why) as exc:
        S.parse_method(text)
    assert "\n" not in str(exc.value) and "syntax" in str(exc.value)


def test_method_lists_and_seeds():
    assert [s.key for s in S.parse_methods("hollow,hollow@0.56,lora,lora:r=1,full")] == \
        ["hollow", "hollow@0.56", "lora", "lora:r=1", "full"]
    with pytest.raises(HollownetError, match="twice"):
        S.parse_methods("lora:r=1,lora:r=1")
    with pytest.raises(HollownetError, match="no method"):
        S.parse_methods(" , ")
    assert S.parse_seeds("0,1") == [0, 1]
    assert S.parse_seeds("0-2,7") == [0, 1, 2, 7]
    assert S.parse_seeds([3]) == [3]
    with pytest.raises(HollownetError, match="not a seed"):
        S.parse_seeds("a")


def _cell(method, subject, seed, dino, clip_i=0.5, clip_t=0.25, peak=1000, pre=500, status="ok", plan=None):
    if status != "ok":
        return {"method": method, "subject": subject, "seed": seed, "status": status, "error": "RuntimeError: boom"}
    return {"method": method, "subject": subject, "seed": seed, "status": "ok", "plan": plan,
            "params": {"unet": 100, "base": 60 if plan else 100, "lora": 7, "trainable": 7},
            "scores": {"dino": dino, "clip_i": clip_i, "clip_t": clip_t},
            "memory": {"train_peak_bytes": peak, "precompute_peak_bytes": pre},
            "timings": {"train_s_per_step": 0.5, "generate_s": 2.0}}


def test_aggregate_mean_and_std_by_hand():
    plan = {"fraction": 0.4, "kept_params": 60}
    cells = [
        _cell("hollow", "dog", 0, 0.1, peak=1000, plan=plan), _cell("hollow", "dog", 1, 0.3, peak=1000, plan=plan),
        _cell("hollow", "can", 0, 0.5, peak=1200, plan=plan), _cell("hollow", "can", 1, 0.9, peak=1200, plan=plan),
        _cell("lora", "dog", 0, 0.7, peak=3000), _cell("lora", "can", 0, None, status="failed"),
    ]
    s = R.aggregate(cells, inference_peak=2000, methods=["lora", "hollow", "full"])
    rows = {r["method"]: r for r in s["methods"]}
    assert [r["method"] for r in s["methods"]] == ["lora", "hollow", "full"]  # the requested order
    h = rows["hollow"]
    dino = [0.1, 0.3, 0.5, 0.9]
    assert h["scores"]["dino"]["mean"] == pytest.approx(0.45)
    assert h["scores"]["dino"]["std"] == pytest.approx(statistics.stdev(dino))  # sample std over 4 cells
    assert h["scores"]["dino"]["std"] == pytest.approx(math.sqrt(((0.35**2) + 0.15**2 + 0.05**2 + 0.45**2) / 3))
    assert h["scores"]["dino"]["n"] == 4
    # over seeds: seed 0 -> (0.1 + 0.5) / 2 = 0.3, seed 1 -> (0.3 + 0.9) / 2 = 0.6
    assert h["over_seeds"]["dino"]["mean"] == pytest.approx(0.45)
    assert h["over_seeds"]["dino"]["std"] == pytest.approx(statistics.stdev([0.3, 0.6]))
    assert h["per_subject"]["can"]["dino"]["mean"] == pytest.approx(0.7)
    assert h["per_subject"]["dog"]["dino"]["std"] == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert h["scores"]["clip_i"]["std"] == pytest.approx(0.0)
    assert h["memory"]["train_peak_bytes"]["mean"] == pytest.approx(1100)
    assert h["vs_inference"] == pytest.approx(1100 / 2000)
    assert h["precompute_vs_inference"] == pytest.approx(0.25)
    assert h["params"] == {"unet": 100, "base": 60, "lora": 7, "trainable": 7}
    lo = rows["lora"]
    assert (lo["n_cells"], lo["n_ok"], lo["n_failed"]) == (2, 1, 1)
    assert lo["scores"]["dino"] == {"mean": pytest.approx(0.7), "std": None, "n": 1}  # one value: no std
    assert rows["full"]["n_cells"] == 0 and rows["full"]["scores"]["dino"]["mean"] is None
    assert s["failed"] == [{"subject": "can", "method": "lora", "seed": 0, "error": "RuntimeError: boom"}]
    assert (s["n_cells"], s["n_ok"], s["n_failed"]) == (6, 5, 1)

    text = R.format_summary({**s, "inference": {"peak_bytes": 2000, "source": "test"}})
    lines = text.splitlines()
    assert lines[0] == HEADER
    assert lines[2].startswith("| lora | 100 | 7 | 2.93 KiB | 1.50× | 0.7000 | ")
    assert lines[3].startswith("| hollow | 60 | 7 | 1.07 KiB | 0.55× | 0.4500 ± 0.3416 | 0.5000 ± 0.0000 |")
    assert lines[4].startswith("| full | — | — | — | — | — |")
    assert "can × lora × seed 0: RuntimeError: boom" in text


# --------------------------------------------------------------------------
# End to end on a tiny DreamBooth-layout dataset.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, dreambooth):
    root = tmp_path_factory.mktemp("dataset")  # from the real subset, or its stand-in on a fresh clone
    (root / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    for name in ("backpack", "dog"):
        (root / name).mkdir()
        for photo in sorted((dreambooth / name).glob("*.jpg"))[:3]:
            shutil.copy(photo, root / name / photo.name)
    (root / "ghost").mkdir()  # listed, but no photos
    return root


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    from hollownet.evaluation.metrics import ClipExtractor, DinoExtractor

    root = tmp_path_factory.mktemp("eval-models")
    return DinoExtractor(build_tiny_vit(root / "vit")), ClipExtractor(build_tiny_clip(root / "clip"))


def bench_config(model, dataset, out, extractors, **kw) -> B.BenchConfig:
    dino, clip = extractors
    base = dict(model=str(model), dataset=str(dataset), output=str(out), methods="hollow,lora:r=2", seeds="0",
                steps=3, rank=2, lr=1e-3, resolution=RES, images_per_prompt=1, prompts=2, gen_steps=2,
                dino_model=dino, clip_model=clip, device="cpu")
    return B.BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench_run(tiny_model, tiny_dataset, extractors, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    logs = []
    summary = B.run_bench(bench_config(tiny_model, tiny_dataset, out, extractors), log=logs.append)
    return out, summary, logs


def test_bench_end_to_end(bench_run, tiny_dataset, extractors):
    out, summary, logs = bench_run
    assert logs[0].startswith("note: DreamBooth benchmark") and "no photo folder: ghost" in logs[0]  # one line
    assert "4 cells, 0 already finished, 4 to run" in logs[1]
    assert (summary["n_cells"], summary["n_ok"], summary["n_failed"]) == (4, 4, 0)
    assert summary["subjects"] == ["backpack", "dog"] and summary["layout"] == "dreambooth"
    assert [r["method"] for r in summary["methods"]] == ["hollow", "lora:r=2"]
    hollow, lora = summary["methods"]
    for row in (hollow, lora):
        assert row["n_ok"] == 2 and row["subjects"] == ["backpack", "dog"]
        assert all(row["scores"][k]["n"] == 2 for k in ("dino", "clip_i", "clip_t"))
        assert row["memory"]["train_peak_bytes"]["mean"] > 0 and row["memory"]["precompute_peak_bytes"]["mean"] > 0
        assert row["vs_inference"] > 0
    # the cut loads fewer base weights and trains fewer LoRA parameters at the same rank
    assert hollow["params"]["base"] < lora["params"]["base"] == lora["params"]["unet"]
    assert 0 < hollow["params"]["lora"] < lora["params"]["lora"]
    assert "mid_block" in hollow["plan"]["hollow_blocks"] and hollow["plan"]["why"].startswith("default")
    inf = summary["inference"]
    assert inf["source"].startswith(("predicted by hollownet.memory.planner", "measured"))
    assert json.loads((out / "inference_memory.json").read_text())["peak_bytes"] == inf["peak_bytes"]
    # predicted or measured, it is the real forward's exact peak (batch 1; batch 2 for CFG beside it)
    measured = B.measure_inference_peak(summary["model"], resolution=RES)
    assert inf["peak_bytes"] == measured["peak_bytes"] < inf["peak_bytes_cfg"]
    assert hollow["vs_inference"] == pytest.approx(hollow["memory"]["train_peak_bytes"]["mean"] / measured["peak_bytes"])

    assert json.loads((out / "summary.json").read_text())["n_ok"] == 4
    md = (out / "summary.md").read_text()
    assert md.splitlines()[0] == HEADER and md.splitlines()[2].startswith("| hollow | ")
    assert md.splitlines()[3].startswith("| lora:r=2 | ")
    assert (out / "summary.png").stat().st_size > 1000

    cell = out / "cells" / "dog" / "lora_r=2" / "seed-0"
    result = json.loads((cell / "result.json").read_text())
    assert result["status"] == "ok" and result["error"] is None
    assert result["config"]["prompts"] == ["a sks dog in the jungle", "a sks dog wearing a red hat"]
    assert result["memory"]["train_peak_bytes"] > 0 and result["scores"]["n_generated"] == 2
    assert result["scores"]["n_reference"] == 3 and result["params"]["lora"] > 0
    # the recorded scores are the metrics of the cell's own images against its own subject's photos
    dino, clip = extractors
    scored = {k: result["scores"][k] for k in ("dino", "clip_i", "clip_t")}
    assert scored == {k: v for k, v in evaluate_folder(cell / "images", tiny_dataset / "dog", dino_model=dino,
                                                        clip_model=clip).items() if k in scored}
    assert scored["dino"] != evaluate_folder(cell / "images", tiny_dataset / "backpack", dino_model=dino,
                                             clip_model=clip)["dino"]
    manifest = json.loads((cell / "images" / "manifest.json").read_text())["images"]
    assert [e["prompt"] for e in manifest] == result["config"]["prompts"]
    assert (cell / "train" / "pytorch_lora_weights.safetensors").exists()
    assert not (cell / "train" / "store").exists()  # --keep weights: the store is deleted after the cell
    backpack = json.loads((out / "cells" / "backpack" / "hollow" / "seed-0" / "result.json").read_text())
    assert backpack["config"]["prompts"][1] == "a sks backpack in the snow"  # objects get the object prompts


def test_rerun_skips_finished_cells(bench_run, tiny_model, tiny_dataset, extractors, monkeypatch):
    out, summary, _ = bench_run
    calls = []
    monkeypatch.setattr("hollownet.workflow.personalize", lambda req: calls.append(req) or {})
    logs = []
    again = B.run_bench(bench_config(tiny_model, tiny_dataset, out, extractors), log=logs.append)
    assert calls == [] and "4 already finished, 0 to run" in logs[1]
    assert again["methods"][0]["scores"] == summary["methods"][0]["scores"]
    # changed settings for finished cells: refused before any work, with the fix
    with pytest.raises(HollownetError, match=r"made with steps 3, not 4; use a new --output"):
        B.run_bench(bench_config(tiny_model, tiny_dataset, out, extractors, steps=4), log=logs.append)
    assert calls == []


def test_failed_cell_is_reported_not_fatal_and_retried(bench_run, tiny_model, tiny_dataset, extractors, tmp_path,
                                                       monkeypatch):
    import hollownet.workflow as W

    out = tmp_path / "bench"
    shutil.copytree(bench_run[0], out)
    for subject in ("backpack", "dog"):  # two cells to redo
        (out / "cells" / subject / "lora_r=2" / "seed-0" / "result.json").unlink()
    real = W.personalize
    calls = []

    def failing(req):
        calls.append(req.images)
        raise RuntimeError("out of memory (simulated)\nsecond line")

    monkeypatch.setattr(W, "personalize", failing)
    logs = []
    summary = B.run_bench(bench_config(tiny_model, tiny_dataset, out, extractors), log=logs.append)
    assert len(calls) == 2  # the first failure did not stop the run
    assert (summary["n_ok"], summary["n_failed"]) == (2, 2)  # the hollow cells are still there
    assert summary["failed"][0] == {"subject": "backpack", "method": "lora:r=2", "seed": 0,
                                    "error": "RuntimeError: out of memory (simulated)"}
    assert "    FAILED: RuntimeError: out of memory (simulated)" in logs
    failed = json.loads((out / "cells" / "backpack" / "lora_r=2" / "seed-0" / "result.json").read_text())
    assert failed["status"] == "failed" and "RuntimeError" in failed["traceback"]
    md = (out / "summary.md").read_text()
    assert "backpack × lora:r=2 × seed 0: RuntimeError: out of memory (simulated)" in md
    assert "| lora:r=2 | — | — | — | — | — | — | — |" in md and "4 of 4 cells" not in md

    # a rerun retries the failed cell (only backpack's is asked for here)
    calls.clear()
    monkeypatch.setattr(W, "personalize", lambda req: calls.append(req.images) or real(req))
    summary = B.run_bench(bench_config(tiny_model, tiny_dataset, out, extractors, subjects=["backpack"],
                                       keep="results"), log=lambda m: None)
    assert [c.rsplit("/", 1)[-1] for c in calls] == ["backpack"]
    assert (summary["n_cells"], summary["n_ok"], summary["n_failed"]) == (2, 2, 0)
    cell = out / "cells" / "backpack" / "lora_r=2" / "seed-0"
    redone = json.loads((cell / "result.json").read_text())
    assert redone["status"] == "ok"
    # run again from nothing, the cell gives the first run's scores to the bit: training, noise and scoring are seeded
    first = json.loads((bench_run[0] / "cells" / "backpack" / "lora_r=2" / "seed-0" / "result.json").read_text())
    assert redone["scores"] == first["scores"] and redone["loss"] == first["loss"]
    assert not (cell / "train").exists() and not (cell / "images").exists()  # --keep results


def test_full_method_generates_from_its_unet(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    train_dir = tmp_path / "train"
    UNet2DConditionModel.from_pretrained(tiny_model / "unet").save_pretrained(train_dir / "unet")
    res = B.generate_images(str(tiny_model), train_dir, "full", ["a sks dog", "a sks dog on the beach"],
                            tmp_path / "images", images_per_prompt=2, steps=2, resolution=RES)
    assert res["mode"] == "full" and len(res["images"]) == 4
    manifest = json.loads((tmp_path / "images" / "manifest.json").read_text())["images"]
    assert [e["file"] for e in manifest] == ["p00-00.png", "p00-01.png", "p01-00.png", "p01-01.png"]
    assert len({e["seed"] for e in manifest}) == 4


# --------------------------------------------------------------------------
# Bad input through the command line: one line, exit 2.
# --------------------------------------------------------------------------


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("hollownet bench: error:")]
    return code, lines


def test_bench_bad_input_is_one_line(capsys, tiny_model, tiny_dataset, tmp_path):
    base = ["bench", "--model", tiny_model, "--output", tmp_path / "out", "--device", "cpu"]
    code, lines = _cli(capsys, *base, "--dataset", tmp_path)
    assert code == 2 and len(lines) == 1 and "not a benchmark folder" in lines[0]
    code, lines = _cli(capsys, *base, "--dataset", tiny_dataset, "--methods", "hollow,lora@0.3")
    assert code == 2 and len(lines) == 1 and "'lora@0.3'" in lines[0]
    code, lines = _cli(capsys, *base, "--dataset", tiny_dataset, "--subjects", "dog,ghost")
    assert code == 2 and len(lines) == 1 and "'ghost' has no photos" in lines[0]
    code, lines = _cli(capsys, *base, "--dataset", tiny_dataset, "--subjects", "cat")
    assert code == 2 and len(lines) == 1 and "no subject 'cat'" in lines[0]
    code, lines = _cli(capsys, *base, "--dataset", tiny_dataset, "--seeds", "x")
    assert code == 2 and len(lines) == 1 and "--seeds" in lines[0]
    code, lines = _cli(capsys, "bench", "--model", tmp_path / "nope", "--output", tmp_path / "o",
                       "--dataset", tiny_dataset)
    assert code == 2 and len(lines) == 1 and "neither an existing folder" in lines[0]


def test_low_memory_method_options_reach_the_trainer(tiny_model, tiny_dataset, extractors, tmp_path, monkeypatch):
    """``hollow:weights=int8:opt=in-backward`` trains with --precision int8 --optimizer adamw-in-backward;
    generation keeps the run-wide float --precision (the original model)."""
    calls = []

    def fake_personalize(req):
        calls.append(req)
        raise RuntimeError("stop after the request")  # a failed cell is recorded; that is all we need here

    monkeypatch.setattr("hollownet.workflow.personalize", fake_personalize)
    summary = B.run_bench(bench_config(tiny_model, tiny_dataset, tmp_path / "b", extractors, subjects=["dog"],
                                       methods="hollow:weights=int8:opt=in-backward,hollow:stream=1"), log=lambda m: None)
    assert [(r.modes.precision, r.modes.optimizer, r.modes.stream_weights) for r in calls] == [("int8", "adamw-in-backward", False),
                                                                              ("fp32", "adamw", True)]
    r = calls[0]  # the run-wide settings and the cell's own (bench.train_request)
    assert (r.model, r.method, r.rank, r.steps, r.lr, r.seed, r.resolution, r.batch, r.checkpoint_every, r.track_memory) \
        == (str(tiny_model), "hollow", 2, 3, 1e-3, 0, RES, 1, 0, True)
    assert r.images == str(tiny_dataset / "dog") and r.prompt == "a photo of sks dog"
    assert [r["method"] for r in summary["methods"]] == ["hollow:weights=int8:opt=in-backward", "hollow:stream=1"]
    cell = tmp_path / "b" / "cells" / "dog" / "hollow_weights=int8_opt=in-backward" / "seed-0" / "result.json"
    config = json.loads(cell.read_text())["config"]
    assert config["train_precision"] == "int8" and config["precision"] == "fp32" and config["optimizer"] == "adamw-in-backward"
