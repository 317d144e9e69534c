"""The demo page (serving/web/) in a real headless Chromium, against `make demo` itself.

One `make demo` per module (DEMO_BACKEND=local: the local server with CORS on, on free ports,
over the session's fixture model; the page on a free port), stopped at the end as a terminal's
Ctrl-C stops it (SIGINT to make's process group) and checked to leave nothing running. Each test
gets a fresh browser context that records every request and console message: a test fails if
the page requests any host but its own and the configured server, or logs an error.

Digits are drawn as pointer strokes along hand-designed paths (tests/web_driver.py) with a
mouse, a finger and a pen; pictures are uploaded, photographed (the capture input), dropped and
pasted as files. Where the page shows an error from TF Serving, the test asks the server itself
the same question and checks that the page shows the server's own message.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common import contract
from serving.process import free_port
from tests import web_driver
from tests.serving_fixtures import REPO

SKIP_REASON = web_driver.chromium_or_skip_reason()
if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.slow

PICTURES = REPO / "tests" / "data" / "pictures"
# Two of the pictures users tried (copied from /work/shared/cases/pictures, named
# <kind>-<n>-<digit>.<ext>): a phone photo to upload and photograph, a thin-pen scan to drop
# and paste.
UPLOAD = PICTURES / "photo-19-2.jpg"
DROP = PICTURES / "thinpen-4-7.png"
DESKTOP = {"width": 1100, "height": 850}
PHONE = {"width": 360, "height": 740}
# Drawn digits the page must read right (the bar).
MIN_DRAWN_RIGHT = 9
# The model behind the page is the session's fixture model (`exported`): pen strokes reach it
# through serving_bytes, whose graph puts them into MNIST form (export/picture_graph.py).


def digit_of(picture: Path) -> str:
    return picture.stem.rsplit("-", 1)[1]


# --------------------------------------------------------------------------------------------
# make demo, the browser, one context per test
# --------------------------------------------------------------------------------------------

@dataclass
class Demo:
    url: str  # the page with its settings, as make demo printed it
    server_url: str
    rest_port: int
    proc: subprocess.Popen
    lines: list[str]

    @property
    def page_origin(self) -> str:
        return re.match(r"https?://[^/]+", self.url).group(0)

    def page(self, **params: str) -> str:
        """The page's URL with other settings (server=, model=, ...)."""
        query = "&".join(f"{k}={v}" for k, v in {"server": self.server_url, **params}.items())
        return f"{self.page_origin}/?{query}"


def _reader(stream, lines: list[str], events: "queue.Queue[str]") -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        events.put(line)
    events.put("")  # end of output


