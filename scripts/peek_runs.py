"""Print the last history row of every search checkpoint under a folder (default: runs/).

python scripts/peek_runs.py runs/schedules
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    for path in sorted(root.rglob("checkpoint.pt")):
        state = torch.load(path, weights_only=False, map_location="cpu")
        row = (state.get("history") or [{}])[-1]
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(path.parent.relative_to(root), shown)
    for path in sorted(root.rglob("subnetwork.json")):
        print(path.parent.relative_to(root), "finished")


if __name__ == "__main__":
    main()
