#!/usr/bin/env python3
"""Set-up in one command, on a machine with nothing but python3.

usage: python3 dev.py COMMAND [options passed on]

  serve [fieldcrypt serve options]   the proxy on 127.0.0.1:6380 (default: --embedded,
                                     a private Redis or Valkey server behind it)
  cli   [CLI arguments]              a Redis CLI pointed at the proxy (-p 6380 unless
                                     -h, -p, -u or -s is given): fieldcrypt cli
  test  [pytest options]             ruff, mypy, then the test suite
  bench [bench options]              the benchmarks (bench/README.md)

examples:
  python3 dev.py serve
  python3 dev.py cli HSET iad:1 imap secret
  python3 dev.py test -k pubsub
  python3 dev.py bench --quick

Each creates .venv/ on first use, installs fieldcrypt into it with the extras
it needs, and reinstalls only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


def ensure(extras: str) -> None:
    """A virtualenv with fieldcrypt installed (editable) with `extras`."""
    if sys.version_info < (3, 11):  # noqa: UP036  # dev.py runs on any python3
        sys.exit(f"fieldcrypt needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    stamp = VENV / f".installed-{extras}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and PYTHON.exists():
        return
    if not PYTHON.exists():
        print("dev.py: creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"dev.py: installing fieldcrypt[{extras}] into .venv", file=sys.stderr)
    subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[{extras}]",
        ],
        check=True,
    )
    stamp.write_text(digest)


def run(*command: str) -> int:
    return subprocess.run(command, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in ("serve", "cli", "test", "bench"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    if what == "serve":
        ensure("embedded")
        return run(str(BIN / "fieldcrypt"), "serve", *(rest or ["--embedded"]))
    if what == "cli":
        ensure("embedded")
        return run(str(BIN / "fieldcrypt"), "cli", *rest)
    if what == "bench":
        ensure("test,bench")
        return run(str(PYTHON), "-m", "bench", *rest)
    ensure("test")
    sources = [p for p in ("proxy", "tests", "bench", "dev.py") if (ROOT / p).exists()]
    for step in (
        [str(PYTHON), "-m", "ruff", "check", *sources],
        [str(PYTHON), "-m", "ruff", "format", "--check", *sources],
        [str(PYTHON), "-m", "mypy", "proxy"],
    ):
        code = run(*step)
        if code:
            print(f"dev.py: {' '.join(step[2:4])} failed", file=sys.stderr)
            return code
    return run(str(PYTHON), "-m", "pytest", *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
