"""The upload page at ``/`` in a real browser: Debian's chromium (headless), driven by Playwright,
against a real ``chunkd serve`` subprocess on 127.0.0.1 (and the WhisperX double for the stages).

Every test opens a fresh browser context (its own storage), picks real recordings from
tests/media with the page's file input, and checks what the server ended up with, not only what
the page says. The page's own CSP stays on (no ``bypass_csp``): a violation fails the test.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest

from conftest import MEDIA, REQUIRE_BROWSER, sha256
from whisperx_double import WhisperXDouble

try:
    from playwright.async_api import Page, Route, async_playwright, expect
except ImportError:  # the test extras are not installed
    async_playwright = None

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHUNK = 64 * 1024
SPEECH = (MEDIA / "speech.wav").read_bytes()
#: a real recording padded with silence: 33 chunks of 64 KiB
LONG = SPEECH.ljust(2 * 1024 * 1024 + 12_345, b"\0")
SECRET = "page-test-secret-0123456789abcdef-0123456789abcdef"
WAIT = 20_000  # ms: the longest any one step may take

#: Records, in the page, what a user would have seen change: every sentence the aria-live region
#: was given, every stage that became active, every card message.
RECORDER = """() => {
  const rec = window.__rec = { announced: [], stages: [], messages: [] };
  const add = (list, v) => { if (v && list[list.length - 1] !== v) list.push(v); };
  new MutationObserver((changes) => {
    for (const change of changes) for (const node of change.addedNodes) {
      rec.announced.push(node.textContent.trim());
    }
  }).observe(document.querySelector('#announcer'), { childList: true });
  const look = () => {
    for (const el of document.querySelectorAll('.stage[data-state=active]')) {
      if (!rec.stages.includes(el.dataset.stage)) rec.stages.push(el.dataset.stage);
    }
    for (const el of document.querySelectorAll('.card .message')) add(rec.messages, el.textContent.trim());
  };
  new MutationObserver(look).observe(document.body,
    { subtree: true, childList: true, characterData: true, attributes: true });
}"""




def need(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (CHUNKD_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


@pytest.fixture
async def browser():
    if async_playwright is None:
        need("playwright is not installed (pip install -e '.[test]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        need("chromium is not installed (make test installs it when run as root)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=path, args=FLAGS)
        try:
            yield b
        finally:
            await b.close()


class Tab:
    """One page in a fresh context, with what it logged and the chunkd requests it made."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[tuple[str, str]] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        # the browser logs every 4xx it fetched ("Failed to load resource"): the tests expect some
        page.on("console", lambda m: self.errors.append(m.text)
                if m.type == "error" and "Failed to load resource" not in m.text else None)
        page.on("request", lambda r: self.requests.append((r.method, r.url)))

    def card(self, name: str):
        return self.page.locator(f'.card[data-file="{name}"]')

    def posts(self, fragment: str) -> list[str]:
        return [url for method, url in self.requests if method == "POST" and fragment in url]

    async def record(self) -> dict:
        return await self.page.evaluate("() => window.__rec")

    async def bar(self, name: str) -> float:
        return float(await self.card(name).locator(".bar").evaluate("b => b.value"))

    async def wait_bar(self, name: str, at_least: float) -> None:
        for _ in range(400):
            if await self.bar(name) >= at_least:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{name}'s bar never reached {at_least}")


@pytest.fixture
async def open_page(browser):
    contexts = []

    async def open_(url: str, width: int = 1280) -> Tab:
        context = await browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        tab = Tab(await context.new_page())
        await tab.page.goto(url + "/")
        await tab.page.locator("body[data-ready=true]").wait_for(timeout=WAIT)
        await tab.page.evaluate(RECORDER)
        return tab

    yield open_
    for context in contexts:
        await context.close()


async def serve(server_factory, *args: str):
    """``chunkd serve`` in a thread, so the event loop (and a double on it) keeps running."""
    return await asyncio.to_thread(server_factory, "--chunk-size", "64KiB", *args)


