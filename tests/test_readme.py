"""Every ```python block of README.md runs as written.

The blocks run in order, in one namespace (as a reader pastes them into one session), in a fresh
process whose working directory is a temporary folder, offline. A block may be preceded by an
HTML comment that the rendered README hides but its source shows:

- ``<!-- readme-test: skip (reason) -->``: not run here (needs the hub, a GPU, a long run);
- ``<!-- readme-test: given ... -->``: Python that defines what the block takes from its text
  (``model``, ``long_ids``, ...), on the tiny offline models of :mod:`metakv_cl.testing`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# a python block, with the readme-test comment right before it, if any
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<kind>skip|given)(?P<note>(?:(?!-->).)*)-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)

RUNNER = """
import json, sys
blocks = json.load(sys.stdin)
namespace = {"__name__": "__readme__"}
for block in blocks:
    if block["given"]:
        exec(compile(block["given"], f"README.md:{block['line']} (given)", "exec"), namespace)
    exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)
"""


def readme_blocks(text: str) -> list[dict]:
    """The python blocks of a Markdown text.

    Args:
        text: the Markdown source.

    Returns:
        One dict per block: ``line`` (1-based line of its opening fence), ``code``, ``skip``
        (the stated reason, or None) and ``given`` (the set-up code, or "").
    """
    blocks = []
    for match in BLOCK.finditer(text):
        kind, note = match["kind"], (match["note"] or "").strip()
        blocks.append({
            "line": text.count("\n", 0, match.start("code")),
            "code": match["code"],
            "skip": note.strip("()") if kind == "skip" else None,
            "given": note if kind == "given" else "",
        })
    return blocks


def test_readme_blocks_are_found_with_their_markers():
    text = ("```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n```python\nb\n```\n"
            "<!-- readme-test: given\nx = 2\n-->\n```python\nprint(x)\n```\n```bash\nls\n```\n")
    blocks = readme_blocks(text)
    assert [(b["code"], b["skip"], b["given"]) for b in blocks] == [
        ("a = 1\n", None, ""), ("b\n", "needs a GPU", ""), ("print(x)\n", None, "x = 2"),
    ]
    assert [b["line"] for b in blocks] == [1, 5, 11]


def test_readme_python_blocks_run(tmp_path):
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    to_run = [b for b in blocks if b["skip"] is None]
    skipped = [f"README.md:{b['line']}: {b['skip']}" for b in blocks if b["skip"] is not None]
    assert all(reason.split(": ", 1)[1] for reason in skipped), "a skip marker must state its reason"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "METAKV_CL_CACHE": "off"}
    process = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(to_run), capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    print(f"README: ran {len(to_run)} python blocks, skipped {len(skipped)}:", *skipped, sep="\n  ")
    assert len(to_run) >= len(skipped)
