"""``python -m workbench reproduce``: re-measure each paper's headline claim on the toy world.

Each paper contributes one section: a function ``reproduce(quick: bool, out_dir: Path) -> ReproSection``
named in :data:`SECTIONS` by its import path, so this module never imports a paper module it is not
asked to run. Every section run writes ``OUT/NAME.md`` (its table, the command, mode and machine that
measured it) and its figures in ``OUT/NAME/``; ``OUT/reproduce.md`` is then rebuilt from all the section
files in ``OUT``, so sections measured by separate runs (``--only NAME``) share one report without one run
erasing another's. ``OUT`` is ``reports/`` by default and ``docs/results`` for the committed copy; links
are relative, so the folder can move as a whole.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.runtime import describe_machine

__all__ = ["SECTIONS", "ReproSection", "run_reproduction", "write_report"]

logger = logging.getLogger(__name__)

# name -> "module:function". Each later paper adds its line here.
SECTIONS: dict[str, str] = {
    "zoo": "workbench.zoo_report:reproduce",
    "timesteps": "workbench.timesteps:reproduce",
    "distrifusion": "workbench.distrifusion.experiment:reproduce",
    "sadm": "workbench.sadm.experiment:reproduce",
    "debias": "workbench.debias.experiment:reproduce",
    "singdiffusion": "workbench.singdiffusion.experiment:reproduce",
    "tif": "workbench.tif.experiment:reproduce",
    "tif-marks": "workbench.tif.experiment:reproduce_marks_only",
}


@dataclass
class ReproSection:
    """One paper's measured result.

    Attributes:
        title: section heading.
        claim: what the paper claims, in one sentence.
        rows: the table, one mapping per row (same keys in every row).
        verdict: whether the effect holds on the toy world, measured, in a sentence or two.
        figures: image files (written under the report folder) to show under the table.
        notes: anything a reader needs to interpret the figures (settings, caveats).
    """

    title: str
    claim: str
    rows: Sequence[Mapping[str, object]]
    verdict: str
    figures: Sequence[Path] = field(default_factory=list)
    notes: str = ""

    def to_markdown(self, report_dir: Path) -> str:
        lines = [f"## {self.title}", "", f"**Paper's claim.** {self.claim}", ""]
        if self.rows:
            keys = list(self.rows[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in self.rows]
            lines.append("")
        lines += [f"**Measured.** {self.verdict}", ""]
        if self.notes:
            lines += [self.notes, ""]
        for figure in self.figures:
            lines += [f"![{Path(figure).stem}]({Path(figure).resolve().relative_to(report_dir.resolve())})", ""]
        return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def run_reproduction(
    *, quick: bool = False, only: Sequence[str] | None = None, out_dir: str | Path = "reports"
) -> Path:
    """Run the named sections (all by default), write ``out_dir/NAME.md`` for each and rebuild the report.

    Returns the path of ``out_dir/reproduce.md``, which joins every section file present in ``out_dir``
    (in :data:`SECTIONS` order), including those of earlier runs into the same folder.
    """
    names = list(only) if only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"only: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else "full"
    for name in names:
        module_name, function_name = SECTIONS[name].split(":")
        start = time.perf_counter()
        section = getattr(importlib.import_module(module_name), function_name)(quick=quick, out_dir=out_dir / name)
        command = f"python -m workbench reproduce{' --quick' if quick else ''} --only {name} --out {out_dir.as_posix()}"
        provenance = (
            f"*Measured by `{command}` ({mode} mode) in {time.perf_counter() - start:.0f} s on {describe_machine()}.*\n"
        )
        (out_dir / f"{name}.md").write_text(section.to_markdown(out_dir) + "\n" + provenance)
        logger.info("reproduce: %s done", name)
    return write_report(out_dir)


def write_report(out_dir: str | Path) -> Path:
    """Join the section files ``out_dir/NAME.md`` present into ``out_dir/reproduce.md``; returns its path."""
    out_dir = Path(out_dir)
    present = [name for name in SECTIONS if (out_dir / f"{name}.md").is_file()]
    parts = [
        "# Reproduction report",
        "",
        "Each section below was written by the `python -m workbench reproduce` command named under it, which "
        "also states the mode and the machine; the figures come from that run. Sections measured: "
        + (", ".join(f"[{name}]({name}.md)" for name in present) or "none")
        + ".",
        "",
    ]
    parts += [(out_dir / f"{name}.md").read_text() for name in present]
    report = out_dir / "reproduce.md"
    report.write_text("\n".join(parts))
    return report
