"""`mixbits report`: the HTML report of a finished run, from its files alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mixbits.cli.common import app, console, setup_logging, user_errors, VERBOSE
from mixbits.outdir import refresh


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="output folder of `mixbits run` (holds results.json)"),
    open_check: bool = typer.Option(False, "--open-check", help="open the page in headless Chromium and fail "
                                                                "unless every plot renders (needs `apt-get install chromium`)"),
    screenshot: Optional[Path] = typer.Option(None, help="with --open-check: also save a PNG of the page here"),
    verbose: bool = VERBOSE,
) -> None:
    """Write RUN_DIR/report.html (plots embedded, no external file) and RUN_DIR/plots/*.png."""
    setup_logging(verbose)
    from mixbits.report.browser import BrowserCheckError, check_in_chromium
    from mixbits.report.html import write_report

    with user_errors(BrowserCheckError):
        path = write_report(run_dir)
        refresh(run_dir)  # report.html and plots/ go with the run when it is replaced (--overwrite)
        console.print(f"wrote {path}")
        if open_check or screenshot is not None:
            check = check_in_chromium(path, screenshot=screenshot)
            console.print(f"Chromium rendered {check.images_loaded}/{check.images_total} images"
                          + (f"; screenshot {check.screenshot}" if check.screenshot else ""))
