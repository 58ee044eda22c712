"""`make test` must fail when pytest collects nothing (DEVELOPERS.md: "no tests collected" is never a pass)."""

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_make_test_recipe_fails_when_no_tests_are_collected(tmp_path):
    # The recipe exactly as make would run it (dry run), pointed at a folder whose test file holds no tests.
    dry = subprocess.run(["make", "-s", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    recipe = [line for line in dry.splitlines() if "-m pytest" in line]
    assert len(recipe) == 1, dry
    argv = shlex.split(recipe[0])
    assert argv[argv.index("pytest") + 1] == "tests"
    (tmp_path / "test_nothing.py").write_text('"""No tests here."""\n')
    argv[argv.index("pytest") + 1] = str(tmp_path)
    argv[0] = sys.executable  # the venv's python, as .venv/bin/python in the recipe
    done = subprocess.run(argv + ["-p", "no:cacheprovider"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 5, done.stdout + done.stderr
