"""The cost model's estimates as the table `faasmoe plan-cost` and `faasmoe export ... auto` print."""

from __future__ import annotations

from faasmoe.planning.cost import CE_FUNCTION_CAP, PlanEstimate

COLUMNS = (
    "plan",
    "functions",
    f"fits CE ({CE_FUNCTION_CAP})",
    "warm functions",
    "GB-s/h",
    "cold starts/h",
    "invocations/token",
    "$/h",
)
GIVEN = "(given)"
CHOSEN = "<- cheapest"


def figure(value: float) -> str:
    """A modelled figure as printed: six significant digits."""
    return f"{value:.6g}"


def format_estimates(estimates: list[PlanEstimate], cheapest: PlanEstimate | None = None) -> str:
    """One row per estimate, the given plan marked ``(given)`` and ``cheapest`` marked ``<- cheapest``."""
    rows = [list(COLUMNS)]
    for e in estimates:
        name = f"{e.name} {GIVEN}" if e.given else e.name
        rows.append(
            [
                name,
                str(e.functions),
                "yes" if e.fits_ce else "no",
                figure(e.warm_functions),
                figure(e.gb_s_per_hour),
                figure(e.cold_starts_per_hour),
                figure(e.invocations_per_token),
                figure(e.cost_per_hour),
            ]
            + ([CHOSEN] if e is cheapest else [])
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row[: len(COLUMNS)], widths, strict=True))
        ]
        lines.append("  ".join(cells + row[len(COLUMNS) :]).rstrip())
    return "\n".join(lines)
