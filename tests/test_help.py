"""Every program of the kit answers --help: exit status 0 and a usage line.

The programs are found in the code, not listed by hand: each module of common/, model/,
export/, serving/, mobile/, pi/ and tests/ with an `if __name__ == "__main__":` block, and each package
with a __main__.py (`python -m export`). They all start at once (a module fixture) and each
parameter checks its own program's answer.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO, python_env

FOLDERS = ("common", "model", "export", "serving", "mobile", "pi", "tests")
_MAIN_BLOCK = re.compile(r"""^if __name__ == ["']__main__["']:""", re.MULTILINE)


def programs() -> list[str]:
    """`python -m` names of every program in FOLDERS."""
    found = set()
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            if path.name == "__main__.py":
                found.add(module.rsplit(".", 1)[0])
            elif _MAIN_BLOCK.search(path.read_text(encoding="utf-8")):
                found.add(module)
    return sorted(found)


PROGRAMS = programs()


@pytest.fixture(scope="module")
def answers() -> dict[str, subprocess.CompletedProcess]:
    running = {name: subprocess.Popen([sys.executable, "-m", name, "--help"], cwd=REPO, env=python_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in PROGRAMS}
    done = {}
    try:
        for name, proc in running.items():
            stdout, stderr = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def test_the_programs_are_found():
    assert {"serving.server", "serving.query", "export", "model.train", "mobile.classify"} <= set(PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help(answers, program):
    answer = answers[program]
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.lstrip().startswith("usage:"), answer.stdout[:500]
    assert "Traceback" not in answer.stderr
