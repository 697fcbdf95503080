"""Markdown tables for every printed or written report (probes, compare.py, the benchmark).

Pure string formatting: importing it starts nothing, so experiment scripts can use it before
JAX is configured.
"""

import math
from typing import Iterable, Optional, Sequence

MISSING = "–"


def table_lines(head: Sequence, rows: Iterable[Sequence]) -> list:
  """The lines of a markdown table: header, separator, one line per row.

  Cells are written with `str`; a row shorter than the header (e.g. an error message in its
  last cell) is padded with empty cells, so every line has the header's column count.
  """
  line = lambda cells: "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
  head = [str(h) for h in head]
  lines = [line(head), "|" + "---|" * len(head)]
  for row in rows:
    cells = [str(c) for c in row]
    if len(cells) > len(head):
      raise ValueError(f"a row has {len(cells)} cells, the header {len(head)}: {cells}")
    lines.append(line(cells + [""] * (len(head) - len(cells))))
  return lines


def markdown_table(head: Sequence, rows: Iterable[Sequence], title: Optional[str] = None) -> str:
  """`table_lines` joined into one string, under an optional title line."""
  lines = table_lines(head, rows)
  return "\n".join([title, *lines] if title else lines)


def number(value: Optional[float], digits: int = 2) -> str:
  """A value with `digits` decimals, or MISSING for None / NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return MISSING
  return f"{value:.{digits}f}"


def mean_std(values: Iterable[Optional[float]], digits: int = 2) -> str:
  """'mean ± sample std' of the values present (None skipped); one value alone; MISSING
  for none."""
  present = [float(v) for v in values if v is not None]
  if not present:
    return MISSING
  if len(present) == 1:
    return number(present[0], digits)
  mean = sum(present) / len(present)
  std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
  return f"{mean:.{digits}f} ± {std:.{digits}f}"
