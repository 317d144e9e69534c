"""Driving the demo page (serving/web/) in Debian's Chromium through Playwright's Python API.

- `chromium_or_skip_reason()`: the browser binary, or why the browser tests cannot run here.
- `launch(playwright)`: Debian's Chromium, headless, with the flags this machine needs.
- `DIGIT_STROKES`: each digit 0-9 as a person draws it: strokes along hand-designed paths in
  pad coordinates (0-1, y down), written as arcs and lines, not as pixels.
- `Pointer` / `draw(page, strokes, pointer)`: those strokes as pointer input (mouse, touch or
  pen) on the pad, through the browser's input pipeline (CDP Input.dispatch*), so the page
  sees real pointerdown / pointermove / pointerup events.
- `answer(page, revision)`: wait for the page's answer about that revision of the picture.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from common import contract

CHROMIUM = Path(os.environ.get("MNIST_TEST_CHROMIUM", "/usr/bin/chromium"))
# Debian's Chromium on a machine without a display, a GPU or a way out: no background
# connections (they would be refused, many at a time), no first-run or sync machinery, no
# QUIC. Playwright itself adds --headless and, since Chromium runs as root here, --no-sandbox
# (its chromium_sandbox default is False).
CHROMIUM_ARGS = (
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)
# The output that carries the 28x28 picture the model saw (tests/test_demo.py checks the
# page's own name against the contract's).
OUTPUT_MNIST_IMAGE = contract.OUTPUT_MNIST_IMAGE
# The longest a page action may take on a loaded 2-core machine (not a speed target).
ACTION_TIMEOUT_MS = 60_000

Point = tuple[float, float]
Stroke = list[Point]


def chromium_or_skip_reason() -> str | None:
    """None when the browser tests can run, else the reason they cannot."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        return f"Playwright's Python package is not installed ({err}); run make setup"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        how = "sudo .ci/install-browser (make setup-browser)" if shutil.which("apt-get") else \
            "install Chromium and set MNIST_TEST_CHROMIUM to its binary"
        return f"no Chromium at {CHROMIUM}: {how}"
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS),
                                      timeout=ACTION_TIMEOUT_MS)


# --------------------------------------------------------------------------------------------
# Digits as strokes
# --------------------------------------------------------------------------------------------

def arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float) -> Stroke:
    """Points along an elliptical arc, angles in degrees (0 = right, 90 = down), either way."""
    n = max(2, int(abs(end_deg - start_deg) / 6))
    return [(cx + rx * math.cos(math.radians(start_deg + (end_deg - start_deg) * i / n)),
             cy + ry * math.sin(math.radians(start_deg + (end_deg - start_deg) * i / n)))
            for i in range(n + 1)]


def _figure_eight() -> Stroke:
    points = []
    for i in range(73):
        t = 2 * math.pi * i / 72
        y = 0.5 - 0.33 * math.cos(t)
        x = 0.5 + 0.16 * math.sin(2 * t) * (1.2 if y > 0.5 else 1.0)  # a rounder lower loop
        points.append((x, y))
    return points


# The digit fills about the middle 70% of the pad's height, as MNIST's 20x20 box fills its
# 28x28 picture: where and how big a person would draw on an empty square.
DIGIT_STROKES: dict[int, list[Stroke]] = {
    0: [arc(0.5, 0.5, 0.19, 0.32, -100, 270)],
    1: [[(0.47, 0.26), (0.55, 0.16), (0.53, 0.5), (0.52, 0.84)]],
    2: [arc(0.5, 0.34, 0.19, 0.17, 200, 380) + [(0.31, 0.83), (0.72, 0.82)]],
    3: [arc(0.48, 0.32, 0.17, 0.15, 205, 450) + arc(0.48, 0.65, 0.2, 0.18, -90, 155)],
    4: [[(0.56, 0.16), (0.29, 0.6), (0.76, 0.6)], [(0.62, 0.36), (0.62, 0.85)]],
    5: [[(0.37, 0.18), (0.34, 0.47)] + arc(0.5, 0.64, 0.2, 0.19, -125, 150), [(0.37, 0.18), (0.7, 0.17)]],
    6: [[(0.63, 0.16), (0.47, 0.28), (0.36, 0.44)] + arc(0.5, 0.65, 0.18, 0.18, 180, -180)],
    7: [[(0.28, 0.19), (0.72, 0.19), (0.44, 0.84)]],
    8: [_figure_eight()],
    9: [arc(0.48, 0.35, 0.17, 0.16, 0, -360) + [(0.65, 0.35), (0.6, 0.84)]],
}


def resample(stroke: Sequence[Point], step_px: float, size_px: float) -> list[Point]:
    """Points every `step_px` along the polyline (in px of a `size_px` pad): what a pointer
    reports while it moves at a steady hand's speed."""
    points = [(x * size_px, y * size_px) for x, y in stroke]
    out = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step_px))
        out.extend((x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1))
    return out


# --------------------------------------------------------------------------------------------
# Pointer input
# --------------------------------------------------------------------------------------------

