"""Opening an HTML report in headless Chromium (the system's `chromium`, driven by the
`playwright` package; no browser is downloaded): console errors, page errors and any network
request (a self-contained report makes none) are collected, and every plot element is
screenshotted on its own so a test can check that it rendered. Also runnable to take a
screenshot of a report: `python -m tests.report.browser report.html shot.png`."""
from __future__ import annotations

import importlib.util
import io
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class PlotShot:
    element_id: str
    natural_width: int  # 0: the image did not decode
    size: tuple[int, int]  # the image's on-screen box, CSS pixels
    png: bytes  # screenshot of that box (empty when it has no area)


@dataclass
class BrowserResult:
    errors: list[str] = field(default_factory=list)
    plots: list[PlotShot] = field(default_factory=list)
    page_png: bytes = b""


def chromium_path() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def missing_browser_reason() -> str | None:
    """Why the browser check cannot run here (None: it can)."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return ("no system Chromium found (tried " + ", ".join(CHROMIUM_NAMES) + "); "
                "scripts/setup.sh installs Debian's chromium when run as root")
    return None


def open_report(html_path: Path, width: int = 1280) -> BrowserResult:
    from playwright.sync_api import sync_playwright

    result = BrowserResult()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            # Root in a container has no user namespace for Chromium's sandbox.
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda message: result.errors.append(
                f"console {message.type}: {message.text}") if message.type == "error" else None)
            page.on("pageerror", lambda error: result.errors.append(f"page error: {error}"))
            page.route("**/*", lambda route: _only_local(route, result))
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load")
            for element in page.query_selector_all("figure.plot"):
                result.plots.append(_shoot(element))
            result.page_png = page.screenshot(full_page=True)
        finally:
            browser.close()
    return result


def _shoot(figure) -> PlotShot:
    image = figure.query_selector("img")
    natural = image.evaluate("img => img.complete ? img.naturalWidth : 0") if image else 0
    box = image.bounding_box() if image else None
    size = (int(box["width"]), int(box["height"])) if box else (0, 0)
    png = image.screenshot() if size[0] > 1 and size[1] > 1 else b""
    return PlotShot(figure.get_attribute("id") or "?", natural, size, png)


def _only_local(route, result: BrowserResult) -> None:
    url = route.request.url
    if url.startswith(("file:", "data:")):
        route.continue_()
    else:
        result.errors.append(f"network request to {url}")
        route.abort()


def ink_fraction(png: bytes) -> float:
    """Share of pixels that are not (near-)white: 0 for a blank (or absent) region."""
    if not png:
        return 0.0
    import numpy
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")[..., :3]
    return float(numpy.mean(pixels.min(axis=-1) < 0.9))


if __name__ == "__main__":
    shot = open_report(Path(sys.argv[1]))
    Path(sys.argv[2]).write_bytes(shot.page_png)
    print({"errors": shot.errors,
           "plots": [(p.element_id, p.natural_width, p.size) for p in shot.plots]})
