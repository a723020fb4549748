"""The command line and the reproduction report skeleton."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.reproduce import SECTIONS, ReproSection, run_reproduction


def _run(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=300)


def test_zoo_list_shows_every_model_as_shipped():
    result = _run("zoo", "list")
    assert result.returncode == 0, result.stderr
    for name in ("toyclip", "toy-t2i", "toy-uncond"):
        assert f"{name}" in result.stdout
    assert "not trained" not in result.stdout


def test_zoo_load_describes_the_model():
    result = _run("zoo", "load", "toy-uncond")
    assert result.returncode == 0, result.stderr
    assert "UNet2DModel" in result.stdout and "python -m workbench zoo train toy-uncond" in result.stdout


def test_unknown_names_are_clear_errors():
    result = _run("zoo", "load", "toy-gan")
    assert result.returncode != 0 and "must be one of the zoo models" in result.stderr
    result = _run("reproduce", "--quick", "--only", "nothing")
    assert result.returncode != 0 and "unknown section" in result.stderr
    result = _run("bench", "nothing")
    assert result.returncode != 0 and "usage" in result.stderr


def test_bench_toyworld_prints_the_machine_and_the_rate():
    result = _run("bench", "toyworld", "--n", "500", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("machine: ") and "images/s" in result.stdout
    # benchmarks time with glibc keeping freed memory (no page faults on every fresh large tensor)
    assert "glibc malloc keeps freed memory" in result.stdout.splitlines()[0]


def test_steady_allocator_reaches_the_processes_started_afterwards():
    code = (
        "import os, subprocess, sys; from workbench.runtime import steady_cpu_allocator as s; print(s()); "
        "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"MALLOC_MMAP_THRESHOLD_\"])'], "
        "capture_output=True, text=True).stdout.strip())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", str(1 << 30)]


def test_reproduction_report_has_the_zoo_section(tmp_path):
    report = run_reproduction(quick=True, only=["zoo"], out_dir=tmp_path)
    text = report.read_text()
    assert "## The toy world and the zoo" in text and "| model | figure | value |" in text
    assert (tmp_path / "zoo" / "toy_t2i_samples.png").is_file()
    assert "toy_t2i_samples.png" in text


def _figure_section(quick: bool, out_dir: Path) -> ReproSection:
    out_dir.mkdir(parents=True)
    (out_dir / "curve.png").write_bytes(b"")
    return ReproSection("A section", "a claim", [{"n": 1}], "holds", [out_dir / "curve.png"])


def test_report_under_docs_results_names_its_command_and_links_figures_relatively(tmp_path, monkeypatch):
    # As `reproduce --out docs/results` writes the committed copy: figures are linked relative to the report,
    # so the folder reads the same wherever it is checked out.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(SECTIONS, "figure", f"{__name__}:_figure_section")
    report = run_reproduction(quick=True, only=["figure"], out_dir="docs/results")
    assert report == Path("docs/results/reproduce.md")
    text = report.read_text()
    assert "Measured by `python -m workbench reproduce --quick --only figure --out docs/results`" in text
    assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", text) == ["figure/curve.png"]
    assert (report.parent / "figure" / "curve.png").is_file()


def _other_section(quick: bool, out_dir: Path) -> ReproSection:
    return ReproSection("Another section", "another claim", [{"n": 2}], "does not hold")


def test_sections_run_separately_share_one_report(tmp_path, monkeypatch):
    monkeypatch.setitem(SECTIONS, "figure", f"{__name__}:_figure_section")
    monkeypatch.setitem(SECTIONS, "other", f"{__name__}:_other_section")
    run_reproduction(quick=True, only=["other"], out_dir=tmp_path)
    text = run_reproduction(quick=False, only=["figure"], out_dir=tmp_path).read_text()
    # the second run kept the first run's section, and each section names the run that measured it
    assert text.index("## A section") < text.index("## Another section")
    assert "reproduce --only figure" in text and "(full mode)" in text
    assert "reproduce --quick --only other" in text and "(quick mode)" in text
    assert (tmp_path / "other.md").is_file() and (tmp_path / "figure.md").is_file()


def test_section_markdown_lists_rows_and_figures(tmp_path):
    figure = tmp_path / "s" / "f.png"
    figure.parent.mkdir()
    figure.write_bytes(b"")
    section = ReproSection("T", "claim", [{"a": 1.23456, "b": "x|y"}], "holds", [figure])
    text = section.to_markdown(tmp_path)
    assert "| a | b |" in text and "| 1.235 | x\\|y |" in text and "![f](s/f.png)" in text


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_section_names_an_importable_function(name):
    import importlib

    module_name, function_name = SECTIONS[name].split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))