class Pointer:
    """One pointer (mouse, finger or pen) on an element, driven through CDP's Input domain, so
    the page gets the browser's own pointerdown / pointermove / pointerup events.

    Coordinates are in pad units (0-1, y down) of the element's box. A mouse and a pen go
    through Input.dispatchMouseEvent (pointerType "pen" for the pen); a finger through
    Input.dispatchTouchEvent, which needs a context made with has_touch=True.
    """

    def __init__(self, page, kind: str = "mouse", selector: str = "#pad", step_px: float = 8.0):
        if kind not in ("mouse", "touch", "pen"):
            raise ValueError(f"pointer kind must be mouse, touch or pen, got {kind!r}")
        box = page.locator(selector).bounding_box()
        assert box, f"{selector} is not visible"
        self.kind, self.box, self.step_px = kind, box, step_px
        self.size = min(box["width"], box["height"])
        self.cdp = page.context.new_cdp_session(page)
        self.last: tuple[float, float] | None = None

    def _px(self, x: float, y: float) -> tuple[float, float]:
        return self.box["x"] + x * self.size, self.box["y"] + y * self.size

    def _send(self, phase: str, x: float, y: float) -> None:
        if self.kind == "touch":
            kind = {"down": "touchStart", "move": "touchMove", "up": "touchEnd"}[phase]
            points = [] if phase == "up" else [{"x": x, "y": y, "id": 1, "radiusX": 2, "radiusY": 2, "force": 1}]
            self.cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})
            return
        kind = {"down": "mousePressed", "move": "mouseMoved", "up": "mouseReleased"}[phase]
        buttons = 1 if phase in ("down", "move") else 0
        self.cdp.send("Input.dispatchMouseEvent", {
            "type": kind, "x": x, "y": y, "button": "left", "buttons": buttons, "clickCount": 1,
            "pointerType": self.kind, "force": 0.5 if buttons else 0})

    def down(self, point: Point) -> None:
        x, y = self._px(*point)
        if self.kind != "touch":  # hover to the start, unpressed, as a hand does
            self.cdp.send("Input.dispatchMouseEvent",
                          {"type": "mouseMoved", "x": x, "y": y, "pointerType": self.kind})
        self._send("down", x, y)
        self.last = point

    def move_along(self, path: Sequence[Point]) -> int:
        """Move (pressed) from the last point through `path`, one event every step_px; the
        number of events sent."""
        assert self.last is not None, "down() first"
        points = resample([self.last, *path], self.step_px, self.size)[1:]
        for px, py in points:
            self._send("move", self.box["x"] + px, self.box["y"] + py)
        self.last = path[-1]
        return len(points)

    def up(self) -> None:
        x, y = self._px(*self.last)
        self._send("up", x, y)
        self.last = None

    def close(self) -> None:
        self.cdp.detach()


def draw(page, strokes: Sequence[Stroke], pointer: str = "mouse", selector: str = "#pad",
         step_px: float = 8.0) -> None:
    """Draw `strokes` on the element as a person would: for each, press, move along the
    path (an event every `step_px`, as a steady hand's pointer reports), release."""
    hand = Pointer(page, pointer, selector, step_px)
    try:
        for stroke in strokes:
            hand.down(stroke[0])
            hand.move_along(stroke[1:] or stroke[:1])
            hand.up()
    finally:
        hand.close()


def revision(page) -> int:
    """The page's current picture revision (#dropzone[data-revision])."""
    return int(page.locator("#dropzone").get_attribute("data-revision") or "0")


def answer(page, rev: int | None = None, timeout_ms: int = ACTION_TIMEOUT_MS) -> dict:
    """Wait until the page shows its answer (or error) about revision `rev` (default: the
    current one) with no request for it pending; returns what it shows."""
    rev = revision(page) if rev is None else rev
    page.wait_for_function(
        """rev => { const r = document.getElementById('result');
                    return r.dataset.revision === String(rev) &&
                           (r.dataset.state === 'done' || r.dataset.state === 'error'); }""",
        arg=rev, timeout=timeout_ms)
    return shown(page)


def shown(page) -> dict:
    """What the page shows now: state, digit, the message, the bars, the model line."""
    return page.evaluate("""() => {
        const r = document.getElementById('result');
        const m = document.getElementById('message');
        return {
            state: r.dataset.state,
            revision: Number(r.dataset.revision),
            digit: document.getElementById('digit').textContent.trim(),
            confidence: document.getElementById('confidence').textContent.trim(),
            timing: document.getElementById('timing').textContent.trim(),
            message: m.hidden ? null : m.innerText.trim(),
            message_title: m.hidden ? null : m.querySelector('strong').textContent,
            message_detail: m.hidden ? null : m.querySelector('.message-detail').textContent,
            message_kind: m.hidden ? null : m.dataset.kind,
            bars: [...document.querySelectorAll('#bars li')].map(li => li.innerText.replace(/\\s+/g, ' ').trim()),
            model_line: document.getElementById('model-line').textContent.trim(),
            seen: !document.getElementById('seen').hidden,
        };
    }""")
