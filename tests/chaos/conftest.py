"""The chaos suite's table: every case records (case, expected, observed, pass); printed at the end."""

from __future__ import annotations

import pytest

ROWS: list[tuple[str, str, str, bool]] = []


@pytest.fixture
def record():
    """record(case, expected, observed, ok): one table row; the test then asserts `ok`."""

    def add(case: str, expected: str, observed: str, ok: bool) -> bool:
        ROWS.append((case, expected, " ".join(observed.split())[:300], bool(ok)))
        return bool(ok)

    return add


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("chaos table")
    tr.write_line("| case | expected | observed | pass |")
    tr.write_line("| --- | --- | --- | --- |")
    for case, expected, observed, ok in ROWS:
        tr.write_line(f"| {case} | {expected} | {observed.replace('|', '/')} | {'yes' if ok else 'NO'} |")
    tr.write_line(f"{sum(r[3] for r in ROWS)}/{len(ROWS)} cases passed")
