"""Write a run's report.html and check in headless Chromium that every plot renders.

    python scripts/check_report.py RUN_DIR [--screenshot PAGE.png] [--no-write]

Exit code 0 when every image of the page decoded, 1 otherwise (the reason on stderr).
Needs Debian's Chromium: `apt-get install chromium`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mixbits.report.browser import BrowserCheckError, check_in_chromium
from mixbits.report.html import REPORT_NAME, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="output folder of `mixbits run`")
    parser.add_argument("--screenshot", type=Path, help="also save a PNG of the page (1280 px wide)")
    parser.add_argument("--no-write", action="store_true", help="check the existing report.html as it is")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = args.run_dir / REPORT_NAME if args.no_write else write_report(args.run_dir)
        check = check_in_chromium(path, screenshot=args.screenshot)
    except (BrowserCheckError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{path}: {check.images_loaded}/{check.images_total} images rendered in {check.chromium} "
          f"(title {check.title!r})" + (f"; screenshot {check.screenshot}" if check.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
