"""README's vLLM-compatible script runs, and README shows it as it is."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "engine-py" / "examples" / "offline_inference.py"


def test_readme_shows_the_example_script():
    readme = (REPO / "README.md").read_text()
    body = [
        line for line in SCRIPT.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "from llmd import"))
    ]
    for line in body:
        assert line in readme, f"README's Python example lacks: {line}"
    assert "-from vllm import LLM, SamplingParams" in readme
    assert "+from llmd import LLM, SamplingParams" in readme


def test_the_example_runs(smol_dir):
    r = subprocess.run([sys.executable, str(SCRIPT), smol_dir], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("'Hello, my name is' -> ")
    assert lines[1].startswith("'The capital of France is' -> ")
    assert len(lines) >= 3
