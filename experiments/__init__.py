"""Experiments that answer the paper's question with this codebase (run as modules).

Their committed run data live under experiments/runs/<setting>/; the tables and figures rebuilt
from it, under figures/<setting>/ (`figures_twin` maps the one to the other).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "experiments" / "runs"  # committed run data: one folder per setting
FIGURES = ROOT / "figures"  # pictures and small tables only


def figures_twin(path) -> Path | None:
    """The folder under figures/ that mirrors `path` under experiments/runs/ (where a committed
    run's pictures go, not next to its data); None for a path outside experiments/runs/.
    Example: experiments/runs/demo -> figures/demo."""
    try:
        twin = FIGURES / Path(path).resolve().relative_to(RUNS)
    except ValueError:
        return None
    try:  # relative to the working directory where it can be, as the defaults are written
        return twin.relative_to(Path.cwd())
    except ValueError:
        return twin
