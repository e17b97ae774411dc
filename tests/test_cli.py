"""The command line people type: `--help` of every job, and every job command line written in the
README and docs parses and validates as written (so the docs cannot drift from the config)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from aptos_ray.cli import JOBS, job_help, main
from aptos_ray.config import parse_args

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A job command at the start of a line: `python jobs/X.py ...`, `aptos-ray X ...`, possibly after
# environment assignments or `ray job submit ... --`.
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:ray job submit\b.*?--\s+)?"
                     r"(?:python jobs/(?P<script>\w+)\.py|aptos-ray (?P<job>\w+))(?P<args>(?:\s.*)?)$")


def fenced_lines(path: Path) -> list[tuple[int, str]]:
    """Lines inside ``` blocks, with backslash continuations joined."""
    out, inside, pending = [], False, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((number, pending + line))
        pending = ""
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, job, arguments) of every job command in the docs; `...` and `[optional]` dropped."""
    found = []
    for path in DOCS:
        for number, line in fenced_lines(path):
            match = COMMAND.match(line.strip())
            if not match:
                continue
            args = shlex.split(match["args"], comments=True)
            args = [a.strip("[]") for a in args if a not in ("...", "[...]") and not a.startswith("[--key")]
            found.append((f"{path.name}:{number}", match["script"] or match["job"], args))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_of_every_job():
    assert {job for _, job, _ in COMMANDS} == set(JOBS)
    assert len(COMMANDS) >= 12


@pytest.mark.parametrize("where, job, args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_parses_and_validates(where, job, args):
    if "--help" in args or "-h" in args:
        return  # test_help_of_every_job
    parse_args(args, sections=JOBS[job].sections)


@pytest.mark.parametrize("job", JOBS)
def test_help_examples_parse_and_validate(job):
    for example in JOBS[job].examples:
        parse_args(shlex.split(example.replace("{prog}", "")), sections=JOBS[job].sections)


@pytest.mark.parametrize("job", JOBS)
def test_help_of_every_job(job):
    """`python jobs/JOB.py --help` (and -h): usage, examples, every key of the job's sections."""
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == job_help(JOBS[job], f"python jobs/{job}.py")
    assert f"python jobs/{job}.py --" in proc.stdout  # an example
    for section in JOBS[job].sections:
        assert f"\n{section}: " in proc.stdout
    short = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--local", "-h"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert short.returncode == 0 and short.stdout == proc.stdout


def test_console_script_lists_jobs_and_runs_help(capsys):
    main([])
    listing = capsys.readouterr().out
    assert all(f"  {job} " in listing for job in JOBS)
    main(["tune", "--help"])
    assert "usage: aptos-ray tune" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2 and "unknown job 'trian'" in capsys.readouterr().err


def test_console_scripts_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["aptos-ray"] == "aptos_ray.cli:main"
    assert "numpy>=2" in project["dependencies"]
    assert {"optuna", "mlflow", "explain"} <= set(project["optional-dependencies"])


def test_declared_dependencies_are_the_imported_ones():
    """What the package imports is declared, and a core dependency it never imports is not."""
    tomllib = pytest.importorskip("tomllib")
    core = " ".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    source = "\n".join(p.read_text() for p in (REPO / "aptos_ray").rglob("*.py"))
    assert "safetensors" in core and "from safetensors" in source
    assert "torchvision" not in core and not re.search(r"^\s*(import|from) torchvision", source, re.M)
    assert "grad-cam" not in core  # --predict.explain's extra
