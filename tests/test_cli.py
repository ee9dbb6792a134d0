"""The command line end to end, and bad input: one clear line, a non-zero exit, no work lost."""

import json
import shutil

import pytest
from PIL import Image

from hollownet.cli import main

from conftest import RES, error_line, run


def train_args(model, images, out, *extra):
    return ["train", "--model", model, "--images", images, "--prompt", "a photo of sks dog", "--output", out,
            "--steps", 3, "--resolution", RES, "--rank", 2, "--device", "cpu", *extra]


def test_train_then_generate(capsys, tiny_model, dog_photos, tmp_path):
    code, out, _ = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run"))
    assert code == 0 and "peak memory, train" in out
    record = json.loads((tmp_path / "run" / "train.json").read_text())
    assert record["settings"]["steps"] == 3 and len(record["loss"]["history"]) == 3
    assert record["memory"]["train"]["peak_bytes"] > 0 and record["memory"]["precompute"]["peak_bytes"] > 0
    assert "mid_block" in record["plan"]["hollow_blocks"] and record["plan"]["why"].startswith("default")
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "pytorch_lora_weights_kohya.safetensors").exists()  # --format both by default
    assert (tmp_path / "run" / "loss.png").exists()

    for extra in ([], ["--merged"]):
        dest = tmp_path / ("gen" + "".join(extra))
        code, out, _ = run(capsys, "generate", "--model", tiny_model, "--lora", tmp_path / "run", "--prompt",
                           "a sks dog on the beach", "--output", dest, "--steps", 2, "--num-images", 2, "--device", "cpu",
                           *extra)
        assert code == 0
        manifest = json.loads((dest / "manifest.json").read_text())
        assert [e["file"] for e in manifest["images"]] == ["000.png", "001.png"]
        assert Image.open(dest / "000.png").size == (RES, RES)
        mode = json.loads((dest / "generate.json").read_text())["mode"]
        assert mode == ("merged" if extra else "two-path")


@pytest.mark.parametrize("case", ["missing", "empty", "not-an-image"])
def test_bad_photo_folders(capsys, tiny_model, dog_photos, tmp_path, case):
    photos = tmp_path / "photos"
    if case != "missing":
        photos.mkdir()
    if case == "not-an-image":
        for p in sorted(dog_photos.glob("*.jpg"))[:3]:
            shutil.copy(p, photos)
        (photos / "notes.jpg").write_text("this is not a photo")
    code, _, err = run(capsys, *train_args(tiny_model, photos, tmp_path / "run"))
    assert code == 2
    line = error_line(err)
    assert {"missing": "not found", "empty": "No photos", "not-an-image": "notes.jpg"}[case] in line


def test_model_folder_that_is_not_diffusers(capsys, dog_photos, tmp_path):
    (tmp_path / "weights").mkdir()
    code, _, err = run(capsys, *train_args(tmp_path / "weights", dog_photos, tmp_path / "run"))
    assert code == 2 and "not a diffusers model folder" in error_line(err)


def test_hollow_fraction_out_of_range(capsys, tiny_model, dog_photos, tmp_path):
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run", "--hollow", "1.7"))
    assert code == 2 and "outside what this U-Net allows" in error_line(err)


def test_store_from_another_model_is_refused_and_kept(capsys, tiny_model, tiny_model_v, dog_photos, tmp_path):
    run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run"))
    manifest = (tmp_path / "run" / "store" / "manifest.json").read_text()
    code, _, err = run(capsys, *train_args(tiny_model_v, dog_photos, tmp_path / "run"))
    assert code == 2 and f"holds a finished run with other settings (--model {tiny_model} there" in error_line(err)
    (tmp_path / "run" / "train.json").unlink()  # as if unfinished: the store itself refuses
    code, _, err = run(capsys, *train_args(tiny_model_v, dog_photos, tmp_path / "run"))
    assert code == 2 and "different model_fingerprint" in error_line(err)
    assert (tmp_path / "run" / "store" / "manifest.json").read_text() == manifest  # nothing lost


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--hollow-blocks" in out and "examples:" in out


def test_layer_major_flag_gives_the_same_lora(capsys, tiny_model, dog_photos, tmp_path):
    from safetensors.torch import load_file

    assert run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "a"))[0] == 0
    assert run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "b", "--layer-major", "--memory-budget", "1MiB"))[0] == 0
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


