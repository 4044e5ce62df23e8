"""docs/reliability.md names, for every bad input, fault and webhook attack, the test that holds
it: every row names at least one test (the webhook rows, a case of the one parametrized attack
test), and every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"([\w/]+\.py)::(\w+)")
ATTACKS = ROOT / "tests" / "deploy" / "test_webhook_attacks.py"


def _sections() -> dict[str, list[str]]:
    """The numbered table rows of each `## ` section."""
    sections, current = {}, None
    for line in (ROOT / "docs" / "reliability.md").read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None and re.match(r"\|\s*\d+\s*\|", line):
            current.append(line)
    return sections


def _exists(path: str, name: str) -> bool:
    source = ROOT / "tests" / path
    return source.is_file() and re.search(rf"^(async )?def {name}\(", source.read_text(), re.M) is not None


def test_every_row_names_a_test_that_exists():
    sections = _sections()
    bad_inputs, faults, attacks = sections["Bad inputs"], sections["Faults"], sections["Webhook attacks"]
    assert (len(bad_inputs), len(faults), len(attacks)) >= (30, 12, 18)  # the targets
    problems = []
    for row in bad_inputs + faults:
        references = REFERENCE.findall(row)
        problems += [f"no test named: {row[:60]}"] if not references else []
        problems += [f"{p}::{n} does not exist" for p, n in references if not _exists(p, n)]
    cases = ATTACKS.read_text()
    for row in attacks:  # a case of the parametrized attack test, or a test of its own
        case, references = row.split("|")[2].strip(), REFERENCE.findall(row)
        if references:
            problems += [f"{p}::{n} does not exist" for p, n in references if not _exists(p, n)]
        elif f'"{case}"' not in cases:
            problems.append(f"webhook attack {case!r} is no case of {ATTACKS.name}")
    assert not problems, problems
