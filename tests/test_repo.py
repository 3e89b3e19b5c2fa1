"""Repository invariants: CI runs exactly the README's Quickstart commands."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_quickstart_has_two_commands_and_ci_runs_them():
    cmds = quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for c in cmds:
        assert c in ci, f"CI does not run the README command: {c}"
