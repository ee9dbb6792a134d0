"""Shared fixtures: tiny random-weight SD models saved in the real diffusers layout, real photos."""

import os
from pathlib import Path

import pytest

# One intra-op thread for the whole suite, this process and every child (CLI runs, the app, Ray workers inherit the
# environment): the tensors are tiny, and two OpenMP threads in each of several processes spin-wait against each
# other on a 2-core machine (test_analyze's trained-LoRA test: 5 s alone, 177 s inside the suite). Set
# OMP_NUM_THREADS to run it otherwise. Speed is measured by benchmarks/, never here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
RES = 64  # tiny model: 64 px photos -> 8x8 latents


def run(capsys, *argv):
    """``hollownet ARGV`` in this process: (exit code, stdout, stderr)."""
    from hollownet.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to OpenMP spin-waits on a busy machine (byte
    counts do not change). A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def error_line(err: str) -> str:
    """The one ``hollownet ...: error: ...`` line of a refused command (and no traceback)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("hollownet ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="session")
def dog_photos() -> Path:
    """The DreamBooth dog where ../shared has it, else the 4 bundled demo photos (made from it):
    a fresh clone runs every core test."""
    if (DREAMBOOTH / "dog").is_dir():
        return DREAMBOOTH / "dog"
    from hollownet.photos import demo_photos_dir

    return demo_photos_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from hollownet.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-eps"), prediction_type="epsilon", seed=0)


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory) -> Path:
    from hollownet.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def hollow_store(tmp_path_factory, tiny_model, dog_photos) -> Path:
    """A finished stage-1 store for the default cut: 12 samples in shards of 5."""
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("store") / "store"
    run_precompute(PrecomputeConfig(model=str(tiny_model), images=str(dog_photos), prompt="a photo of sks dog",
                                    output=str(out), resolution=RES, num_samples=12, shard_size=5),
                   track_memory=False)
    return out


@pytest.fixture(scope="session")
def dreambooth(tmp_path_factory) -> Path:
    """../shared/data/dreambooth where present, else a stand-in of the same layout (tests/standin.py)."""
    if (DREAMBOOTH / "prompts_and_classes.txt").is_file():
        return DREAMBOOTH
    from hollownet.photos import demo_photos_dir
    from standin import make_dreambooth_standin

    return make_dreambooth_standin(tmp_path_factory.mktemp("dreambooth-standin"), demo_photos_dir())


def is_real_dreambooth(root: Path) -> bool:
    return root == DREAMBOOTH