@pytest.fixture(scope="module")
def demo(exported, tmp_path_factory):
    state = tmp_path_factory.mktemp("demo-state")
    rest_port, grpc_port = free_port(), free_port()
    while grpc_port == rest_port:
        grpc_port = free_port()
    command = ["make", "--no-print-directory", "demo", "DEMO_BACKEND=local", "DEMO_PORT=0",
               f"REST_PORT={rest_port}", f"GRPC_PORT={grpc_port}", f"MODEL_BASE={exported.serving_base}",
               f"SERVE_STATE={state}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MAKEFLAGS", None)
    env.pop("MFLAGS", None)
    # Its own process group, like a terminal's foreground job: SIGINT to the group is Ctrl-C.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []
    events: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines, events), daemon=True).start()
    url = None
    try:
        while url is None:
            line = events.get(timeout=600)
            if line == "" and proc.poll() is not None:
                pytest.fail("make demo exited before printing the page's URL:\n" + "\n".join(lines[-40:]))
            match = re.match(r"demo: open (\S+)", line)
            url = match.group(1) if match else None
        server_url = f"http://localhost:{rest_port}"
        assert f"server={server_url}" in url, url
        yield Demo(url=url, server_url=server_url, rest_port=rest_port, proc=proc, lines=lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("make demo did not stop within 120 s of Ctrl-C:\n" + "\n".join(lines[-40:]))
    output = "\n".join(lines)
    assert "demo: SIGINT received: stopping" in output, output[-3000:]
    assert "demo: stopped" in output and "serving.server: stopped" in output, output[-3000:]
    assert not (state / "server.pid").exists(), "the local server left its pid file"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/mnist", timeout=5)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = web_driver.launch(playwright)
        yield chromium
        chromium.close()


@dataclass
class Session:
    page: object
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    # Chromium logs every failed HTTP request itself ("Failed to load resource: ..."); tests
    # that make a request fail on purpose allow exactly those lines, nothing the page logs.
    network_errors_expected: bool = False
    extra_origins: tuple[str, ...] = ()

    def page_errors(self) -> list[str]:
        allowed = re.compile(r"^Failed to load resource: (the server responded with a status of \d+|net::ERR_CONNECTION_REFUSED)")
        # The page predicts while a digit is drawn: its first stroke alone (a line, a dot) is
        # refused by serving_bytes ("no digit-like ink", 400) until the digit takes shape, and
        # Chromium logs each refused request. What the page shows is checked by each test.
        refused = re.compile(r"^Failed to load resource: the server responded with a status of 400 \(Bad Request\)$")
        return [m for m in self.console
                if not ((self.network_errors_expected and allowed.match(m)) or refused.match(m))]


@pytest.fixture
def session(browser, demo):
    yield from _session(browser, demo, DESKTOP)


@pytest.fixture
def phone_session(browser, demo):
    yield from _session(browser, demo, PHONE)


def _session(browser, demo: Demo, viewport: dict):
    """A fresh context; afterwards, every request must have gone to the page or the server
    (or to origins the test allowed), and nothing may have been logged as an error."""
    context = browser.new_context(viewport=viewport, has_touch=True)
    context.set_default_timeout(web_driver.ACTION_TIMEOUT_MS)
    page = context.new_page()
    s = Session(page)
    page.on("request", lambda r: s.requests.append(r.url))
    page.on("console", lambda m: m.type in ("error", "warning") and s.console.append(m.text))
    page.on("pageerror", lambda e: s.console.append(f"uncaught: {e}"))
    try:
        yield s
    finally:
        context.close()
    allowed = {demo.page_origin, demo.server_url, *s.extra_origins}
    strangers = [u for u in s.requests if not u.startswith(("blob:", "data:"))
                 and re.match(r"[a-z]+://[^/]+", u).group(0) not in allowed]
    assert not strangers, f"requests to other hosts: {strangers}"
    assert not s.page_errors(), f"console errors: {s.page_errors()}"


def open_page(s: Session, url: str) -> None:
    """Load the page and wait until it has asked the server for the model (or failed to)."""
    s.page.goto(url)
    s.page.wait_for_function(
        "() => document.getElementById('model-line').textContent.includes('version') || "
        "!document.getElementById('message').hidden")


# --------------------------------------------------------------------------------------------
# Asking the server directly, for comparison
# --------------------------------------------------------------------------------------------

def server_predict(demo: Demo, picture: bytes) -> tuple[int, dict]:
    """POST the picture to serving_bytes as the page does; (HTTP status, JSON answer)."""
    body = json.dumps({"signature_name": contract.SIGNATURE_BYTES,
                       "instances": [{contract.INPUT_BYTES: {"b64": base64.b64encode(picture).decode()}}]})
    request = urllib.request.Request(f"{demo.server_url}/v1/models/{contract.MODEL_NAME}:predict",
                                     data=body.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_shows_server_error(shown: dict, status: int, message: str) -> None:
    """The page shows TF Serving's own error: its HTTP status and its message, verbatim."""
    assert shown["state"] == "error" and shown["message_kind"] == "server", shown
    assert shown["message_title"] == f"TF Serving answered HTTP {status}:", shown
    assert shown["message_detail"] == message, shown


def sent_picture(request_body: str) -> bytes:
    """The picture inside a :predict body the page sent."""
    instance = json.loads(request_body)["instances"][0]
    return base64.b64decode(instance[contract.INPUT_BYTES]["b64"])


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

def test_drawn_digits_are_read_by_tf_serving(session, demo):
    """Each digit 0-9 drawn with pointer strokes (mouse, finger, pen in turn): at least 9 right."""
    page = session.page
    open_page(session, demo.url)
    assert re.search(rf"{contract.MODEL_NAME} · version 1 · {contract.SIGNATURE_BYTES}",
                     web_driver.shown(page)["model_line"])
    results = {}
    for digit, strokes in web_driver.DIGIT_STROKES.items():
        if digit:
            page.click("#clear")
            assert web_driver.shown(page)["digit"] == "?"
        pointer = ("mouse", "touch", "pen")[digit % 3]
        web_driver.draw(page, strokes, pointer=pointer)
        shown = web_driver.answer(page)
        assert shown["state"] == "done", shown
        results[digit] = (pointer, shown["digit"], shown["confidence"])
        # The bars: one per class, the top one the shown digit, the percentages summing to 100.
        values = [float(re.search(r"([\d.]+) %$", bar).group(1)) for bar in shown["bars"]]
        assert len(values) == contract.NUM_CLASSES and abs(sum(values) - 100) < 0.5, shown["bars"]
        assert shown["bars"][int(shown["digit"])].startswith(shown["digit"] + " ")
        assert re.fullmatch(r"\d+ ms round trip", shown["timing"]), shown["timing"]
    # serving_bytes returns the 28x28 picture the model saw, and the page shows it.
    with urllib.request.urlopen(f"{demo.server_url}/v1/models/{contract.MODEL_NAME}/metadata", timeout=30) as r:
        signature = json.loads(r.read())["metadata"]["signature_def"]["signature_def"][contract.SIGNATURE_BYTES]
    assert web_driver.OUTPUT_MNIST_IMAGE in signature["outputs"]
    assert web_driver.shown(page)["seen"]
    right = [d for d, (_p, shown_digit, _c) in results.items() if shown_digit == str(d)]
    print("drawn digit -> shown:", results)
    assert len(right) >= MIN_DRAWN_RIGHT, f"{len(right)}/10 right: {results}"
    # Strokes really went through the pad: every prediction request carried a PNG of the pad.
    predicts = [u for u in session.requests if u.endswith(":predict")]
    assert len(predicts) >= 10


def test_predicts_while_drawing_one_request_at_a_time(session, demo):
    """Predictions start while the pointer is still down, and a request waits for the one in
    flight: the page's :predict calls are held at a gate the test opens."""
    page = session.page
    open_page(session, demo.url)
    page.evaluate("""() => {
        const flight = window.__flight = {now: 0, max: 0, total: 0, gates: [], open: false};
        const original = window.fetch;
        window.fetch = async (url, init) => {
            if (!String(url).endsWith(':predict')) return original(url, init);
            flight.now += 1; flight.total += 1; flight.max = Math.max(flight.max, flight.now);
            try {
                if (!flight.open) await new Promise(resolve => flight.gates.push(resolve));
                return await original(url, init);
            } finally { flight.now -= 1; }
        };
        window.__release = (all) => { flight.open = all; flight.gates.splice(0).forEach(r => r()); };
    }""")
    flight = lambda: page.evaluate("window.__flight")  # noqa: E731
    loop = web_driver.arc(0.5, 0.5, 0.3, 0.3, 0, 540)
    thirds = [loop[: len(loop) // 3], loop[len(loop) // 3: 2 * len(loop) // 3], loop[2 * len(loop) // 3:]]
    hand = web_driver.Pointer(page, "mouse")
    try:
        hand.down(thirds[0][0])
        moves = hand.move_along(thirds[0])
        page.wait_for_function("() => window.__flight.total >= 1")  # asked while the pointer is down
        moves += hand.move_along(thirds[1])  # the pad changes while that request is held
        assert (flight()["now"], flight()["total"]) == (1, 1), flight()
        page.evaluate("window.__release(false)")
        page.wait_for_function("() => window.__flight.total >= 2")  # the changes, merged into one ask
        page.evaluate("window.__release(true)")
        moves += hand.move_along(thirds[2])
        hand.up()
    finally:
        hand.close()
    shown = web_driver.answer(page)
    assert shown["state"] == "done", shown
    assert flight()["max"] == 1, flight()
    assert flight()["total"] <= moves / 4, f"{flight()['total']} requests for {moves} pointer moves"


def test_undo_clear_and_keyboard_shortcut(session, demo):
    page = session.page
    open_page(session, demo.url)
    assert page.is_disabled("#undo") and page.is_disabled("#clear")
    web_driver.draw(page, web_driver.DIGIT_STROKES[4], pointer="mouse")  # two strokes
    four = web_driver.answer(page)
    strokes = lambda: page.evaluate("() => document.getElementById('pad').toDataURL()")  # noqa: E731
    with_both = strokes()
    page.keyboard.press("Control+z")  # undo the second stroke
    after_undo = web_driver.answer(page)
    assert strokes() != with_both and after_undo["revision"] > four["revision"]
    page.click("#undo")  # and the first: an empty pad shows no answer and sends nothing
    assert web_driver.shown(page)["digit"] == "?" and web_driver.shown(page)["state"] == "idle"
    assert page.is_disabled("#undo")
    web_driver.draw(page, web_driver.DIGIT_STROKES[7], pointer="pen")
    web_driver.answer(page)
    page.click("#clear")
    shown = web_driver.shown(page)
    assert (shown["digit"], shown["state"], shown["bars"], shown["message"]) == ("?", "idle", [], None)


def test_shows_the_picture_the_model_saw(session, demo):
    """When an answer carries the 28x28 picture the model saw, the page draws it pixel for
    pixel. The server's real answer gets a known picture added on its way to the page."""
    page = session.page
    seen = [[(7 * row + 3 * col) % 256 for col in range(28)] for row in range(28)]

    def add_picture(route):
        answer = route.fetch()
        body = answer.json()
        body["predictions"][0][web_driver.OUTPUT_MNIST_IMAGE] = seen
        route.fulfill(response=answer, json=body)

    page.route("**/*:predict", add_picture)
    open_page(session, demo.url)
    web_driver.draw(page, web_driver.DIGIT_STROKES[8], pointer="mouse")
    assert web_driver.answer(page)["seen"]
    shown = page.evaluate("""() => {
        const c = document.getElementById('seen-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const rows = [];
        for (let y = 0; y < c.height; y++) {
            rows.push([]);
            for (let x = 0; x < c.width; x++) rows[y].push(d[4 * (y * c.width + x)]);
        }
        return rows;
    }""")
    assert shown == seen


# --------------------------------------------------------------------------------------------
# Pictures: upload, photo, drop, paste
# --------------------------------------------------------------------------------------------

def _file_payload(path: Path) -> dict:
    return {"name": path.name, "b64": base64.b64encode(path.read_bytes()).decode(),
            "type": "image/png" if path.suffix == ".png" else "image/jpeg"}


def test_uploaded_and_photographed_pictures_are_sent_as_they_are(session, demo):
    page = session.page
    open_page(session, demo.url)
    expected = digit_of(UPLOAD)
    for input_id in ("#file", "#camera"):
        with page.expect_request(lambda r: r.url.endswith(":predict")) as sent:
            page.set_input_files(input_id, str(UPLOAD))
        shown = web_driver.answer(page)
        assert shown["digit"] == expected, (input_id, shown)
        # Byte for byte the file: no resizing or re-encoding in the browser.
        assert sent_picture(sent.value.post_data) == UPLOAD.read_bytes()
        assert page.is_visible("#picture") and UPLOAD.name in page.inner_text("#picture-name")
    # A phone opens its camera for this input; any picture file is accepted by both.
    assert page.get_attribute("#camera", "capture") == "environment"
    assert page.get_attribute("#camera", "accept") == page.get_attribute("#file", "accept") == "image/*"
    # Drawing on the picture starts a new drawing.
    web_driver.draw(page, web_driver.DIGIT_STROKES[1], pointer="mouse")
    web_driver.answer(page)
    assert page.is_hidden("#picture")


def test_dropped_and_pasted_pictures(session, demo):
    page = session.page
    open_page(session, demo.url)
    payload = _file_payload(DROP)
    make_transfer = """({name, b64, type}) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type}));
        return transfer;
    }"""
    transfer = page.evaluate_handle(make_transfer, payload)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    assert web_driver.answer(page)["digit"] == digit_of(DROP)
    page.click("#clear")
    page.evaluate(f"""payload => {{
        const transfer = ({make_transfer})(payload);
        document.body.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: transfer, bubbles: true}}));
    }}""", payload)
    assert web_driver.answer(page)["digit"] == digit_of(DROP)


# --------------------------------------------------------------------------------------------
# Errors: TF Serving's own messages, and a server that cannot be reached
# --------------------------------------------------------------------------------------------

def test_non_image_file_shows_tf_servings_error(session, demo, tmp_path):
    session.network_errors_expected = True
    page = session.page
    open_page(session, demo.url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    page.set_input_files("#file", str(notes))
    shown = web_driver.answer(page)
    status, answer = server_predict(demo, notes.read_bytes())
    assert status == 400 and set(answer) == {"error"}, (status, answer)
    assert_shows_server_error(shown, status, answer["error"])


def test_blank_canvas_shows_tf_servings_error(session, demo):
    session.network_errors_expected = True
    page = session.page
    open_page(session, demo.url)
    with page.expect_request(lambda r: r.url.endswith(":predict")) as sent:
        page.click("#predict")  # Predict on an empty pad sends the blank picture
    shown = web_driver.answer(page)
    blank = sent_picture(sent.value.post_data)
    status, answer = server_predict(demo, blank)
    # serving_bytes refuses a picture without ink (INVALID_ARGUMENT, export/picture_graph.py).
    assert status == 400, answer
    assert_shows_server_error(shown, status, answer["error"])


def test_unknown_model_shows_tf_servings_error(session, demo):
    session.network_errors_expected = True
    page = session.page
    open_page(session, demo.page(model="nosuchmodel"))
    shown = web_driver.shown(page)
    request = urllib.request.Request(f"{demo.server_url}/v1/models/nosuchmodel")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert_shows_server_error(shown, err.value.code, json.loads(err.value.read())["error"])
    assert "nosuchmodel" in shown["model_line"] and "not available" in shown["model_line"]


def test_stopped_server_shows_how_to_start_it(session, demo):
    session.network_errors_expected = True
    page = session.page
    port = free_port()  # nothing listens there: a TF Serving that is not running
    server = f"http://127.0.0.1:{port}"
    session.extra_origins = (server,)
    open_page(session, f"{demo.page_origin}/?server={server}")
    shown = web_driver.shown(page)
    assert shown["message_kind"] == "unreachable", shown
    assert f"Cannot reach TF Serving at {server}" in shown["message"] and "make serve" in shown["message"]
    # Drawing says it again, for the drawing.
    web_driver.draw(page, web_driver.DIGIT_STROKES[7], pointer="mouse")
    shown = web_driver.answer(page)
    assert shown["state"] == "error" and f"Cannot reach TF Serving at {server}" in shown["message"]


def test_bad_settings_are_named_and_nothing_is_sent(session, demo):
    page = session.page
    for query, problem in [("server=ftp://example.com", "must be an http:// or https:// URL"),
                           ("server=nonsense", "is not a URL"),
                           ("model=a/b", "must be a model name"),
                           ("version=1&label=stable", "not both")]:
        session.requests.clear()
        open_page(session, f"{demo.page_origin}/?{query}")
        shown = web_driver.shown(page)
        assert problem in shown["message"], (query, shown)
        assert all(u.startswith(demo.page_origin) for u in session.requests), session.requests
        assert page.is_disabled("#predict")


def test_version_and_label_settings(session, demo):
    page = session.page
    open_page(session, demo.page(version="1"))
    web_driver.draw(page, web_driver.DIGIT_STROKES[0], pointer="mouse")
    web_driver.answer(page)
    assert any(u.endswith("/versions/1:predict") for u in session.requests)
    open_page(session, demo.page(label="stable"))  # serving/models.config: stable -> 1
    assert "version 1" in web_driver.shown(page)["model_line"]
    assert "label stable" in web_driver.shown(page)["model_line"]
    # A version that is not loaded: TF Serving's own answer to the page's metadata request.
    session.network_errors_expected = True
    open_page(session, demo.page(version="9"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{demo.server_url}/v1/models/{contract.MODEL_NAME}/versions/9/metadata", timeout=30)
    assert_shows_server_error(web_driver.shown(page), err.value.code, json.loads(err.value.read())["error"])


# --------------------------------------------------------------------------------------------
# Small screens and keyboards
# --------------------------------------------------------------------------------------------

def test_usable_on_a_360_px_phone(phone_session, demo):
    page = phone_session.page
    open_page(phone_session, demo.url)
    web_driver.draw(page, web_driver.DIGIT_STROKES[3], pointer="touch")
    assert web_driver.answer(page)["state"] == "done"
    layout = page.evaluate("""() => {
        const box = id => document.getElementById(id).getBoundingClientRect();
        return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
                pad: box('pad'), bars: box('bars'), predict: box('predict'), camera: box('camera')};
    }""")
    assert layout["scroll"] <= layout["inner"] == PHONE["width"], layout  # no sideways scrolling
    for name in ("pad", "bars", "predict"):
        assert 0 <= layout[name]["left"] and layout[name]["right"] <= PHONE["width"], (name, layout)
    assert layout["pad"]["width"] >= 0.8 * PHONE["width"] - 40, layout  # a pad a finger can use
    assert layout["predict"]["height"] >= 40, layout  # a finger-sized button


def test_keyboard_only(session, demo):
    """Every control is reachable with Tab in reading order, has an accessible name, and
    works from the keyboard."""
    page = session.page
    open_page(session, demo.url)
    web_driver.draw(page, web_driver.DIGIT_STROKES[1], pointer="mouse")
    web_driver.answer(page)  # undo and clear are enabled now
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("""() => {
            const e = document.activeElement;
            const name = e.getAttribute('aria-label') || (e.labels && e.labels[0] && e.labels[0].textContent)
                         || e.textContent;
            const style = getComputedStyle(e.labels && e.labels[0] ? e.labels[0] : e);
            return {id: e.id || e.tagName.toLowerCase(), name: name.trim(),
                    outline: e.matches(':focus-visible') && style.outlineStyle !== 'none'};
        }"""))
    assert [o["id"] for o in order] == ["undo", "clear", "predict", "file", "camera", "summary"], order
    assert all(o["name"] for o in order), order
    assert all(o["outline"] for o in order), f"no visible focus: {order}"
    # The browser's accessibility tree names them too.
    for role, name in [("button", "Undo"), ("button", "Clear"), ("button", "Predict"),
                       ("img", "Drawing area: draw one digit with a mouse, a finger or a pen")]:
        assert page.get_by_role(role, name=name).count() == 1, (role, name)
    assert page.get_by_label("Upload a picture").count() == 1
    assert page.get_by_label("Take a photo").count() == 1
    assert page.get_by_role("list", name="Probability of each digit").count() == 1
    assert page.locator("#announce").text_content().startswith("TF Serving reads 1, ")  # for screen readers
    # Enter on Predict asks again; Ctrl+Z undoes.
    rev = web_driver.revision(page)
    page.focus("#predict")
    with page.expect_request(lambda r: r.url.endswith(":predict")):
        page.keyboard.press("Enter")
    web_driver.answer(page, rev)
    page.keyboard.press("Control+z")
    assert web_driver.shown(page)["digit"] == "?"


def test_only_the_page_and_the_server_are_contacted(session, demo):
    """The whole flow (load, draw, upload) touches exactly two origins: the page's and the
    configured server's (the per-test check forbids others; this one shows both are used)."""
    page = session.page
    open_page(session, demo.url)
    web_driver.draw(page, web_driver.DIGIT_STROKES[2], pointer="mouse")
    web_driver.answer(page)
    page.set_input_files("#file", str(UPLOAD))
    web_driver.answer(page)
    origins = {re.match(r"[a-z]+://[^/]+", u).group(0) for u in session.requests if not u.startswith("blob:")}
    assert origins == {demo.page_origin, demo.server_url}, origins
