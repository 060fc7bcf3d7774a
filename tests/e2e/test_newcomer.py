"""A newcomer's first commands, run as they would type them: the README's quick commands work,
and five wrong settings each end in one line on stderr with exit status 2, no traceback."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- newcomer-commands:"


def slap(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "slap_ray.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(MARKER) + r".*?-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its newcomer commands block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("slap ")]


def test_the_readmes_quick_commands_run():
    commands = readme_commands()
    assert len(commands) >= 4
    for args in commands:
        done = slap(args, REPO)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and done.stdout.strip(), args
    assert (
        "alphas: [0.3]"
        in slap(["config", "select.alphas=[0.3]"], REPO).stdout.replace("select.", "")
        or "[0.3]" in slap(["config", "select.alphas=[0.3]"], REPO).stdout
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["select", "select.alpha=0.3"], "did you mean `select.alphas`?"),
        (["select", "select.tau=0"], "select.tau: Input should be greater than 0"),
        (["run", "model.name=tiny-randon"], "did you mean `tiny-random`?"),
        (["select", "data.paths=[no/such/file.jsonl]"], "data.paths: input 'no/such/file.jsonl'"),
        (["sweep", "--config", "broken.yaml"], "broken.yaml:3:5: expected ',' or ']'"),
    ],
)  # fmt: skip
def test_a_wrong_setting_is_one_line_with_exit_status_2(tmp_path, args, expected):
    (tmp_path / "broken.yaml").write_text("select:\n  alphas: [0.3\nseed: 1\n")
    done = slap([*args, f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
