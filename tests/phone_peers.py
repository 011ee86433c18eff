"""Helpers for the phone tests: run the Debian SIP peers and read what they recorded."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

SIP_FIXTURES = Path(__file__).parent / "fixtures" / "sip"


def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed (Debian package {package}): run scripts/install.sh --test")
    return path


def ulaw_wav(pcm16k: np.ndarray, folder: Path, name: str) -> Path:
    """An 8 kHz μ-law WAV of the speech, for sipp's rtp_stream."""
    from conftest import write_wav

    source = folder / f"{name}-16k.wav"
    write_wav(source, pcm16k, 16000)
    out = folder / f"{name}-ulaw.wav"
    subprocess.run(["sox", str(source), "-r", "8000", "-c", "1", "-e", "u-law", str(out)], check=True)
    return out


async def sipp(scenario: str, port: int, *, service: str = "agent", keys: dict[str, str] | None = None,
               timeout: float = 60, extra: list[str] | None = None) -> tuple[int, str]:
    """Run one sipp scenario against Pono's SIP port; (exit code, its output and error log)."""
    binary = require("sipp", "sip-tester")
    path = SIP_FIXTURES / scenario
    if keys:  # sipp does not expand -key values inside <exec>: fill them in ourselves
        text = path.read_text()
        for key, value in keys.items():
            text = text.replace(f"[{key}]", value)
        path = Path(tempfile.mkdtemp(prefix="pono-sipp-")) / scenario
        path.write_text(text)
    args = [binary, f"127.0.0.1:{port}", "-sf", str(path), "-s", service, "-i", "127.0.0.1",
            "-mi", "127.0.0.1", "-p", "0", "-m", "1", "-l", "1", "-nostdin", "-timeout", f"{int(timeout)}s",
            "-timeout_error", "-trace_err", "-error_file", "/dev/stdout", *(extra or [])]
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout + 10)
    return process.returncode or 0, out.decode(errors="replace")


async def stored_call(server: Any, token: str, call_id: str, timeout: float = 15) -> dict[str, Any]:
    """The call as stored once it ended (turns included)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(int(timeout * 5)):
            async with http.get(f"{server.url}/api/calls/{call_id}",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status == 200:
                    body = await r.json()
                    if body["ended_at"]:
                        return body
            await asyncio.sleep(0.2)
    raise AssertionError(f"call {call_id} was not stored as ended")


async def latest_call(server: Any, token: str, since: float, transport: str, context: str = "") -> dict[str, Any]:
    """The newest call of this transport started after `since` (epoch seconds), as stored once it ended."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{server.url}/api/calls", params={"since": str(since), "limit": "10"},
            headers={"Authorization": f"Bearer {token}"}) as r:
        calls = [c for c in (await r.json())["calls"] if c["transport"] == transport]
    assert calls, f"no {transport} call was stored\n{context}"
    return await stored_call(server, token, calls[0]["id"])


def heard_the_question(call: dict[str, Any]) -> bool:
    """The stored user turns hold most of the phone question's words (conftest.PHONE_QUESTION)."""
    user = set(re.findall(r"[a-z]+", " ".join(t["text"].lower() for t in call["turns"] if t["role"] == "user")))
    return len(user & {"would", "like", "speak", "somebody", "about", "order"}) >= 4
