"""Shared by the benchmark scripts (``bench_qat.py``, ``bench_ensemble.py``): markdown tables of the results."""
from __future__ import annotations


def stages_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> list[str]:
    """The lines of a "stages of one update" table: one row per setting, its stages' times (ms) and their sum,
    after a blank line, ``title`` and another blank line."""
    keys = list(rows[0][1])
    return ["", title, "", "| setting | " + " | ".join(keys) + " | sum |", "|---|" + "---|" * (len(keys) + 1),
            *(f"| {name} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + f" | {sum(v.values()):.3f} |"
              for name, v in rows)]
