"""Cache folder and pinned PyPI downloads (the only way anything upstream reaches us)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """~/.cache/quant2gguf/<parts> (QUANT2GGUF_CACHE overrides the root)."""
    root = Path(os.environ.get("QUANT2GGUF_CACHE", Path.home() / ".cache" / "quant2gguf"))
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(name: str, version: str, sha: str | None = None, sdist: bool = False,
                 python_version: str | None = None) -> Path:
    """Download one pinned distribution (no deps) into the cache and check its sha256."""
    dest = cache_dir("downloads", f"{name}-{version}")
    found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), f"{name}=={version}"]
        cmd += ["--no-binary", ":all:"] if sdist else []
        if python_version:
            cmd += ["--only-binary=:all:", "--python-version", python_version]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
        if r.returncode or not found:
            raise RuntimeError(f"pip download {name}=={version} failed (is PyPI reachable?):\n{r.stderr[-2000:]}")
    path = found[0]
    if sha and sha256(path) != sha:
        path.unlink()
        raise RuntimeError(f"{path.name}: sha256 mismatch (expected {sha}); the download was removed, retry")
    return path


@contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False):
    """Yield a temp path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and (final.exists() or final.is_symlink()):  # a folder cannot replace what is there: remove it
            shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
