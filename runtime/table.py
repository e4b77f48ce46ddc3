"""Plain aligned text tables, the output format of the `natgen` command and of `natgen bench`."""
from __future__ import annotations


def table(headers, rows) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row):
        out = []
        for i, cell in enumerate(row):
            numeric = cell.replace(".", "", 1).replace("x", "").replace("-", "").isdigit()
            out.append(cell.rjust(widths[i]) if numeric and i else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt(row) for row in cells[1:]])
