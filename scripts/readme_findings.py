"""Put benchmarks/results/findings.md into the README's "Paper findings at a glance" table.

    python scripts/readme_findings.py

The table is the block of lines starting with "|" that follows the section heading.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "### Paper findings at a glance"


def main() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    table = (REPO / "benchmarks" / "results" / "findings.md").read_text(encoding="utf-8").strip().splitlines()
    start = next(i for i in range(readme.index(HEADING), len(readme)) if readme[i].startswith("|"))
    end = next(i for i in range(start, len(readme)) if not readme[i].startswith("|"))
    (REPO / "README.md").write_text("\n".join(readme[:start] + table + readme[end:]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
