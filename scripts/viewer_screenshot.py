"""Write the subnetwork viewer of one or two subnetworks as offline HTML and a PNG screenshot
taken by headless Chromium (the picture in the README).

    .venv/bin/python scripts/viewer_screenshot.py RUN_A [RUN_B] --out figures/viewer

RUN_* are saved subnetworks or `find` runs (their chosen lambda). Writes OUT.html and OUT.png;
fails if Chromium reports a JavaScript error while loading the page.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigram_circuits.app.view import view
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.plots import view_html


def screenshot(html: Path, png: Path, width: int, height: int) -> list[str]:
    """Screenshot ``html`` in headless Chromium with the network unreachable; the console's error lines."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: needs Chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--window-size={width},{height}",
                "--virtual-time-budget=20000",
                "--enable-logging=stderr",
                "--v=0",
                f"--screenshot={shot}",
                html.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if not shot.exists():
            raise SystemExit(f"error: Chromium wrote no screenshot: {done.stderr[-500:]}")
        atomic_write_bytes(png, shot.read_bytes())
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return [line for line in console if "Uncaught" in line or "Error" in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("other", nargs="?")
    parser.add_argument("--names", default=None, help="comma-separated names of the subnetworks")
    parser.add_argument("--out", default="figures/viewer")
    parser.add_argument("--n-random", type=int, default=2000)
    args = parser.parse_args()
    names = args.names.split(",") if args.names else None
    fig = view(args.run, args.other, names=names, n_random=args.n_random)
    out = Path(args.out)
    html = view_html(fig, out.with_name(out.name + ".html"))
    errors = screenshot(html, out.with_name(out.name + ".png"), int(fig.layout.width), int(fig.layout.height))
    print(html, out.with_name(out.name + ".png"))
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
