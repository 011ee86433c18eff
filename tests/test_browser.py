"""Headless Chromium places a call from the call page with a fake microphone (run inside a loopback-only netns)."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
from conftest import write_wav
from playwright.async_api import async_playwright

from pono.signaling.audio_out import Resampler
from pono.testing.scripted_llm import Script

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium_args(fake_wav: str) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
    ]


async def test_call_page_in_chromium(server, script: Script, question: np.ndarray, audio_dir) -> None:
    if shutil.which("chromium") is None:
        pytest.fail("Debian chromium is not installed: run scripts/install.sh --test")
    script.reply = "Certainly, your table for two is booked."
    # Chrome loops the fake microphone file: speech once, then a long silence.
    mic = np.concatenate([np.zeros(16000, np.int16), question, np.zeros(16000 * 20, np.int16)])
    fake_wav = audio_dir / "browser_mic48k.wav"
    write_wav(fake_wav, Resampler(48000)(mic, 16000), 48000)
    console: list[str] = []
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="pono-chromium-"), executable_path=CHROMIUM, headless=True, bypass_csp=True,
            args=chromium_args(str(fake_wav)))
        try:
            page = await ctx.new_page()
            page.on("console", lambda m: console.append(m.text))
            await page.goto(server.url)
            await page.click("#call")
            await page.wait_for_function("window.pono.callId !== null", timeout=15000)
            user_line = page.locator(".line.user:not(.partial)").first
            await user_line.wait_for(timeout=40000)
            assert "table" in (await user_line.text_content() or "").lower(), console
            agent_line = page.locator(".line.agent").first
            await agent_line.wait_for(timeout=20000)
            await page.wait_for_function(f"document.querySelector('.line.agent').textContent === {script.reply!r}",
                                         timeout=20000)
            await page.wait_for_function("window.pono.remoteRmsMax > 0.02", timeout=20000)
            rows = await page.locator("#latency tbody tr").count()
            assert rows >= 1
            # The text box goes over the data channel.
            script.reply = "Typed messages work too."
            await page.fill("#text", "Can I type instead?")
            await page.click("#send")
            await page.wait_for_function(
                "[...document.querySelectorAll('.line.agent')].some(e => e.textContent === 'Typed messages work too.')",
                timeout=20000)
            await page.click("#call")  # hang up
            await page.wait_for_function("window.pono.callId === null", timeout=5000)
        finally:
            await ctx.close()
