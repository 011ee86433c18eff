"""Headless Chromium on the operator console, under the app's own strict CSP (not bypassed: a violation fails the
test): a recorded call with a card number read aloud plays with its two-lane waveform and the redacted span
marked in the caller's lane, clicking a turn seeks the player to where the turn is in the recording, the turn
being heard is highlighted, the latency waterfall has a bar per stage, and the dashboard draws its charts.
Screenshots go to test-artifacts/console-review/. Run it in a loopback-only network namespace."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RunningServer, write_wav
from helpers import console_login, console_user
from playwright.async_api import Page, async_playwright
from test_browser import CHROMIUM, chromium_args
from test_console_review import api, card_call, made, persona, script, stamp, viewer  # noqa: F401 (fixtures)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console-review"
STAGES = ("speech_end", "stt_final", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio_sent")
# Watches the page's own CSP reports; added through the browser's devtools protocol, so the CSP does not apply.
# Every script the test runs in the page is a function (called over that protocol): a string expression would be
# evaluated with eval() inside the page, which the CSP forbids.
CSP_WATCH = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));")
LANE_INK = """() => {
  const c = document.getElementById('waveform-canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
  const ink = [0, 0];  // pixels of each lane drawn in its waveform colour (caller green, agent blue)
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    const i = (y * c.width + x) * 4, lane = y < c.height / 2 ? 0 : 1;
    const [r, g, b] = [d.data[i], d.data[i + 1], d.data[i + 2]];
    if (lane === 0 ? (g > r + 40 && g > b) : (b > r + 60 && b > g)) ink[lane]++;
  }
  return ink;
}"""
CHART_INK = """([id, colours]) => {
  const c = document.querySelector(`#${id} canvas`), d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
  let n = 0;
  for (let i = 0; i < d.data.length; i += 4) {
    if (colours.some(([r, g, b]) => Math.abs(d.data[i] - r) < 16 && Math.abs(d.data[i + 1] - g) < 16
        && Math.abs(d.data[i + 2] - b) < 16)) n++;
  }
  return n;
}"""
BLUE, ORANGE, GREEN = (42, 93, 176), (217, 131, 36), (47, 111, 79)


async def _login(server: RunningServer, admin_token: str, page: Page) -> None:
    password = "listen to the calls 42"
    await console_login(page, server.url, await console_user(server, admin_token, "viewer", password), password)


async def _seek_by_click(page: Page, turn: int) -> float:
    """Click a transcript turn; the player's position right after (it is paused, so it stays there)."""
    await page.locator(f"#transcript .line[data-turn='{turn}']").click()
    return float(await page.evaluate("() => document.getElementById('player').currentTime"))


