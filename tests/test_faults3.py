"""Issue 25, the rest, for real: ``generate`` interrupted by a real signal, a finished ``train`` rerun, short model
names, paths refused before torch loads. Real processes, real files, no mocks.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import RES, run

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- generate, interrupted: what is finished stays on disk and the rerun does not redo it --------------------


def gen_argv(model, out, n=3, steps=6) -> list[str]:
    from test_faults import train_argv

    return [*train_argv(model, "x", out)[:3], "generate", "--model", str(model), "--prompt", "a sks dog", "--output",
            str(out), "--steps", str(steps), "--num-images", str(n), "--resolution", str(RES), "--device", "cpu"]


def interrupt_when(argv, ready, sig) -> str:
    """Run ``argv``, send ``sig`` as soon as ``ready()`` holds; returns stderr (the run must not have finished)."""
    from test_faults import cli_env

    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < 300
        time.sleep(0.002)
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def gen_reference(tiny_model, tmp_path_factory):
    """Uninterrupted runs: the bytes every interrupted-then-rerun folder must end with."""
    out = tmp_path_factory.mktemp("gen") / "ref"
    from hollownet.cli import main

    assert main(gen_argv(tiny_model, out / "3")[3:]) == 0
    assert main(gen_argv(tiny_model, out / "8", n=8, steps=1)[3:]) == 0
    return out


def pngs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_generate_interrupted_while_denoising_keeps_the_latents_and_the_rerun_finishes_them(
        tiny_model, gen_reference, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = gen_argv(tiny_model, out)
    err = interrupt_when(argv, lambda: (out / ".partial" / "000.png.safetensors").exists(), signal.SIGINT)
    (line,) = [x for x in err.splitlines() if x.startswith("hollownet generate: ")]
    m = re.fullmatch(rf"hollownet generate: interrupted \(SIGINT\); 0 of 3 images written to {out}; (\d) more denoised, "
                     rf"kept in {out}/.partial: rerun the same command to finish the other 3 without redoing those", line)
    assert m and 1 <= int(m.group(1)) <= 2, line
    assert not pngs(out)
    code, _, err = run(capsys, *argv[3:])  # the same command
    assert code == 0, err
    assert f"resuming: 0 of 3 images already written, {m.group(1)} more already denoised" in err, err
    assert pngs(out) == pngs(gen_reference / "3")  # the kept latents decode to the very same images
    assert not (out / ".partial").exists()


def test_generate_interrupted_while_decoding_keeps_the_pngs_written_and_the_rerun_skips_them(
        tiny_model, gen_reference, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = gen_argv(tiny_model, out, n=8, steps=1)
    err = interrupt_when(argv, lambda: (out / "000.png").exists(), signal.SIGTERM)  # images written one by one
    (line,) = [x for x in err.splitlines() if x.startswith("hollownet generate: ")]
    m = re.fullmatch(rf"hollownet generate: interrupted \(SIGTERM\); (\d) of 8 images written to {out} \(([0-9a-z., ]+)\); "
                     rf"(\d) more denoised, kept in {out}/.partial: rerun the same command to finish the other (\d) "
                     "without redoing those", line)
    assert m, line
    written = int(m.group(1))
    assert 1 <= written < 8 and written + int(m.group(3)) == 8 and int(m.group(4)) == 8 - written, line
    assert sorted(pngs(out)) == m.group(2).split(", ") == [f"{i:03d}.png" for i in range(written)]
    before = {p: (out / p).stat().st_mtime_ns for p in pngs(out)}
    code, _, err = run(capsys, *argv[3:])
    assert code == 0, err
    assert f"resuming: {written} of 8 images already written, {8 - written} more already denoised" in err, err
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before  # not written again
    assert pngs(out) == pngs(gen_reference / "8")


def test_generate_with_other_settings_starts_over(tiny_model, tmp_path, capsys):
    from hollownet.stages.generate import PARTIAL

    out = tmp_path / "gen"
    (out / PARTIAL).mkdir(parents=True)
    (out / PARTIAL / "state.json").write_text('{"settings": {"steps": 99}, "written": ["000.png"]}')
    (out / "000.png").write_bytes(b"an older run's image")
    code, _, err = run(capsys, *gen_argv(tiny_model, out, n=1, steps=1)[3:])
    assert code == 0, err
    assert f"warning: {out / PARTIAL} holds an unfinished run with other settings: starting over" in err, err
    assert (out / "000.png").read_bytes().startswith(b"\x89PNG")


# ---- a finished train, asked again ---------------------------------------------------------------------------


def short_train(model, photos, out, *extra) -> list[str]:
    from test_faults import train_argv

    argv = train_argv(model, photos, out, *extra)
    argv[argv.index("--steps") + 1] = "2"
    return argv


@pytest.fixture(scope="module")
def finished(tiny_model, dog_photos, tmp_path_factory):
    from hollownet.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(short_train(tiny_model, dog_photos, out)[3:]) == 0
    return out


def test_finished_train_asked_again_is_already_done_and_other_settings_refused(finished, tiny_model, dog_photos, capsys):
    from hollownet.stages.formats import DIFFUSERS_FILE

    files = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    code, out, err = run(capsys, *short_train(tiny_model, dog_photos, finished)[3:])
    seconds = time.perf_counter() - t0
    assert code == 0 and "Traceback" not in err, err
    assert out.strip() == (f"already done: {finished / DIFFUSERS_FILE} (a finished run with these settings; "
                           "--no-resume trains it again)"), out
    assert "stage" not in err and "resuming" not in err, err  # no model loaded, no step trained
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == files
    print(f"already done in {seconds:.2f} s")

    code, _, err = run(capsys, *short_train(tiny_model, dog_photos, finished, "--rank", "4", "--lr", "2e-3")[3:])
    assert code == 2
    from conftest import error_line

    line = error_line(err)
    assert line == (f"hollownet train: error: '{finished}' holds a finished run with other settings (--lr 0.001 there, "
                    "0.002 now; --rank 2 there, 4 now): pick a new --output, or pass --no-resume to train over it"), line
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == files


# ---- short model names, and paths refused before torch loads --------------------------------------------------


@pytest.mark.parametrize("name,hub", [("sd21", "stabilityai/stable-diffusion-2-1"), ("SD-2", "stabilityai/stable-diffusion-2-1"),
                                      ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                      ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
                                      ("sd2.1-base", "stabilityai/stable-diffusion-2-1-base")])
def test_a_short_model_name_is_answered_with_its_hub_id(name, hub, dog_photos, tmp_path, capsys):
    from conftest import error_line

    for argv in (["train", "--model", name, "--images", dog_photos, "--prompt", "a sks dog", "--output", tmp_path / "o"],
                 ["generate", "--model", name, "--prompt", "a sks dog", "--output", tmp_path / "g"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        line = error_line(err)
        assert f"--model '{name}' is not a folder here; for that model pass its hub id, --model {hub}" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


def test_paths_are_refused_before_torch_is_imported(tiny_model, dog_photos, tmp_path):
    """In a fresh process: each wrong path is one line and exit 2, and torch was never imported (seconds saved)."""
    from test_faults import cli_env

    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    train = ["train", "--model", tiny_model, "--images", dog_photos, "--prompt", "a sks dog", "--output", tmp_path / "o"]
    cases = {
        "model folder '{d}/nope' does not exist": ["train", "--model", tmp_path / "nope", *train[3:]],
        "--images folder '{d}/none' not found": [*train[:3], "--images", tmp_path / "none", *train[5:]],
        "--output '{d}/file.txt/run' is inside '{d}/file.txt', which is a file": [*train[:-1], a_file / "run"],
        "--output '{d}/file.txt' is an existing file, not a folder": ["generate", "--model", tiny_model, "--prompt", "x",
                                                                       "--output", a_file],
        "--lora '{d}/nolora' not found": ["generate", "--model", tiny_model, "--prompt", "x", "--output", tmp_path / "g",
                                          "--lora", tmp_path / "nolora"],
    }
    script = ("import sys; from hollownet.cli import main; code = main(sys.argv[1:]); "
              "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    for said, argv in cases.items():
        r = subprocess.run([sys.executable, "-c", script, *map(str, argv)], env=cli_env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert said.format(d=tmp_path) in line and line.startswith(f"hollownet {argv[0]}: error: "), line
        assert r.stdout.strip() == "no torch", said
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()
