"""The report opened in headless Chromium: every plot decodes. Skipped without Debian's
Chromium (`apt-get install chromium`), except the checks that need no browser."""

import shutil

import pytest

from mixbits.report.browser import BrowserCheckError, check_in_chromium
from mixbits.report.html import SCRIPT, write_report

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("/usr/bin/chromium") is None,
                                    reason="needs headless Chromium: apt-get install chromium")

TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def page(images):
    imgs = "".join(f'<img src="data:image/png;base64,{data}" alt="x">' for data in images)
    return f"<!DOCTYPE html><html><head><title>t</title><script>{SCRIPT}</script></head><body>{imgs}</body></html>"


@needs_chromium
def test_every_plot_of_a_real_run_report_renders(full_run, tmp_path):
    shot = tmp_path / "page.png"
    check = check_in_chromium(write_report(full_run), screenshot=shot)
    assert check.images_total == 6 and check.images_loaded == check.images_total
    assert check.title.startswith("mixbits report: ")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@needs_chromium
def test_a_broken_image_fails_the_check(tmp_path):
    good = tmp_path / "good.html"
    good.write_text(page([TINY_PNG]))
    assert check_in_chromium(good).images_loaded == 1
    bad = tmp_path / "bad.html"
    bad.write_text(page([TINY_PNG, "bm90IGEgcG5n"]))  # the second is "not a png"
    with pytest.raises(BrowserCheckError, match="1 of 2 images rendered"):
        check_in_chromium(bad)


@needs_chromium
def test_a_page_without_the_counter_is_not_passed(tmp_path):
    path = tmp_path / "plain.html"
    path.write_text("<html><body><p>no counter</p></body></html>")
    with pytest.raises(BrowserCheckError, match="counter did not run"):
        check_in_chromium(path)


def test_missing_chromium_names_the_install_command(tmp_path):
    path = tmp_path / "r.html"
    path.write_text(page([TINY_PNG]))
    with pytest.raises(BrowserCheckError, match="apt-get install chromium"):
        check_in_chromium(path, chromium=str(tmp_path / "no-such-chromium"))
    with pytest.raises(FileNotFoundError, match="mixbits report"):
        check_in_chromium(tmp_path / "missing.html")
