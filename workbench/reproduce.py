"""``python -m workbench reproduce``: re-measure each paper's headline claim on the toy world.

Each paper contributes one section: a function ``reproduce(quick: bool, out_dir: Path) -> ReproSection``
named in :data:`SECTIONS` by its import path, so this module never imports a paper module it is not
asked to run. The report is ``OUT/reproduce.md`` (``reports/`` by default; ``--out docs/results`` for the
committed copy the README points to): one table per section, with its figures in ``OUT/NAME/`` linked by
relative paths, so the folder can move as a whole.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.runtime import describe_machine

__all__ = ["SECTIONS", "ReproSection", "run_reproduction"]

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
    """Run the named sections (all by default) and write ``out_dir/reproduce.md``; returns its path."""
    names = list(only) if only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"only: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m workbench reproduce" + (" --quick" if quick else "")
    command += (" --only " + " ".join(names) if only else "") + f" --out {out_dir.as_posix()}"
    parts = [
        "# Reproduction report",
        "",
        f"Written by `{command}`: the measured figures below come from that run.",
        "",
        f"Mode: {'quick' if quick else 'full'}. Machine: {describe_machine()}.",
        "",
    ]
    for name in names:
        module_name, function_name = SECTIONS[name].split(":")
        start = time.perf_counter()
        section = getattr(importlib.import_module(module_name), function_name)(quick=quick, out_dir=out_dir / name)
        parts.append(section.to_markdown(out_dir))
        parts.append(f"*Section `{name}` took {time.perf_counter() - start:.0f} s.*\n")
        logger.info("reproduce: %s done", name)
    report = out_dir / "reproduce.md"
    report.write_text("\n".join(parts))
    return report
