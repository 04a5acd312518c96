"""The list of entry points is complete and each exposes its parser."""
from pathlib import Path

import pytest

from tests.support.entry_points import ENTRY_POINTS, parser_of

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("and_mask", "gen_mask", "vizualization")


def modules_with_main():
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if 'if __name__ == "__main__"' in path.read_text():
                parts = path.relative_to(ROOT).with_suffix("").parts
                found.add(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return found


def test_every_entry_module_is_listed():
    assert modules_with_main() == {entry.split()[0] for entry in ENTRY_POINTS}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_builds_its_parser(module):
    parser = parser_of(module)
    assert parser.prog == f"python -m {module}"