def media(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "files" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


async def status(srv, sid: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(
            f"{srv.url}/upload/chunked/{sid}/status", headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def slow_chunks(route: Route) -> None:
    """Hold each chunk a moment, so an upload of a few MB lasts long enough to pause."""
    await asyncio.sleep(0.1)
    try:
        await route.continue_()
    except Exception:  # the page dropped the request meanwhile (pause, cancel)
        pass


def saved_file(srv, location: str) -> Path:
    path = (srv.data_dir / location).resolve()
    assert path.is_relative_to((srv.data_dir / "completed").resolve())
    return path


async def test_a_recording_uploaded_through_the_page_is_saved_byte_for_byte(
        server_factory, open_page, tmp_path):
    srv = await serve(server_factory)  # folder hand-off: what `make run` gives a newcomer
    tab = await open_page(srv.url)
    page = tab.page
    assert await page.locator("#token-field").is_hidden()  # auth is off
    assert ".wav" in (await page.locator("#file-input").get_attribute("accept")).split(",")
    live = page.locator("#announcer")
    assert await live.get_attribute("aria-live") == "polite"
    assert await live.get_attribute("aria-atomic") == "false"  # each sentence is read by itself
    await page.select_option("#language", "de")
    await page.select_option("#model", "small")

    await page.set_input_files("#file-input", str(media(tmp_path, "talk.wav", LONG)))
    card = tab.card("talk.wav")
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    await expect(card.locator(".badge")).to_have_text("Saved")
    await expect(card.locator(".message")).to_have_text("Saved on the server.")
    assert await card.locator(".stage").evaluate_all(
        "els => els.map(e => [e.dataset.stage, e.dataset.state])") == [
        ["upload", "done"], ["saved", "done"]]
    bar = card.get_by_role("progressbar", name="Upload of talk.wav")
    assert await bar.evaluate("b => b.value") == 100

    location = await card.get_attribute("data-location")
    await expect(card.locator("code.location")).to_have_text(location)
    assert sha256(saved_file(srv, location).read_bytes()) == sha256(LONG)
    record = orjson.loads((saved_file(srv, location).parent / "session.json").read_bytes())
    assert (record["language"], record["model"], record["filename"]) == ("de", "small", "talk.wav")
    code, st = await status(srv, await card.get_attribute("data-session-id"))
    assert code == 200 and st["status"] == "completed"
    # the server's chunk size (from /limits): every one of the 33 chunks, each sent once
    chunks = tab.posts("/chunk?index=")
    assert len(chunks) == math.ceil(len(LONG) / CHUNK) == 33
    # each status change was announced, politely, once, in order
    assert (await tab.record())["announced"] == [
        "talk.wav added to the queue.", "Uploading talk.wav.",
        "talk.wav uploaded, saving on the server.", f"talk.wav saved. Location: {location}."]
    await expect(live).to_contain_text(f"talk.wav saved. Location: {location}.")
    assert not tab.errors


async def test_the_whisperx_hand_off_shows_every_stage_and_the_transcript(
        server_factory, open_page, double_url, tmp_path):
    # the fork's variant reports queued, transcribing, aligning, diarizing, complete
    double = WhisperXDouble(variant="fork", token="t0k3n", step_seconds=0.25)
    url = await double_url(double)
    srv = await serve(server_factory, "--handoff", "whisperx", "--whisperx-url", url,
                      "--whisperx-token", "t0k3n", "--whisperx-poll-interval", "0.05")
    tab = await open_page(srv.url)
    page = tab.page
    await page.select_option("#language", "en")
    await page.select_option("#model", "large-v3")
    await page.set_input_files("#file-input", str(media(tmp_path, "speech.wav", SPEECH)))
    card = tab.card("speech.wav")
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    await expect(card.locator(".badge")).to_have_text("Transcribed")
    transcript = card.locator(".transcript")
    await expect(transcript).to_contain_text("The quick brown fox jumps over the lazy dog.")
    await expect(transcript).to_contain_text(
        "Chunked uploads carry large recordings past the proxy limit.")
    states = await card.locator(".stage").evaluate_all(
        "els => els.map(e => [e.dataset.stage, e.dataset.state])")
    assert states == [[s, "done"] for s in
                      ("upload", "queued", "transcribing", "aligning", "diarizing", "complete")]
    record = await tab.record()
    assert record["stages"] == ["upload", "queued", "transcribing", "aligning", "diarizing"]
    assert "speech.wav: transcribing." in record["announced"]
    assert record["announced"][-1] == "speech.wav: transcript ready."

    assert len(double.submissions) == 1
    sub = double.submissions[0]
    assert sub["sha256"] == sha256(SPEECH) and sub["filename"] == "speech.wav"
    assert (sub["params"]["language"], sub["params"]["model"]) == ("en", "large-v3")
    await expect(card.locator(".result-ref").last).to_contain_text(sub["identifier"])
    assert not tab.errors


async def test_refused_files_are_explained_before_or_after_the_upload(
        server_factory, open_page, tmp_path):
    # 1 MiB reserved at most, over all sessions: a 2 MiB file is a full disk (507)
    srv = await serve(server_factory, "--max-file-size", "3MiB", "--max-reserved-bytes", "1MiB")
    tab = await open_page(srv.url)
    files = [media(tmp_path, "holiday.wav", (MEDIA / "elf-renamed.wav").read_bytes()),
             media(tmp_path, "photo.png", (MEDIA / "not-audio.png").read_bytes()),
             media(tmp_path, "huge.wav", LONG.ljust(3 * 1024 * 1024 + 1, b"\0")),
             media(tmp_path, "talk.wav", LONG)]
    await tab.page.set_input_files("#file-input", [str(f) for f in files])

    # the disguised executable is uploaded, then refused by libmagic with the type it found
    elf = tab.card("holiday.wav")
    await expect(elf).to_have_attribute("data-state", "failed", timeout=WAIT)
    message = elf.locator(".message")
    await expect(message).to_contain_text("not audio or video")
    await expect(message).to_contain_text("application/x-executable")
    assert await elf.locator(".act-retry").is_hidden()  # the same bytes would fail again
    elf_sid = await elf.get_attribute("data-session-id")
    code, st = await status(srv, elf_sid)
    assert code == 200 and st["status"] == "failed"
    assert st["error"]["code"] == "unsupported_content"
    # the others are refused before a byte is sent: the wrong extension, and over max_file_size
    await expect(tab.card("photo.png").locator(".message")).to_contain_text(
        "“.png” files are not accepted here")
    await expect(tab.card("huge.wav").locator(".message")).to_have_text(
        "Too large: this file is 3 MiB and the server takes at most 3 MiB per file. "
        "Nothing was sent.")
    # the full disk: the server refuses the session; worth trying again later
    talk = tab.card("talk.wav")
    await expect(talk).to_have_attribute("data-state", "failed", timeout=WAIT)
    await expect(talk.locator(".message")).to_contain_text("The server's disk is full")
    await expect(talk.get_by_role("button", name="Try talk.wav again")).to_be_visible()
    assert len(tab.posts("/upload/chunked/session")) == 2  # holiday.wav's and talk.wav's
    assert tab.posts("/chunk?index=") == [f"{srv.url}/upload/chunked/{elf_sid}/chunk?index=0"]
    announced = (await tab.record())["announced"]
    assert any("holiday.wav failed." in a and "application/x-executable" in a for a in announced)
    assert not tab.errors


async def test_pause_freezes_the_upload_and_resume_finishes_it(server_factory, open_page,
                                                                tmp_path):
    srv = await serve(server_factory)
    tab = await open_page(srv.url)
    page = tab.page
    await page.route("**/chunk?index=*", slow_chunks)
    await page.set_input_files("#file-input", str(media(tmp_path, "long.wav", LONG)))
    card = tab.card("long.wav")
    await tab.wait_bar("long.wav", 15)
    await card.get_by_role("button", name="Pause long.wav").click()
    await expect(card).to_have_attribute("data-state", "paused")
    await expect(card.locator(".rate")).to_have_text("Paused")
    sid = await card.get_attribute("data-session-id")
    await asyncio.sleep(0.4)  # the chunks in flight were dropped; let the server settle
    _, before = await status(srv, sid)
    shown = await tab.bar("long.wav")
    await asyncio.sleep(1.0)
    _, after = await status(srv, sid)
    assert before["received_chunks"] == after["received_chunks"] < before["total_chunks"]
    assert await tab.bar("long.wav") == shown < 100
    assert after["status"] == "uploading"
    # the focus moved from Pause to Resume: the keyboard goes on where it was
    resume = card.get_by_role("button", name="Resume long.wav")
    await expect(resume).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    location = await card.get_attribute("data-location")
    assert sha256(saved_file(srv, location).read_bytes()) == sha256(LONG)
    announced = (await tab.record())["announced"]
    assert "long.wav paused." in announced and "long.wav resumed." in announced
    assert not tab.errors


async def test_a_reload_mid_upload_resumes_instead_of_starting_over(server_factory, open_page,
                                                                  tmp_path):
    srv = await serve(server_factory)
    tab = await open_page(srv.url)
    page = tab.page
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # "leave while uploading?"
    path = str(media(tmp_path, "long.wav", LONG))
    await page.route("**/chunk?index=*", slow_chunks)
    await page.set_input_files("#file-input", path)
    await tab.wait_bar("long.wav", 30)
    sid = await tab.card("long.wav").get_attribute("data-session-id")
    await page.reload()
    await page.locator("body[data-ready=true]").wait_for()
    await page.evaluate(RECORDER)
    _, before = await status(srv, sid)
    assert 0 < before["received_chunks"] < 33
    tab.requests.clear()
    await page.set_input_files("#file-input", path)  # the same file, picked again
    card = tab.card("long.wav")
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    assert await card.get_attribute("data-session-id") == sid  # the same session
    await expect(card.locator(".message")).to_have_text("Saved on the server.")
    sent = len(tab.posts("/chunk?index="))
    # fewer chunk POSTs than chunks: the missing ones (and at most the 3 that were in flight)
    assert sent < 33 and sent <= 33 - before["received_chunks"] + 3
    assert not tab.posts("/upload/chunked/session")
    messages = (await tab.record())["messages"]
    assert any(m.startswith("Picked up where it stopped: ") for m in messages), messages
    location = await card.get_attribute("data-location")
    assert sha256(saved_file(srv, location).read_bytes()) == sha256(LONG)
    assert not tab.errors


async def test_cancel_removes_the_session_from_the_server(server_factory, open_page, tmp_path):
    srv = await serve(server_factory)
    tab = await open_page(srv.url)
    page = tab.page
    await page.route("**/chunk?index=*", slow_chunks)
    await page.set_input_files("#file-input", [str(media(tmp_path, "first.wav", LONG)),
                                               str(media(tmp_path, "second.wav", LONG[:-1]))])
    first, second = tab.card("first.wav"), tab.card("second.wav")
    await tab.wait_bar("first.wav", 10)
    # one file at a time: the second waits; cancelling it costs the server nothing
    await expect(second).to_have_attribute("data-state", "waiting")
    await second.get_by_role("button", name="Cancel second.wav").click()
    await expect(second).to_have_attribute("data-state", "cancelled")
    await first.get_by_role("button", name="Cancel first.wav").click()
    await expect(first).to_have_attribute("data-state", "cancelled", timeout=WAIT)
    await expect(first.locator(".message")).to_have_text(
        "Cancelled. The server removed what it had of this file.")
    sid = await first.get_attribute("data-session-id")
    code, body = await status(srv, sid)
    assert code == 410 and body["error"]["code"] == "session_aborted"
    assert len(tab.posts("/upload/chunked/session")) == 1  # second.wav never started
    assert not list((srv.data_dir / "completed").glob("*/*.wav"))
    # the browser no longer remembers the session for a resume
    assert await page.evaluate(
        "() => Object.keys(localStorage).filter(k => k.startsWith('chunkd:'))") == []
    assert "first.wav cancelled." in (await tab.record())["announced"]
    assert not tab.errors


async def test_a_dropped_connection_is_retried_and_said_so(server_factory, open_page, tmp_path):
    srv = await serve(server_factory)
    tab = await open_page(srv.url)
    dropped: list[str] = []

    async def flaky(route: Route) -> None:
        if route.request.url.endswith("index=2") and len(dropped) < 2:
            dropped.append(route.request.url)
            await route.abort("connectionreset")
        else:
            await route.continue_()

    await tab.page.route("**/chunk?index=*", flaky)
    await tab.page.set_input_files("#file-input", str(media(tmp_path, "talk.wav", LONG)))
    card = tab.card("talk.wav")
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    assert len(dropped) == 2
    messages = (await tab.record())["messages"]
    assert any(m.startswith("The connection to the server was lost: retrying") for m in messages)
    location = await card.get_attribute("data-location")
    assert sha256(saved_file(srv, location).read_bytes()) == sha256(LONG)
    assert not tab.errors


async def test_with_auth_on_the_token_is_used_and_a_wrong_one_is_explained(
        server_factory, open_page, tmp_path):
    secret = tmp_path / "jwt-secret"
    secret.write_text(SECRET)
    srv = await serve(server_factory, "--jwt-secret-file", str(secret))
    good = jwt.encode({"sub": "ann", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    tab = await open_page(srv.url)
    page = tab.page
    token = page.get_by_label("Access token")
    await expect(token).to_be_visible()

    await token.fill("not-a-valid-token")
    await page.set_input_files("#file-input", str(media(tmp_path, "speech.wav", SPEECH)))
    card = tab.card("speech.wav")
    await expect(card).to_have_attribute("data-state", "failed", timeout=WAIT)
    await expect(card.locator(".message")).to_have_text(
        "The server did not accept the access token. Check that you pasted the whole token, "
        "then try again.")

    await token.fill(good)
    await card.get_by_role("button", name="Try speech.wav again").click()
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    location = await card.get_attribute("data-location")
    assert sha256(saved_file(srv, location).read_bytes()) == sha256(SPEECH)
    code, _ = await status(srv, await card.get_attribute("data-session-id"), good)
    assert code == 200
    # kept for this tab only: a reload has it, and localStorage does not
    assert await page.evaluate("() => sessionStorage.getItem('chunkd.page.token')") == good
    await page.reload()
    await page.locator("body[data-ready=true]").wait_for()
    await expect(token).to_have_value(good)
    assert good not in await page.evaluate("() => JSON.stringify(localStorage)")
    # no token at all: said before anything is sent
    await token.fill("")
    sessions = len(tab.posts("/upload/chunked/session"))
    await page.set_input_files("#file-input", str(media(tmp_path, "again.wav", SPEECH)))
    await expect(tab.card("again.wav").locator(".message")).to_contain_text(
        "This server needs an access token.")
    assert len(tab.posts("/upload/chunked/session")) == sessions
    assert not tab.errors


async def test_keyboard_and_a_phone_screen(server_factory, open_page, tmp_path):
    srv = await serve(server_factory)
    tab = await open_page(srv.url, width=375)
    page = tab.page
    # listen from the start: Playwright intercepts file choosers once a listener exists
    choosers: asyncio.Queue = asyncio.Queue()
    page.on("filechooser", choosers.put_nowait)
    assert await page.evaluate("() => document.documentElement.scrollWidth") <= 375
    # Tab reaches the drop zone (after the skip link and the options), with a visible focus ring
    for _ in range(8):
        await page.keyboard.press("Tab")
        if await page.evaluate("() => document.activeElement.id") == "picker":
            break
    picker = page.get_by_role("button", name="Drop recordings here or choose files")
    await expect(picker).to_be_focused()
    outline = await picker.evaluate("b => getComputedStyle(b).outlineStyle")
    assert outline not in ("", "none")
    # Enter and Space open the file picker (each time after the last choice arrived)
    for key, name in (("Enter", "memo.wav"), (" ", "note.wav")):
        await picker.focus()
        await page.keyboard.press(key)
        picked = await asyncio.wait_for(choosers.get(), 10)
        assert picked.is_multiple()
        await picked.set_files(str(media(tmp_path, name, LONG[: -len(name)])))
        await expect(tab.card(name)).to_have_count(1)
    card = tab.card("memo.wav")
    await expect(card).to_have_attribute("data-state", "done", timeout=WAIT)
    await expect(tab.card("note.wav")).to_have_attribute("data-state", "done", timeout=WAIT)
    assert await page.evaluate("() => document.documentElement.scrollWidth") <= 375
    box = await card.get_by_role("button", name="Remove memo.wav from the list").bounding_box()
    assert box is not None and box["height"] >= 40 and box["x"] + box["width"] <= 375
    assert not tab.errors
