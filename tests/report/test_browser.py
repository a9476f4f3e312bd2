"""The HTML report in a real browser: headless Chromium opens report.html from a real
comparison, with no console error, no network request, and every plot rendered (its image
decoded and its on-screen region not blank). Skips, saying why, without a system Chromium or
the playwright package."""
from __future__ import annotations

import pytest

from tests.report.browser import ink_fraction, missing_browser_reason, open_report

EXPECTED_PLOTS = ["loss-curves", "metric-vs-params", "metric-vs-memory", "metric-vs-time"]


@pytest.fixture(scope="module")
def browser_view(two_method_comparison):
    reason = missing_browser_reason()
    if reason:
        pytest.skip(reason)
    _, result = two_method_comparison
    return open_report(result.report.html)


def test_report_opens_without_errors(browser_view):
    assert browser_view.errors == []


def test_every_plot_rendered(browser_view):
    assert [plot.element_id for plot in browser_view.plots] == EXPECTED_PLOTS
    for plot in browser_view.plots:
        assert plot.natural_width > 100 and plot.size[1] > 100, plot.element_id
        # Axes, ticks, lines and labels: a rendered plot has a few percent of ink at least.
        assert ink_fraction(plot.png) > 0.02, plot.element_id


def test_the_check_sees_a_broken_plot(two_method_comparison, tmp_path):
    """The check itself fails on a plot that does not render (a truncated image)."""
    if missing_browser_reason():
        pytest.skip(missing_browser_reason())
    _, result = two_method_comparison
    html = result.report.html.read_text()
    start = html.index('src="data:image/png;base64,') + len('src="data:image/png;base64,')
    broken = tmp_path / "broken.html"
    broken.write_text(html[:start] + "AAAA" + html[html.index('"', start):])
    view = open_report(broken)
    first = view.plots[0]
    # Chromium draws a broken-image icon and alt text (some ink) in a short box: it is the
    # decoded width and the box height that the rendering check rejects.
    assert first.natural_width == 0 and first.size[1] < 100
