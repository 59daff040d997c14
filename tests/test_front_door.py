"""The README's two set-up commands: .ci/run runs exactly the test one, and the Python
finder they both start with finds a Python that can run jaxinfer."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)[:2]]


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()
    assert "pip install -e ." in install_and_run and "jaxinfer generate" in install_and_run
    assert "pytest" in install_and_test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def test_find_python_finds_one_that_runs_jaxinfer():
    found = subprocess.run([str(ROOT / "scripts" / "find_python")], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    version = subprocess.run([found.stdout.strip(), "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "True"


def test_find_python_says_so_when_there_is_none(tmp_path):
    import glob

    import pytest
    if any(glob.glob(f"{d}/python3.1[2-9]") for d in ("/usr/local/bin", "/usr/bin", "/opt/homebrew/bin")):
        pytest.skip("this machine has a system Python 3.12+ at a fixed path")
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path)}
    found = subprocess.run(["/bin/sh", str(ROOT / "scripts" / "find_python")], capture_output=True, text=True,
                           timeout=60, env=env)
    assert found.returncode == 1 and "no Python 3.12 or newer" in found.stderr
