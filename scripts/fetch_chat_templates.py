"""Fetches the chat-template corpus that tests/test_templates.py checks lorakit's loss mask against:
the real models' chat templates llama.cpp keeps in `models/templates/` (70 in llama-cpp-python
0.3.36), taken from the llama-cpp-python source package on PyPI. Only those files are extracted.

Run: python scripts/fetch_chat_templates.py [--dest .cache/chat-templates] [--sdist FILE]
(`make templates` does this; --sdist uses an already downloaded source package.)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
TEMPLATES = "vendor/llama.cpp/models/templates/"  # inside the package's top folder


def download(folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
        + ["--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(folder)],
        check=True,
    )
    [sdist] = folder.glob("llama_cpp_python-*.tar.gz")
    return sdist


def extract_templates(sdist: Path, dest: Path) -> int:
    """Writes the package's templates/*.jinja into dest (replaced whole); returns how many.
    Each member is read and written by its base name: nothing else of the archive is unpacked."""
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    count = 0
    with tarfile.open(sdist) as tar:
        for member in tar:
            inner = member.name.split("/", 1)[-1]
            name = inner[len(TEMPLATES) :] if inner.startswith(TEMPLATES) else ""
            if member.isfile() and name.endswith(".jinja") and "/" not in name:
                (staging / name).write_bytes(tar.extractfile(member).read())
                count += 1
    if not count:
        raise SystemExit(f"no {TEMPLATES}*.jinja in {sdist}")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".cache/chat-templates"))
    parser.add_argument("--sdist", type=Path, help="an already downloaded llama-cpp-python source package")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download(Path(tmp))
        count = extract_templates(sdist, args.dest)
    print(f"{count} chat templates in {args.dest}")


if __name__ == "__main__":
    main()
