"""The README's Python example runs as written and its commands name files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_and_docs_python_examples_run():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    n_blocks = 0
    for doc in docs:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            exec(compile(block, str(doc), "exec"), {})
            n_blocks += 1
    assert n_blocks >= 3


def test_readme_commands_reference_existing_files():
    for path in re.findall(r"(?:scripts|configs)/[\w/]+\.(?:py|yaml)", README):
        assert (ROOT / path).exists(), path
