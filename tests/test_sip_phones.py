"""Real SIP phones call Pono on loopback: baresip (a spoken conversation) and linphonec (a rich offer)."""

from __future__ import annotations

import asyncio
import os
import time
import wave
from pathlib import Path

import numpy as np
from conftest import RunningServer, write_wav
from phone_peers import heard_the_question, latest_call, require
from test_voice_call import words

from pono.agent.embedded import free_port
from pono.context import SERVICES
from pono.signaling.audio_out import Resampler
from pono.testing.scripted_llm import Script

BARESIP_CONFIG = """poll_method epoll
sip_listen 127.0.0.1:{sip_port}
net_interface 127.0.0.1
audio_player aufile,{rec}/unused.wav
audio_source aufile,{mic}
audio_alert aufile,{rec}/alert.wav
audio_srate 8000
audio_channels 1
rtp_ports {rtp_port}-{rtp_end}
module_path /usr/lib/baresip/modules
module stdio.so
module g711.so
module aufile.so
module sndfile.so
module_app account.so
module_app menu.so
snd_path {rec}
"""


def phone_mic(question: np.ndarray, folder: Path) -> Path:
    """The caller's microphone: a second of silence, the question, then quiet at telephone rate."""
    pcm = np.concatenate([np.zeros(16000, np.int16), question, np.zeros(16000 * 12, np.int16)])
    path = folder / "mic-8k.wav"
    write_wav(path, Resampler(8000)(pcm, 16000), 8000)
    return path


def wav_pcm(path: Path) -> tuple[np.ndarray, int]:
    """A phone's recording: its samples and their rate."""
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16), w.getframerate()


async def run(args: list[str], timeout: float) -> str:
    """Run a phone to the end; its output (for failure messages)."""
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    return out.decode(errors="replace")


async def test_baresip_holds_a_spoken_conversation(server: RunningServer, admin_token: str, script: Script,
                                                   phone_question: np.ndarray, tmp_path: Path) -> None:
    baresip = require("baresip", "baresip-core")
    script.reply = "Certainly, your table for two is booked for seven."
    rec = tmp_path / "rec"
    rec.mkdir()
    config = tmp_path / "baresip"
    config.mkdir()
    rtp_port = free_port()
    mic = phone_mic(phone_question, tmp_path)
    (config / "config").write_text(BARESIP_CONFIG.format(
        sip_port=free_port(), rec=rec, mic=mic, rtp_port=rtp_port, rtp_end=rtp_port + 4))
    (config / "accounts").write_text("<sip:baresip@127.0.0.1>;regint=0;audio_codecs=PCMU\n")
    since = time.time() - 1
    sip_port = server.app[SERVICES].sip.port
    log = await run([baresip, "-f", str(config), "-e", f"/dial sip:agent@127.0.0.1:{sip_port}", "-t", "16"],
                    timeout=40)
    call = await latest_call(server, admin_token, since, "sip", log[-3000:])
    assert call["caller"] == "baresip" and call["end_reason"] == "caller_hangup", call
    assert heard_the_question(call), call["turns"]
    assert any(t["role"] == "agent" and t["text"] == script.reply for t in call["turns"])
    # What baresip heard (its sndfile module dumps the decoded far end) is the agent's reply.
    received = sorted(rec.glob("*-dec.wav"))
    assert received, f"baresip recorded nothing: {list(rec.iterdir())}"
    heard = await server.app[SERVICES].models.run_stt(Resampler(16000)(*wav_pcm(received[0])))
    assert len(words(heard) & words(script.reply)) >= 4, heard


async def test_linphone_rich_offer_and_caller_hang_up(server: RunningServer, admin_token: str, script: Script,
                                                      phone_question: np.ndarray, tmp_path: Path) -> None:
    linphonec = require("linphonec", "linphone-cli")
    script.reply = "Yes, we have a table."
    home = tmp_path / "home"
    (home / ".local" / "share" / "linphone").mkdir(parents=True)
    rtp_port = free_port()
    rc = tmp_path / "linphonerc"
    rc.write_text(f"[sip]\nsip_port={free_port()}\nsip_tcp_port=-1\nsip_tls_port=-1\nipv6_enabled=0\n"
                  "guess_hostname=0\ncontact=sip:linphone@127.0.0.1\nmedia_encryption=none\n"
                  f"[rtp]\naudio_rtp_port={rtp_port}-{rtp_port + 20}\n[sound]\nechocancellation=0\n")
    sip = server.app[SERVICES].sip
    seen_codecs: list[str] = []

    async def watch_dialogs() -> None:
        while True:
            for dialog in list(sip.dialogs.values()):
                if "linphone" in (dialog.invite.get("from") or "") and dialog.offer is not None:
                    seen_codecs.append(dialog.offer.codec)
                    return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_dialogs())
    since = time.time() - 1
    mic = phone_mic(phone_question, tmp_path)
    commands = (f"soundcard use files\nplay {mic}\nrecord {tmp_path / 'heard.wav'}\n"
                f"call sip:agent@127.0.0.1:{sip.port}\n")

    async def drive() -> str:
        process = await asyncio.create_subprocess_exec(
            linphonec, "-c", str(rc), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, "HOME": str(home)})
        assert process.stdin is not None
        process.stdin.write(commands.encode())
        await process.stdin.drain()
        await asyncio.sleep(10)
        process.stdin.write(b"terminate\n")
        await process.stdin.drain()
        await asyncio.sleep(1.5)
        process.stdin.write(b"quit\n")
        await process.stdin.drain()
        out, _ = await asyncio.wait_for(process.communicate(), 20)
        return out.decode(errors="replace")

    log = await drive()
    watcher.cancel()
    # linphone offers Opus and Speex first; Pono answers with the G.711 codec it also offered.
    assert seen_codecs == ["PCMU"], log[-3000:]
    call = await latest_call(server, admin_token, since, "sip", log[-3000:])
    assert call["caller"] == "linphone" and call["end_reason"] == "caller_hangup", call
    assert heard_the_question(call), call["turns"]
    # linphone recorded what it received: the agent's reply.
    heard = await server.app[SERVICES].models.run_stt(Resampler(16000)(*wav_pcm(tmp_path / "heard.wav")))
    assert len(words(heard) & words(script.reply)) >= 3, heard
