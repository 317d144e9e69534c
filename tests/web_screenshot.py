"""The README's picture of the demo page: a digit drawn on the page, and TF Serving's answer.

    make demo                                 # in one terminal (a model from make train)
    .venv/bin/python -m tests.web_screenshot --url http://127.0.0.1:8080/ --out docs/images/demo-page.png

Draws `--digit` with mouse strokes (tests/web_driver.py's paths) in Debian's Chromium
(sudo .ci/install-browser), waits for the answer and saves a PNG of the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests import web_driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.web_screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the page's URL as make demo prints it")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--digit", type=int, default=3, choices=range(10), help="digit to draw (default: 3)")
    parser.add_argument("--width", type=int, default=900, help="viewport width in CSS px (default: 900)")
    parser.add_argument("--height", type=int, default=600, help="viewport height in CSS px (default: 600)")
    args = parser.parse_args(argv)
    reason = web_driver.chromium_or_skip_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = web_driver.launch(playwright)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(args.url)
            web_driver.draw(page, web_driver.DIGIT_STROKES[args.digit])
            shown = web_driver.answer(page)
            if shown["state"] != "done":
                print(f"error: the page shows no answer: {shown['message']}", file=sys.stderr)
                return 1
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
        finally:
            browser.close()
    print(f"{args.out}: drew {args.digit}, the page shows {shown['digit']} ({shown['confidence']}, {shown['timing']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