async def test_console_plays_a_recorded_call_and_draws_the_dashboard(
        server: RunningServer, admin_token: str, card_call: dict, viewer: str, audio_dir: Path) -> None:  # noqa: F811
    if shutil.which("chromium") is None:
        pytest.fail("Debian chromium is not installed: run scripts/install.sh --test")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    call, call_id = card_call["call"], card_call["id"]
    _, peaks = await api(server, viewer, f"/api/calls/{call_id}/recording/peaks")
    span = next(f for f in call["dlp_findings"] if f.get("channel") == "caller")
    user = next(t for t in call["turns"] if t["role"] == "user")
    assert user["source"] == "voice"
    agent = next(t for t in call["turns"] if t["role"] == "agent" and t["latency"])
    # Where each turn is in the recording; a spoken caller turn plays from half a second before its stored start
    # (player.js CALLER_LEAD_S: the VAD is sure of speech a moment after the first word began).
    offset = {t["index"]: max(0.0, stamp(t["started_at"]) - stamp(peaks["time_zero"]) - (0.5 if t is user else 0))
              for t in (user, agent)}
    mic = audio_dir / "review-console-mic.wav"
    write_wav(mic, np.zeros(48000, np.int16), 48000)
    messages: list[tuple[str, str]] = []
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="pono-review-"), executable_path=CHROMIUM, headless=True,
            args=chromium_args(str(mic)), viewport={"width": 1280, "height": 900})
        try:
            page = await ctx.new_page()
            await page.add_init_script(CSP_WATCH)
            page.on("console", lambda m: messages.append((m.type, f"{m.text} at {m.location.get('url')}")))
            page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
            page.on("response", lambda r: r.status >= 400 and messages.append(("http", f"{r.status} {r.url}")))
            await _login(server, admin_token, page)

            # The recorded call from the history: player, two-lane waveform, the redaction in the caller's lane.
            await page.click("#tab-history")
            await page.locator(f"#results tbody tr[data-call-id='{call_id}']").click()
            await page.wait_for_function("() => window.consolePlayer.peaks !== null"
                                         " && document.getElementById('player').readyState >= 1", timeout=20000)
            caller_ink, agent_ink = await page.evaluate(LANE_INK)
            assert caller_ink > 200 and agent_ink > 200, (caller_ink, agent_ink)
            marker = page.locator("#waveform-marks .redaction.caller").first
            await marker.wait_for()
            wave, box = await page.locator("#waveform").bounding_box(), await marker.bounding_box()
            assert wave and box
            assert abs((box["x"] - wave["x"]) / wave["width"] - span["audio_start_ms"] / 1000 / peaks["duration_s"]) \
                < 0.01
            assert box["y"] + box["height"] <= wave["y"] + wave["height"] / 2 + 1  # in the caller's (upper) lane
            assert (await marker.get_attribute("title") or "").startswith(span["entity_type"])

            # The waterfall: one bar per stage the reply measured.
            measured = [s for s in STAGES if s in agent["latency"]]
            bars = page.locator(f"#waterfall .wf-turn[data-turn='{agent['index']}'] .wf-row")
            assert await bars.count() == len(measured) >= 5
            assert [await bars.nth(i).get_attribute("data-stage") for i in range(len(measured))] == measured

            # Clicking the waveform seeks there; clicking a turn seeks to where that turn is in the recording.
            await page.locator("#waveform").click(position={"x": wave["width"] * 0.75, "y": wave["height"] / 4})
            heard = float(await page.evaluate("() => document.getElementById('player').currentTime"))
            assert abs(heard - 0.75 * peaks["duration_s"]) < 0.1, heard
            for turn in (agent, user):
                heard = await _seek_by_click(page, turn["index"])
                assert abs(heard - offset[turn["index"]]) < 0.05, (turn["index"], heard, offset)
            # Playing from there highlights the turn being heard.
            await page.evaluate("() => document.getElementById('player').play()")
            await page.wait_for_function("() => document.querySelector('#transcript .line.current') !== null",
                                         timeout=10000)
            assert await page.locator("#transcript .line.current").get_attribute("data-turn") == str(user["index"])
            await page.evaluate("() => document.getElementById('player').pause()")
            await page.locator("#recording").scroll_into_view_if_needed()
            await page.screenshot(path=str(ARTIFACTS / "call-recording.png"), full_page=True)

            # The dashboard draws its charts from /api/dashboard.
            await page.click("#tab-dashboard")
            await page.wait_for_function("() => window.consoleDashboard.last !== null"
                                         " && document.querySelectorAll('.charts canvas').length >= 4", timeout=15000)
            figures: dict[str, Any] = await page.evaluate("() => window.consoleDashboard.last")
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert figures["totals"]["calls"] >= 1 and figures["totals"]["latency_turns"] >= 1
            assert await page.evaluate(CHART_INK, ["chart-calls", [BLUE]]) > 20
            assert await page.evaluate(CHART_INK, ["chart-latency", [BLUE, ORANGE]]) > 20
            assert await page.evaluate(CHART_INK, ["chart-dlp", [BLUE, GREEN]]) > 20
            tiles = await page.locator("#tiles .tile").all_text_contents()
            assert any("voice-to-voice p95" in t for t in tiles) and any("active calls" in t for t in tiles)

            violations = await page.evaluate("() => window.__csp")
        finally:
            await ctx.close()
    assert violations == [], violations
    errors = [m for m in messages if m[0] in ("error", "pageerror")]
    assert errors == [], errors
