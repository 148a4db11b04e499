"""docs/configuration.md documents every environment variable vmfleet reads, and no other.

The variables are found in the code that reads them: ``cli/settings.py`` (the daemons),
``cli/main.py`` (the log level) and ``cli/client.py`` (the client commands).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
READERS = ("cli/settings.py", "cli/main.py", "cli/client.py")
DOC = ROOT / "docs" / "configuration.md"
#: Read, but not vmfleet's own: documented where they matter, not in the summary.
FOREIGN = frozenset({"XDG_DATA_HOME"})


def _read_variables() -> set[str]:
    found: set[str] = set()
    for reader in READERS:
        text = (ROOT / reader).read_text()
        found |= set(re.findall(r'(?:env|environ)(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]+)"', text))
    return found


def _summary_variables() -> set[str]:
    summary = DOC.read_text().split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| [")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}


def test_the_readers_are_found() -> None:
    read = _read_variables()
    assert {"NATS_URL", "JWT_SECRET", "VMFLEET_UI", "VMFLEET_LOG_LEVEL", "HYPEMAN_API_KEY"} <= read


def test_every_variable_read_is_in_the_summary() -> None:
    missing = _read_variables() - FOREIGN - _summary_variables()
    assert not missing, f"add {sorted(missing)} to docs/configuration.md"


def test_every_variable_in_the_summary_is_read() -> None:
    stale = _summary_variables() - _read_variables()
    assert not stale, f"docs/configuration.md lists {sorted(stale)}, which nothing reads"


def test_every_variable_is_described_below_the_summary() -> None:
    details = DOC.read_text().split("## Summary", 1)[1].split("\n## ", 1)[1]
    for name in _read_variables() - FOREIGN:
        assert f"`{name}`" in details, f"docs/configuration.md: describe {name}"