@pytest.mark.parametrize("flags,hint", [(["--stream-weights", "--method", "lora"], "needs --method hollow"),
                                        (["--precision", "nf4", "--stream-weights"], "float precision"),
                                        (["--method", "full", "--precision", "int8"], "needs --precision fp32"),
                                        (["--compute-dtype", "fp32"], "int8|nf4 only")])
def test_low_memory_flag_conflicts_fail_before_any_work(capsys, tiny_model, dog_photos, tmp_path, flags, hint):
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run", *flags))
    assert code == 2 and hint in error_line(err)
    assert not (tmp_path / "run" / "store").exists()  # stage 2's settings are checked before stage 1 runs


def test_low_memory_modes_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("int8", "nf4", "--stream-weights", "adamw-in-backward", "--compute-dtype", "--no-layer-major"):
        assert flag in out


def _flags(command: str) -> dict:
    from hollownet.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions if a.dest != "help"}


def _request_class(command: str):
    """The dataclass a subcommand's flags become (its request or stage config)."""
    if command in ("train", "plan"):
        from hollownet.requests import PlanRequest, TrainRequest

        return {"train": TrainRequest, "plan": PlanRequest}[command]
    if command == "generate":
        from hollownet.stages.generate import GenerateConfig

        return GenerateConfig
    if command == "bench":
        from hollownet.evaluation.bench import BenchConfig

        return BenchConfig
    from hollownet.evaluation.analyze import AnalyzeConfig

    return AnalyzeConfig


# Flags that are not settings of the run, each with why: how to print or search, and where bench's cells run.
CLI_ONLY = {"verbose": "the libraries' logs", "json": "how to print", "budget": "plan's search, not a run setting",
            "top": "how many of the search's answers to print",
            "executor": "where bench's cells run (BenchConfig is what runs: run_bench's executor argument)",
            "address": "as --executor", "workers": "as --executor", "cpus_per_job": "as --executor"}
# Fields the Python API offers and the CLI does not.
API_ONLY = {"train": {"store", "track_memory"},
            "plan": {"depth", "lora_alpha", "class_photos", "precompute_batch", "shard_size", "inference_batches"},
            "generate": set(), "bench": set(), "analyze": set()}


@pytest.mark.parametrize("command", ["train", "plan", "generate", "bench", "analyze"])
def test_flags_are_the_request_fields(command):
    """The flags of each run command and its request / config dataclass's fields are one list: same names, same
    defaults (a flag whose default is None leaves the field's own)."""
    import dataclasses

    from hollownet.settings import Modes

    cls = _request_class(command)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "modes"}
    if "modes" in {f.name for f in dataclasses.fields(cls)}:
        fields |= {f.name: f for f in dataclasses.fields(Modes)}
    flags = _flags(command)
    assert set(flags) - set(CLI_ONLY) <= set(fields), set(flags) - set(CLI_ONLY) - set(fields)
    assert set(fields) - set(flags) <= API_ONLY[command], set(fields) - set(flags)
    for name, action in flags.items():
        if name in fields and action.default is not None and not action.required:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert action.default == default, (name, action.default, default)


def test_size_units_in_help_are_the_parsers(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "2GB (10^9 bytes), 1.5GiB or 1.5G (2^30 bytes)" in out and "examples:" in out


def test_api_and_cli_give_the_same_run(capsys, tmp_path):
    """``personalize(TrainRequest(...))`` and ``hollownet train`` with the same inputs record the same run: a
    setting left unset takes the model's default (here the toy's) in one place, for both."""
    from hollownet.requests import TrainRequest
    from hollownet.settings import TOY_DEFAULTS
    from hollownet.toy import world as W
    from hollownet.workflow import personalize

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(W.subject_photos("plus", 3)):
        im.save(photos / f"{i}.png")
    api = personalize(TrainRequest(model="toy", images=str(photos), prompt="a sks shape", steps=2,
                                   output=str(tmp_path / "api")))["settings"]
    code, _, _ = run(capsys, "train", "--model", "toy", "--images", photos, "--prompt", "a sks shape", "--steps", 2,
                     "--output", tmp_path / "cli")
    assert code == 0
    cli = json.loads((tmp_path / "cli" / "train.json").read_text())["settings"]
    api = json.loads(json.dumps(api))
    assert api.pop("output") != cli.pop("output")
    assert api == cli
    assert api["resolution"] == TOY_DEFAULTS["resolution"] and api["batch"] == TOY_DEFAULTS["batch"]
    assert api["lora_targets"] == list(TOY_DEFAULTS["lora_targets"]) and api["device"] == "cpu"
