"""Open a report in headless Chromium and check that every image rendered.

`check_in_chromium(html_path)` runs Chromium once with `--dump-dom` on the file:// URL; the
report's inline script (`report.html.SCRIPT`) has by then written, on <body>, how many <img>
decoded (`data-images-loaded`) out of how many (`data-images-total`). The check fails when the
script did not run, when a page has no image, or when any image failed. With `screenshot=`,
a second run writes a PNG of the page as a browser shows it.

Chromium is Debian's (`apt-get install chromium`, /usr/bin/chromium). Its flags keep it off
the network and away from any profile: a fresh --user-data-dir per run, no background
networking, component updates, sync or QUIC (on a closed network their connection attempts
are refused and slow it down). `--virtual-time-budget` lets the page finish loading without
a real wait. No sandbox: the check runs as root in containers, and the page is our own file.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html import unescape
from pathlib import Path

log = logging.getLogger(__name__)

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")
INSTALL_HINT = "install Debian's Chromium with `apt-get install chromium` (or pass its path)"


class BrowserCheckError(RuntimeError):
    """Chromium is missing, failed, or showed a report whose images did not all render."""


@dataclass(frozen=True)
class BrowserCheck:
    html_path: Path
    title: str
    images_total: int
    images_loaded: int
    chromium: str
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return self.images_total > 0 and self.images_loaded == self.images_total


def find_chromium(chromium: str | None = None) -> str:
    """The Chromium executable: `chromium` if given, else the first of CANDIDATES found."""
    for candidate in ((chromium,) if chromium else CANDIDATES):
        found = shutil.which(candidate)
        if found:
            return found
    wanted = chromium or ", ".join(CANDIDATES)
    raise BrowserCheckError(f"headless Chromium not found ({wanted}); {INSTALL_HINT}")


def _run(binary: str, extra: list[str], url: str, timeout_s: float) -> str:
    with tempfile.TemporaryDirectory(prefix="mixbits-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *extra, url]
        log.debug("running %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise BrowserCheckError(f"Chromium did not finish {url} within {timeout_s:g} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise BrowserCheckError(f"Chromium exited with {done.returncode} on {url}:\n{tail}")
    return done.stdout


def _body_attribute(dom: str, name: str) -> int | None:
    body = re.search(r"<body\b[^>]*>", dom, re.IGNORECASE)
    if body is None:
        return None
    value = re.search(rf'\b{name}="(\d+)"', body.group(0))
    return None if value is None else int(value.group(1))


def check_in_chromium(html_path: str | Path, *, screenshot: str | Path | None = None, timeout_s: float = 60,
                      chromium: str | None = None, virtual_time_ms: int = 10000,
                      window: tuple[int, int] = (1280, 4000)) -> BrowserCheck:
    """Render `html_path` headless; BrowserCheckError unless every <img> of the page decoded.
    `screenshot`: also write a PNG of the top `window` (width, height) pixels of the page."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path} not found; write it with `mixbits report RUN_DIR`")
    binary = find_chromium(chromium)
    url = html_path.as_uri()
    dom = _run(binary, [f"--virtual-time-budget={virtual_time_ms}", "--dump-dom"], url, timeout_s)
    title = re.search(r"<title>(.*?)</title>", dom, re.IGNORECASE | re.DOTALL)
    loaded, total = _body_attribute(dom, "data-images-loaded"), _body_attribute(dom, "data-images-total")
    if loaded is None or total is None:
        raise BrowserCheckError(f"{html_path}: the page's image counter did not run (no data-images-loaded on "
                                "<body> after load); is it a mixbits report?")
    shot = None
    if screenshot is not None:
        shot = Path(screenshot).resolve()
        shot.parent.mkdir(parents=True, exist_ok=True)
        _run(binary, [f"--virtual-time-budget={virtual_time_ms}", f"--screenshot={shot}", f"--window-size={window[0]},{window[1]}"],
             url, timeout_s)
        if not shot.is_file():
            raise BrowserCheckError(f"Chromium wrote no screenshot to {shot}")
    check = BrowserCheck(html_path, unescape(title.group(1)) if title else "", total, loaded, binary, shot)
    if not check.ok:
        raise BrowserCheckError(f"{html_path}: {loaded} of {total} images rendered in Chromium"
                                + ("; the page has no image" if total == 0 else ""))
    log.info("%s: %d/%d images rendered in %s", html_path, loaded, total, binary)
    return check
