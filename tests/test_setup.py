"""The set-up path of a fresh machine: `make test` brings the system programs the suite uses."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "system_deps.sh"


def _bare_path(tmp_path: Path) -> str:
    """A PATH with the shell tools the script uses, and no go, chromium, chromedriver or apt-get."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "id", "mktemp", "cat", "rm"):
        (folder / tool).symlink_to(shutil.which(tool))
    return str(folder)


def test_without_apt_it_says_what_to_install_by_hand(tmp_path):
    env = {"PATH": _bare_path(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "golang-go chromium chromium-driver" in line and "by hand" in line
    assert "LORAKIT_ALLOW_NO_BROWSER=1" in line


def test_the_skip_variables_need_nothing_installed(tmp_path):
    env = {"PATH": _bare_path(tmp_path), "LORAKIT_ALLOW_NO_GO": "1", "LORAKIT_ALLOW_NO_BROWSER": "1"}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    env.pop("LORAKIT_ALLOW_NO_GO")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "the tests need golang-go, and" in done.stderr


def test_ci_runs_only_the_readme_test_command():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[-1] == "make test"
    assert not any("apt-get" in line or "install" in line for line in lines), lines


def test_no_cache_folder_is_committed():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return
    done = subprocess.run(
        ["git", "ls-files", ".cache"], cwd=ROOT, capture_output=True, text=True, env={**os.environ}
    )
    assert done.returncode == 0 and done.stdout == ""
