"""README's commands are the ones CI and newcomers run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"TEST_COMMAND='(.+)'", ci).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme, f"README.md must show CI's test command verbatim: {command}"


def test_readme_main_job_command_points_at_existing_script() -> None:
    readme = (ROOT / "README.md").read_text()
    scripts = set(re.findall(r"python (bench/\w+\.py)", readme))
    assert "bench/latency.py" in scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script
