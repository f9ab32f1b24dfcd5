"""The README's Fast Feedforward section: its example runs as written and prints what it says."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_fff_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fast Feedforward layers", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    script = tmp_path / "fff_example.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny example: extra threads only add contention under -n 2
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("torch.Size([256, 10])") and lines[0].endswith("leaves used")
    assert lines[1] == "['blocks.0.mlp', 'blocks.1.mlp']"
    paths = set(re.findall(r"benchmarks/\w+\.py|docs/fff_\w+\.(?:png|md)", section))
    assert len(paths) >= 5
    for path in paths:
        assert (ROOT / path).exists(), path
