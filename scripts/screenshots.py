"""Screenshots of the upload page for the README: idle, mid-upload (paused) and finished, at
1280 px and 375 px wide, in ``docs/screenshots/``.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--handoff whisperx|folder]

It starts, on 127.0.0.1 only, the WhisperX test double (``tests/whisperx_double.py``, the fork's
variant, which reports every stage) and a real ``chunkd serve --handoff whisperx`` in a temporary
folder, then drives Debian's chromium (headless, through Playwright) over the page: a long
recording is paused halfway for the "uploading" picture; it finishes with its transcript, next to
a disguised executable the server refused. Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from playwright.async_api import Page, Route, async_playwright

ROOT = Path(__file__).resolve().parent.parent
MEDIA = ROOT / "tests" / "media"
sys.path.insert(0, str(ROOT / "tests"))
from whisperx_double import WhisperXDouble  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTHS = (1280, 375)
FINISHED = ".card[data-state=done], .card[data-state=failed], .card[data-state=cancelled]"


async def start_chunkd(data_dir: Path, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chunkd", "serve", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data_dir), "--chunk-size", "64KiB", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CHUNKD_MIN_CHUNK_SIZE": "1KiB"}, cwd=ROOT)
    assert proc.stdout is not None
    lines = []
    for _ in range(50):
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        if not line:
            raise RuntimeError("chunkd exited: " + "".join(lines))
        lines.append(line)
        if " listening on " in line:
            asyncio.get_running_loop().create_task(_drain(proc.stdout))
            return proc, line.split(" listening on ")[1].strip()
    raise RuntimeError("chunkd did not say where it listens")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def slow_chunks(route: Route) -> None:
    """Hold each chunk a moment so the upload can be paused halfway."""
    await asyncio.sleep(0.08)
    try:
        await route.continue_()
    except Exception:  # the page paused and dropped this request meanwhile
        pass


async def bar_value(page: Page, index: int = 0) -> float:
    return float(await page.locator(".card .bar").nth(index).evaluate("b => b.value"))


async def shoot(browser, url: str, width: int, out: Path, media: dict[str, Path]) -> None:
    context = await browser.new_context(viewport={"width": width, "height": 900},
                                        device_scale_factor=1, color_scheme="light")
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the browser logs each 4xx it fetched (the refused file's 415): only real faults count
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text else None)
    await page.goto(url)
    await page.locator("body[data-ready=true]").wait_for()
    await page.select_option("#language", "en")
    await page.screenshot(path=out / f"idle-{width}.png", full_page=True)

    await page.route("**/chunk?index=*", slow_chunks)
    await page.set_input_files("#file-input", [media["long"], media["short"]])
    for _ in range(300):
        if await bar_value(page) >= 45:
            break
        await asyncio.sleep(0.02)
    await page.locator(".card").first.locator(".act-pause").click()
    await page.locator(".card[data-state=paused]").wait_for()
    await asyncio.sleep(0.4)  # the chunks in flight settle; the numbers stop moving
    await page.mouse.move(0, 0)
    await page.screenshot(path=out / f"uploading-{width}.png", full_page=True)

    await page.unroute("**/chunk?index=*")
    await page.locator(".card").first.locator(".act-resume").click()
    await page.set_input_files("#file-input", [media["disguised"]])
    cards = page.locator(".card")
    for _ in range(600):
        if await page.locator(FINISHED).count() == await cards.count():
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("the uploads did not finish")
    await page.locator(".card").first.locator(".act-remove").focus()
    await page.evaluate("document.activeElement.blur()")
    await page.screenshot(path=out / f"done-{width}.png", full_page=True)
    overflow = await page.evaluate("document.documentElement.scrollWidth")
    await context.close()
    if errors:
        raise RuntimeError(f"the page logged errors at {width} px: {errors}")
    if overflow > width:
        raise RuntimeError(f"the page is {overflow} px wide at {width} px")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--handoff", choices=["whisperx", "folder"], default="whisperx")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="chunkd-shots-") as tmp:
        tmpdir = Path(tmp)
        long = tmpdir / "interview-2026-11-24.wav"  # a real recording padded with silence
        long.write_bytes((MEDIA / "speech.wav").read_bytes().ljust(3 * 1024 * 1024, b"\0"))
        short = tmpdir / "voicemail.mp3"
        short.write_bytes((MEDIA / "speech.mp3").read_bytes())
        disguised = tmpdir / "holiday-video.wav"
        disguised.write_bytes((MEDIA / "elf-renamed.wav").read_bytes())
        media = {"long": long, "short": short, "disguised": disguised}

        runner = None
        extra: list[str] = []
        if args.handoff == "whisperx":
            double = WhisperXDouble(variant="fork", token="t0k3n", step_seconds=0.05)
            runner = web.AppRunner(double.app())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            extra = ["--handoff", "whisperx", "--whisperx-url", f"http://127.0.0.1:{port}",
                     "--whisperx-token", "t0k3n", "--whisperx-poll-interval", "0.05"]
        proc, url = await start_chunkd(tmpdir / "data", *extra)
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium, args=FLAGS)
                try:
                    for width in WIDTHS:
                        await shoot(browser, url + "/", width, args.out, media)
                finally:
                    await browser.close()
        finally:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            if runner is not None:
                await runner.cleanup()
    for width in WIDTHS:
        for name in ("idle", "uploading", "done"):
            print(args.out / f"{name}-{width}.png")


if __name__ == "__main__":
    asyncio.run(main())
