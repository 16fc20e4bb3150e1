"""The `edgeslm` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def edgeslm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeslm", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def test_help_explains_the_commands():
    done = edgeslm("--help")
    assert done.returncode == 0
    for word in ("chat", "generate", "export", "info", "examples"):
        assert word in done.stdout


def test_export_info_generate_and_chat(tmp_path, tiny_folder):
    package = tmp_path / "pkg"
    done = edgeslm("export", str(tiny_folder), "-o", str(package), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert "layer 2/2" in done.stderr  # progress is shown

    info = edgeslm("info", str(package))
    assert info.returncode == 0, info.stderr
    assert "fp32" in info.stdout and "verified" in info.stdout

    gen = edgeslm("generate", "Hello", "-m", str(package), "--max-tokens", "5")
    assert gen.returncode == 0, gen.stderr

    chat = edgeslm("chat", str(package), "--max-tokens", "4", stdin="hi\nand again\n")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 2


def test_errors_are_one_clear_line_not_a_traceback(tmp_path):
    done = edgeslm("info", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("edgeslm: error:")
    assert "Traceback" not in done.stderr

    again = edgeslm("export", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert again.returncode == 1 and "no checkpoint" in again.stderr
