"""llama-server of the patched build, driven over its OpenAI-compatible HTTP API (plain urllib).

    with serve(gguf, parallel=4, ctx=2048) as s:      # a free port, waits for /health
        s.chat([{"role": "user", "content": "2+2?"}], max_tokens=64)

The server applies the chat template stored in the GGUF (jinja, llama-server's default), so
each model is prompted the way its users prompt it. `ctx` is per slot: the server gets
ctx * parallel and splits it over the slots. On exit the server is stopped (SIGTERM, then
SIGKILL) after its peak resident memory (VmHWM) and per-device buffers (model, KV cache, compute;
VRAM with --cuda) are kept in `s.memory`.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

LOG_TAIL = 2000


def free_port() -> int:
    """A TCP port nothing listens on now (bind to port 0 and let the kernel choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int, host: str = "127.0.0.1") -> int:
    """`port`, or RuntimeError in one line when something already holds it."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise RuntimeError(f"port {port} is in use; pass another --port, or 0 to pick a free one") from None
    return port


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log
        self.memory: dict = {}

    def chat(self, messages: list[dict], max_tokens: int = 512, seed: int = 0, timeout: float = 1800) -> dict:
        """Greedy chat completion: {"text" (the answer a user sees), "reasoning" (a thinking model's
        <think> part, which the server splits off), "tokens" (generated), "finish" ("stop" | "length")}."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": seed}
        res = _post(f"{self.url}/v1/chat/completions", body, timeout)
        choice, msg = res["choices"][0], res["choices"][0]["message"]
        return {"text": msg.get("content") or "", "reasoning": msg.get("reasoning_content") or "",
                "finish": choice.get("finish_reason"), "tokens": res.get("usage", {}).get("completion_tokens")}

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL:].strip()

    def why(self) -> str:
        """The log line that says why the server stopped (its last error), else its last line."""
        lines = [ln.strip() for ln in self.log_tail().splitlines() if ln.strip()]
        errs = [ln for ln in lines if re.search(r"error|failed|invalid|unknown", ln, re.IGNORECASE)]
        return (errs or lines or ["(no output)"])[-1][:300]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"llama-server answered {e.code} to {url}: {e.read()[:500].decode(errors='replace')}") from None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200  # 503 while the model loads
    except (urllib.error.URLError, OSError):
        return False


_BUFFER = re.compile(r"(\S+) (?:model|KV|compute|RS) buffer size =\s*([0-9.]+) MiB")


def device_buffers(log: str) -> dict:
    """MiB the server allocated per device (model weights, KV cache, compute), from its log."""
    out: dict = {}
    for dev, mib in _BUFFER.findall(log):
        out[dev] = round(out.get(dev, 0.0) + float(mib), 1)
    return out


@contextmanager
def serve(gguf: str | Path, parallel: int = 4, ctx: int = 2048, threads: int = 2, cuda: bool = False,
          port: int = 0, extra_args: list[str] | tuple = (), start_timeout: float = 300):
    """Start llama-server on `gguf` (port 0: a free one), wait until /health answers 200, yield a
    Server, stop it at exit. A server that exits or does not become healthy raises RuntimeError
    with its log tail; a port in use raises before anything starts."""
    from . import runner
    runner.check_gguf(gguf)
    exe = runner._tool("llama-server", cuda)
    port = check_port(port) if port else free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(ctx * parallel), "-t", str(threads), "--no-webui", *runner._gpu_args(cuda),
           "-lv", "4",  # info from libllama too: its buffer-size lines are the VRAM column (~25 lines a request)
           *map(str, extra_args)]
    with tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False) as logf:
        log = Path(logf.name)
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    s = Server(url, proc, log)
    started = False
    try:
        t0 = time.time()
        while not _healthy(url):
            if proc.poll() is not None:  # one line; the whole log stays for the details
                raise RuntimeError(f"llama-server failed to start on {Path(gguf).name} (exit {proc.returncode}): "
                                   f"{s.why()} (log: {log})")
            if time.time() - t0 > start_timeout:
                raise RuntimeError(f"llama-server did not answer /health in {start_timeout:.0f} s on "
                                   f"{Path(gguf).name}: {s.why()} (log: {log})")
            time.sleep(0.2)
        started = True
        yield s
    finally:
        hwm = runner.vm_hwm_mib(proc.pid)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # read after exit, when everything it buffered is flushed
        s.memory = {"peak_rss_mib": round(hwm, 1) if hwm else None,
                    "buffers_mib": device_buffers(log.read_text(errors="replace"))}
        if started:
            log.unlink(missing_ok=True)
