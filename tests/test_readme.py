"""The README's Python example runs as written and its commands name files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_commands_reference_existing_files():
    for path in re.findall(r"(?:scripts|configs)/[\w/]+\.(?:py|yaml)", README):
        assert (ROOT / path).exists(), path
