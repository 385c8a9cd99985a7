"""Benchmark of ``usb web`` (not part of the test suite): start-up, and one edit's round trip against the engine.

    .venv/bin/python Testing/benchmarks/bench_web.py [--runs 2] [--screenshot Resources/usb_web_heal.png]

Measures, on the bundled sample with the shipped model on the CPU:
- ``usb web`` start -> HTTP 200, and -> the page showing its first streamed view (target: page answering <= 15 s);
- ``usb heal`` (the engine end to end: process start, model, edit, output file) with the page's settings;
- the page's round trip: Load sample, Apply, until the status line reads Done (target: <= the engine's + 2 s).
With ``--screenshot`` it saves the page after the heal (the README's picture).
Needs Debian's Chromium (``apt-get install -y chromium``) and the [web] and [test] extras.
"""
from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from USBLib.resources import sample_files

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_seconds(out: Path) -> float:
    """Wall time of ``usb heal`` on the sample with the page's settings (local stage, realism)."""
    files = sample_files()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "USBLib.apps.cli", "heal", str(files["image"]), "--mask",
                    str(files["lesion"]), "-o", str(out / "healed.nii.gz"), "--local-mode", "realism", "--device", "cpu",
                    "--quiet"], check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        engine = [engine_seconds(Path(tmp)) for _ in range(args.runs)]

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "USBLib.apps.cli", "web", "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        http_s = time.perf_counter() - started
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_function("Array.from(document.querySelectorAll('img.image-display-area'))"
                                   ".some(i => i.getBoundingClientRect().width > 200 && i.naturalWidth > 0)")
            view_s = time.perf_counter() - started
            trips, reported = [], []
            for _ in range(args.runs):
                page.click("#usb-load-sample")
                page.wait_for_function("/^Sample loaded/.test(document.querySelector('#usb-status').textContent)")
                t0 = time.perf_counter()
                page.click("#usb-apply")
                page.wait_for_function("/^(Done|Failed)/.test(document.querySelector('#usb-status').textContent.trim())")
                trips.append(time.perf_counter() - t0)
                status = page.inner_text("#usb-status")
                reported.append(float(re.search(r"engine ([\d.]+) s", status).group(1)))
            if args.screenshot:
                page.wait_for_selector("#usb-download:not([disabled])")
                page.evaluate("document.querySelector('#usb-download').scrollIntoView({block: 'end'})")
                time.sleep(2)  # let the last frames of the views arrive
                page.screenshot(path=str(args.screenshot))
            browser.close()
    finally:
        server.terminate()
        server.wait(30)

    e, t = statistics.median(engine), statistics.median(trips)
    print(f"usb web -> HTTP 200           {http_s:6.1f} s")
    print(f"usb web -> first view shown   {view_s:6.1f} s   (target <= 15 s)")
    print(f"usb heal (engine, end to end) {e:6.1f} s   runs: {', '.join(f'{v:.1f}' for v in engine)}")
    print(f"page: Apply -> Done           {t:6.1f} s   runs: {', '.join(f'{v:.1f}' for v in trips)}")
    print(f"  model stages (status line)  {statistics.median(reported):6.1f} s")
    print(f"page overhead over the engine {t - e:+6.1f} s   (target <= +2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
