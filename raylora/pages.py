"""raylora's HTML pages in headless Chromium: did every image load, did anything log an error, and a
PNG screenshot of the whole page.

The check opens a copy of the page (written next to it, so relative image paths resolve) with a small
probe script first in ``<head>``: it records uncaught errors, ``console.error`` calls and failed
resource loads, and once the page has loaded it writes them, every ``<img>``'s ``naturalWidth`` and the
page height into a hidden element; ``chromium --dump-dom`` prints the DOM and the result is read back.
The screenshot is ``chromium --screenshot`` of the page itself at its full height.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

INSTALL = "apt-get update && apt-get install -y chromium"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--hide-scrollbars",
)
WIDTH = 1280
MAX_HEIGHT = 12000  # px; a longer page is cut (the screenshot is for a look, the check sees it all)
RESULT_ID = "raylora-page-check"

PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) errors.push("failed to load " + String(t.src || t.href).slice(0, 120));
    else errors.push(String(e.message || e));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection " + e.reason); });
  var consoleError = console.error;
  console.error = function () {
    errors.push("console.error " + Array.prototype.map.call(arguments, String).join(" "));
    return consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var images = Array.prototype.map.call(document.images, function (im) {
      return {src: (im.getAttribute("src") || "").slice(0, 120), width: im.complete ? im.naturalWidth : 0};
    });
    var out = document.createElement("pre");
    out.id = "__RESULT_ID__";
    out.hidden = true;
    out.textContent = JSON.stringify({
      errors: errors, images: images, height: document.documentElement.scrollHeight
    });
    document.body.appendChild(out);
  });
})();
</script>""".replace("__RESULT_ID__", RESULT_ID)


@dataclass
class PageCheck:
    """What Chromium saw on a page: images, the ones that did not load, errors, the page height (px)."""

    images: int
    broken: list[str] = field(default_factory=list)  # src (cut at 120 characters) of each broken <img>
    errors: list[str] = field(default_factory=list)
    height: int = 0

    @property
    def ok(self) -> bool:
        return not self.broken and not self.errors

    def problems(self) -> str:
        return "; ".join([*(f"broken image {s}" for s in self.broken), *self.errors]) or "none"


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, else None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _chromium() -> str:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError(f"Chromium not found; install it: {INSTALL}")
    return exe


def _run(args: list[str], timeout: float) -> str:
    """Run Chromium in a fresh profile; its stdout. The whole process group goes on timeout."""
    with tempfile.TemporaryDirectory(prefix="raylora-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [_chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"Chromium did not finish within {timeout:.0f}s: {' '.join(args)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"Chromium exited with {proc.returncode}: {err.strip()[-2000:]}")
    return out


def check_page(page: Path, width: int = WIDTH, timeout: float = 60) -> PageCheck:
    """Load ``page`` from disk in headless Chromium: its images, broken images, errors and height."""
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text, flags=re.IGNORECASE)
    probed = text[: head.end()] + PROBE + text[head.end() :] if head else PROBE + text
    fd, copy = tempfile.mkstemp(prefix=f".{page.stem}-check-", suffix=".html", dir=page.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(probed)
        dom = _run([f"--window-size={width},900", "--dump-dom", Path(copy).as_uri()], timeout)
    finally:
        os.unlink(copy)
    found = re.search(rf'<pre id="{RESULT_ID}"[^>]*>(.*?)</pre>', dom, flags=re.DOTALL)
    if found is None:
        raise RuntimeError(f"{page}: the page never finished loading in Chromium (no load event)")
    result = json.loads(html.unescape(found.group(1)))
    return PageCheck(
        images=len(result["images"]),
        broken=[im["src"] for im in result["images"] if im["width"] <= 0],
        errors=list(result["errors"]),
        height=int(result["height"]),
    )


def screenshot(page: Path, png: Path, width: int = WIDTH, timeout: float = 60) -> PageCheck:
    """Check ``page`` (:func:`check_page`) and save a PNG of it, whole (up to MAX_HEIGHT px), to ``png``."""
    page, png = Path(page).resolve(), Path(png).resolve()
    check = check_page(page, width, timeout)
    height = max(min(check.height, MAX_HEIGHT), 200)
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {page}")
    return check


def save_screenshot(page: Path, tag: str) -> Path | None:
    """The commands' screenshot: ``page`` as a PNG next to it (``gallery.html`` -> ``gallery.png``).

    Prints one line and returns None when Chromium is missing or fails; a page problem (broken image,
    error) is one warning line. Never raises: the page itself is already written.
    """
    page = Path(page)
    png = page.with_suffix(".png")
    png.unlink(missing_ok=True)  # never a stale screenshot next to a new page
    if find_chromium() is None:
        print(f"[{tag}] no screenshot of {page.name}: Chromium not found ({INSTALL})", flush=True)
        return None
    try:
        check = screenshot(page, png)
    except Exception as e:  # a screenshot is a courtesy, never a failure of the command
        print(f"[{tag}] no screenshot of {page.name}: {e}", flush=True)
        return None
    if not check.ok:
        print(f"[{tag}] warning: {page.name} in Chromium: {check.problems()}", flush=True)
    return png
