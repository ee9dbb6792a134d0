"""benchmarks/gpu_check.py's dry run (``--device cpu --tiny``), so the GPU check is never broken when a GPU
appears: two of its cells on the tiny models (training and generation; the others differ only in their
settings), the planner equal to the tracker to the byte, and resuming skips the finished cell."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
FIRST = "tiny SDXL | train | Hollowed streamed"  # SDXL's inputs, streamed weights, bf16, AdamW in backward
THEN = FIRST + ";tiny SD | generate | two-path bf16"  # merged generation: tests/test_generate_memory.py


def check(out: Path, only: str, capsys) -> str:
    """The command, in this process (two interpreters would cost more than the cells)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main(["--device", "cpu", "--tiny", "--only", only, "--output", str(out)])
    return capsys.readouterr().out


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys, one_thread):
    out = tmp_path / "gpu_check.json"
    first = check(out, FIRST, capsys)
    assert first.count(": planner ") == 1, first
    cells = json.loads(out.read_text())["cells"]
    before = json.dumps(cells["tiny SDXL | train | Hollowed streamed bf16 + in-backward"])
    second = check(out, THEN, capsys)  # resumed: the finished cell is skipped, the new one runs
    assert second.count(": planner ") == 1 and "| train |" not in second, second
    result = json.loads(out.read_text())
    cells = result["cells"]
    assert len(cells) == 2 and json.dumps(cells["tiny SDXL | train | Hollowed streamed bf16 + in-backward"]) == before
    for key, cell in cells.items():
        assert cell["planner_equals_tracker"] and cell["planner_bytes"] > 0, (key, cell)
        assert cell.get("seconds_per_step", cell.get("seconds_per_image")) > 0
    assert cells["tiny SDXL | train | Hollowed streamed bf16 + in-backward"]["compute_dtype"] == "bf16"
    md = out.with_suffix(".md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 2 and all(row.count("|") == 8 for row in rows), rows  # one row a cell, 7 columns
    assert "| train cell |" in md and "| generate cell |" in md
