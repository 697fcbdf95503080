"""The one markdown-table formatter (metaug_jax/evaluation/tables.py) that the probes, compare.py
and the benchmark report use."""

import pytest

from metaug_jax.evaluation import tables


def test_table_lines_have_the_header_s_columns_and_pad_short_rows():
  lines = tables.table_lines(["a", "b", "c"], [[1, 2.5, "x"], ["enc", "error: boom"]])
  assert lines == ["| a | b | c |", "|---|---|---|", "| 1 | 2.5 | x |",
                   "| enc | error: boom | |"]
  assert all(l.count("|") == 4 for l in lines)


def test_a_row_longer_than_the_header_is_an_error():
  with pytest.raises(ValueError, match="3 cells, the header 2"):
    tables.table_lines(["a", "b"], [[1, 2, 3]])


def test_markdown_table_puts_the_title_above():
  assert tables.markdown_table(["x"], [[1]], "title") == "title\n| x |\n|---|\n| 1 |"
  assert tables.markdown_table(["x"], []) == "| x |\n|---|"


def test_mean_std_is_the_sample_std_and_skips_missing_values():
  # 1, 2, 4: mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3.
  assert tables.mean_std([1.0, None, 2.0, 4.0]) == f"2.33 ± {(7 / 3) ** 0.5:.2f}"
  assert tables.mean_std([97.5]) == "97.50"
  assert tables.mean_std([None, None]) == tables.MISSING == tables.mean_std([])
  assert tables.mean_std([1.0, 1.0], digits=1) == "1.0 ± 0.0"


def test_number_writes_missing_for_none_and_nan():
  assert tables.number(3.14159) == "3.14" and tables.number(2, 0) == "2"
  assert tables.number(None) == tables.number(float("nan")) == tables.MISSING
