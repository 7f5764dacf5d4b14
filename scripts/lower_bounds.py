"""Prints pip constraints that pin every dependency of ``pyproject.toml`` (and the extras named on the
command line) to the lowest version its range allows: ``make test-oldest`` installs with them.

Every requirement must state its lower bound as ``>=`` or ``==``, so that the bound is a version
someone tested rather than whatever an old resolver happens to find.
"""

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)\s*(?P<spec>.*)$")


def lowest(requirement: str) -> str:
    """``"torch>=2.13,<2.15"`` -> ``"torch==2.13"``."""
    match = REQUIREMENT.match(requirement.strip())
    if match is None:
        raise SystemExit(f"cannot parse requirement {requirement!r} in {PYPROJECT}")
    for clause in match["spec"].split(","):
        clause = clause.strip()
        if clause.startswith((">=", "==")):
            return f"{match['name']}=={clause[2:].strip()}"
    raise SystemExit(f"{requirement!r} in {PYPROJECT} has no lower bound (>= or ==)")


def main() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in sys.argv[1:]:
        requirements += project["optional-dependencies"][extra]
    print("\n".join(lowest(r) for r in requirements))


if __name__ == "__main__":
    main()
