"""Plain-text tables for the command line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table"]


def table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """``rows`` as aligned columns under a header and a rule.

    Args:
        rows: one mapping per row.
        columns: ``(key, header)`` per column; a None value prints empty.

    Returns:
        The table, without a final newline.
    """
    cells = [[h for _, h in columns]] + [["" if r[k] is None else str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
