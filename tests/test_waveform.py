"""The console's waveform peaks without a server: a 10-minute stereo recording (written by Pono's own Ogg Opus
writer) reduced with bounded memory and its two channels kept apart, a file cut short (a crashed server's), and a
recording in S3-compatible storage (moto in server mode, the accepted stand-in for a cloud object store)."""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest

from pono.storage.recordings import RecordingMissing, RecordingStore
from pono.voice.recording.ogg import OggOpusWriter
from pono.web.peaks import recording_peaks
from pono.web.waveform import file_peaks, reduce_peaks

RATE = 16_000
LOUD, QUIET = 12_000, 300


def write_recording(path: Path, seconds: int) -> None:
    """Caller: a 300 Hz tone, loud in odd seconds and quiet in even ones; agent: loud only every third second."""
    writer = OggOpusWriter(path)
    t = np.arange(RATE) / RATE
    tone = np.sin(2 * np.pi * 300 * t)
    for s in range(seconds):
        left = tone * (LOUD if s % 2 else QUIET)
        right = tone * (LOUD if s % 3 == 0 else 0)
        writer.write(np.stack([left, right], axis=1).astype(np.int16))
    writer.close()


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("waveform") / "ten-minutes.ogg"
    write_recording(path, 600)
    return path


def test_a_ten_minute_recording_in_bounded_memory(ten_minutes: Path) -> None:
    tracemalloc.start()
    try:
        peaks = file_peaks(ten_minutes, 600)  # one bucket a second
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The decoded audio would be 230 MB as 48 kHz stereo float32; what is kept is 10 ms windows.
    assert peak_bytes < 40 << 20, peak_bytes
    assert abs(peaks.duration_s - 600) < 0.1 and peaks.buckets == 600 and peaks.sample_rate == 48_000
    caller = np.maximum(peaks.high[0], -peaks.low[0])
    agent = np.maximum(peaks.high[1], -peaks.low[1])
    seconds = np.arange(600)
    # Buckets away from the edges of each second (Opus smears a transition over a few ms into the next).
    assert np.all(np.abs(caller[seconds % 2 == 1] - LOUD / 32768) < 0.08)
    assert np.all(caller[1:][seconds[1:] % 2 == 0] < LOUD / 32768 / 2)
    assert np.all(np.abs(agent[seconds % 3 == 0] - LOUD / 32768) < 0.08)
    quiet_agent = (seconds % 3 == 2)  # its neighbours are silent too (a loud second is followed by one)
    assert np.all(agent[quiet_agent] < 0.02)


def test_fewer_windows_than_buckets_and_merged_windows() -> None:
    low, high = np.array([[-1.0, -0.5, -0.2], [0.0, -0.1, 0.0]]), np.array([[1.0, 0.5, 0.2], [0.0, 0.3, 0.0]])
    assert reduce_peaks(low, high, 10)[0].shape == (2, 3)  # never more buckets than 10 ms windows
    merged_low, merged_high = reduce_peaks(low, high, 2)
    # Windows 0 | 1-2: each bucket is the least and the greatest of its windows.
    assert merged_low.tolist() == [[-1.0, -0.5], [0.0, -0.1]] and merged_high.tolist() == [[1.0, 0.5], [0.0, 0.3]]


def test_a_file_cut_short_gives_the_peaks_of_what_decodes(tmp_path: Path) -> None:
    whole = tmp_path / "whole.ogg"
    write_recording(whole, 20)
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2 + 17])  # mid-page, as a kill -9 leaves it
    peaks = file_peaks(cut, 100)
    assert 8 < peaks.duration_s < 12 and peaks.buckets == 100
    assert np.max(peaks.high[0]) > 0.3


def peaks_spools() -> set[Path]:
    """The temporary copies the peaks API makes of recordings in object storage (pono.web.peaks._spool)."""
    return set(Path(tempfile.gettempdir()).glob("pono-peaks-*"))


async def test_a_recording_in_object_storage(tmp_path: Path, ten_minutes: Path, monkeypatch) -> None:
    from aiobotocore.session import get_session
    from moto.server import ThreadedMotoServer

    from pono.agent.embedded import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        async with get_session().create_client("s3", region_name="us-east-1", endpoint_url=endpoint) as s3:
            await s3.create_bucket(Bucket="calls")
            await s3.put_object(Bucket="calls", Key="pono/2026/01/01/c1.ogg", Body=ten_minutes.read_bytes())  # noqa: ASYNC240
        store = RecordingStore(tmp_path, "s3://calls/pono", endpoint=endpoint)
        row = {"call_id": "c1", "storage_key": "pono/2026/01/01/c1.ogg", "status": "recording", "sha256": None}
        spools_before = peaks_spools()
        peaks = await recording_peaks(store, row, 300)
        assert peaks.buckets == 300 and abs(peaks.duration_s - 600) < 0.1
        local = file_peaks(ten_minutes, 300)
        assert np.array_equal(peaks.high, local.high) and np.array_equal(peaks.low, local.low)
        assert peaks_spools() == spools_before  # the copy is removed
        with pytest.raises(RecordingMissing):
            await recording_peaks(store, {**row, "storage_key": "pono/gone.ogg"}, 300)
    finally:
        moto.stop()


def test_a_file_that_is_not_audio_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ogg"
    junk.write_bytes(b"not an Ogg file at all " * 100)
    with pytest.raises((av.error.FFmpegError, ValueError)):
        file_peaks(junk, 100)


def test_an_empty_recording_has_no_peaks_rather_than_an_error(tmp_path: Path) -> None:
    """A call whose media never flowed leaves a 0-byte recording; its waveform request was a 500 (EOFError)."""
    empty = tmp_path / "empty.ogg"
    empty.write_bytes(b"")
    peaks = file_peaks(empty, 100)
    assert peaks.duration_s == 0 and peaks.buckets == 0
