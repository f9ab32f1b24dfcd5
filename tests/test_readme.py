"""The README's promises: its API example runs as written, and CI runs its test command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a README example as a user would, on one intra-op thread: the examples are tiny nets, and two pytest
    workers each running one on every core oversubscribe the CI box (the 4000-step API example: 18 s on one
    thread, 62 s on two, over its 300 s limit under `pytest -n 2`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_readme_api_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "inputs" in proc.stdout  # the printed modules
    assert (tmp_path / "net.png").read_bytes()[:4] == b"\x89PNG"


def test_readme_two_commands_and_ci():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, flags=re.M) and re.search(r"^demo:", makefile, flags=re.M)


def test_readme_any_architecture_example_runs(tmp_path):
    section = README.split("## Any architecture", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    script = tmp_path / "auto_example.py"
    script.write_text(code)
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("SpatialGraph(input[1], 0[8], 3[8], output[10]")
    change = float(lines[1].split("output change ")[1])
    assert float(lines[1].split("cost change ")[1].split(",")[0]) < 0 and change < 1e-6


def test_readme_hugging_face_graph_example_runs(tmp_path):
    pytest.importorskip("transformers")
    section = README.split("## Any architecture", 1)[1].split("\n## ", 1)[0]
    _first, hf = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]
    script = tmp_path / "hf_example.py"
    script.write_text(
        "import torch\nfrom topotorch import coupling_graph\n"
        + hf
        + "\ng = graph.space('transformer.h.0.attn.c_attn').groups\nprint(len(g), len(g.unique()))\n"
    )
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["64", "4"]
