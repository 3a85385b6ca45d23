"""The ``hesd`` command line (Typer).

Exit codes: 0 success; 1 some checkpoints could not be analysed (the others are stored and
reported); 2 bad input (unknown ``module:factory``, a factory that raises, no checkpoints,
an unwritable or mismatched output folder, a corrupt single checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .._version import __version__
from ..analysis.checkpoints import discover_checkpoints
from ..analysis.series import analyze_checkpoints
from ..analysis.settings import AnalysisSettings, default_of
from ..checks import check_device
from ..errors import HesdError
from .cli_spectrum import spectrum
from .cli_support import (
    EXIT_OK,
    EXIT_PARTIAL,
    HVP_HELP,
    emit_json,
    fail,
    fail_collective,
    init_distributed,
    parse_bytes,
    pick,
    print_summary,
    read_config,
    tune_allocator,
)
from .hf_data import hf_folders, load_batches

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="hesd: the Hessian eigenvalue spectral density (HESD) of PyTorch networks, and the decisions it supports. "
    "Exit codes: 0 success, 1 some checkpoints failed (the rest is kept), 2 bad input.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hesd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Hessian eigenvalue spectral density (HESD) tools."""
    tune_allocator()


app.command()(spectrum)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoints, results and the report.")] = Path(
        "hesd-demo"
    ),
    epochs: Annotated[int, typer.Option(help="Training epochs per run.")] = 16,
    quick: Annotated[bool, typer.Option("--quick", help="A shorter run (tests, smoke checks).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the selections as JSON.")] = False,
    lm: Annotated[
        bool,
        typer.Option(
            "--lm",
            help="Instead: a tiny character-level GPT trained with the Hugging Face Trainer on "
            "standard-library source text, its checkpoint folders analysed by hesd analyze.",
        ),
    ] = False,
) -> None:
    """Train two short runs on the bundled digits data, analyse both series and write the HTML report.

    The runs are SGD with momentum, and the same with aggressive gradient clipping. No arguments needed.
    With --lm: the transformers workflow (needs pip install 'hesd[transformers]').
    """
    try:
        if lm:
            from .demo_lm import run_lm_demo

            result = run_lm_demo(out if out != Path("hesd-demo") else Path("hesd-demo-lm"), quick=quick,
                                 quiet=quiet or as_json)  # fmt: skip
        else:
            from .demo import run_demo

            result = run_demo(out, epochs=4 if quick else epochs, quick=quick, quiet=quiet or as_json)
    except (PermissionError, HesdError) as exc:
        fail(str(exc))
    if as_json:
        emit_json(result)


# ------------------------------------------------------------------------------------------------ analyze
@app.command()
def analyze(
    checkpoints: Annotated[
        list[str] | None, typer.Argument(help="Checkpoint files, folders or glob patterns (ordered by epoch in name).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="MODULE:FACTORY returning the nn.Module (Hugging Face folders: optional; an adapter's base model).",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="MODULE:FACTORY returning training batches, or a .txt/.jsonl file or datasets "
            "folder tokenised with the checkpoint's tokenizer.",
        ),
    ] = None,
    heldout: Annotated[str | None, typer.Option("--heldout", help="Held-out batches, as --data.")] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            "--loss",
            help="MODULE:FN loss(outputs, targets); default CE, or the model's own loss for Hugging Face folders.",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Tokenizer folder for text data [the checkpoint's].")
    ] = None,
    text_field: Annotated[
        str | None, typer.Option("--text-field", help="Text field of .jsonl / datasets records [text].")
    ] = None,
    label_field: Annotated[
        str | None, typer.Option("--label-field", help="Label field, for sequence-classification heads [label].")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Tokens per text sample [128, at most the model's].", min=1)
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Text samples per batch [8].", min=1)] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Use the first N text samples [all].", min=1)
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Results folder (resumable).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with any of these options.")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help=f"Lanczos steps per probe [{default_of('num_steps')}].")
    ] = None,
    probes: Annotated[
        int | None, typer.Option("--probes", help=f"SLQ probe vectors [{default_of('num_probes')}].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help=f"Probe seed, same at every checkpoint [{default_of('seed')}].")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... [model's].")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 or float64 [model's].")] = None,
    model_mode: Annotated[
        str | None, typer.Option("--model-mode", help=f"eval or train (BN stats) [{default_of('model_mode')}].")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Training learning rate, for η·λmax/2.")] = None,
    ct_threshold: Annotated[
        float | None, typer.Option("--ct-threshold", help=f"MP if Ct > this [{default_of('ct_threshold')}].")
    ] = None,
    n: Annotated[float | None, typer.Option("--n", help=f"Exponent of Khn [{default_of('n')}].")] = None,
    heldout_criteria: Annotated[
        bool, typer.Option("--heldout-criteria", help="Also compute the criteria on held-out data.")
    ] = False,
    params: Annotated[
        list[str] | None, typer.Option("--params", help="Restrict to parameters matching this glob (repeatable).")
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Memory the analysis may use beyond model and data, e.g. 2G; planned "
            "up front (micro-batches, finite differences, smaller basis) or refused.",
        ),
    ] = None,
    hvp_method: Annotated[str | None, typer.Option("--hvp-method", help=HVP_HELP)] = None,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="Run data/checkpoint-parallel under torchrun (gloo/NCCL).")
    ] = False,
    parallel: Annotated[
        str | None, typer.Option("--parallel", help="With --distributed: 'data' (shard batches) or 'checkpoints'.")
    ] = None,
    no_shard: Annotated[
        bool, typer.Option("--no-shard", help="With --distributed: the data factory already returns this rank's shard.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard results made with other settings.")] = False,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow arbitrary unpickling (UNSAFE; own files only).")
    ] = False,
    landscape: Annotated[
        bool | None, typer.Option("--landscape/--no-landscape", help="Loss landscape of the pick [on].")
    ] = None,
    report: Annotated[bool | None, typer.Option("--report/--no-report", help="Write DIR/report.html [on].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; errors only.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table and selections as JSON.")] = False,
) -> None:
    """Analyse a series of checkpoints: HESD, criteria, type, QS flags and the checkpoint to keep.

    Writes OUT/results.csv (one row per checkpoint), results.json, selection.json and report.html.
    Re-running the same command after an interruption resumes where it stopped.
    """
    import torch

    from ._common import Progress, call_factory, load_object, store_landscape

    cfg = read_config(config)
    checkpoints = checkpoints or cfg.get("checkpoints")
    model = pick(model, cfg, "model", None)
    data = pick(data, cfg, "data", None)
    out = Path(pick(out, cfg, "out", "")) if pick(out, cfg, "out", None) else None
    infos = []
    if checkpoints:
        try:
            infos = discover_checkpoints(checkpoints)
        except (HesdError, FileNotFoundError) as exc:
            fail(str(exc))
    try:  # an adapter's base model must be found before any work starts
        hf = hf_folders(infos, base_given=bool(model))
    except HesdError as exc:
        fail(str(exc))
    needs_model = not infos or len(hf) < len(infos)
    missing = [name for name, v in (("CHECKPOINT", checkpoints), ("--model", model or not needs_model),
                                    ("--data", data), ("--out", out)) if not v]  # fmt: skip
    if missing:
        fail(f"missing {', '.join(missing)}. Example: hesd analyze runs/*.pt --model mypkg.models:make_model "
              "--data mypkg.data:train_batches --out results (Trainer output: hesd analyze out/checkpoint-* "
              "--data train.txt --out results)")  # fmt: skip
    assert out is not None and checkpoints is not None and data is not None
    heldout = pick(heldout, cfg, "heldout", None)
    loss = pick(loss, cfg, "loss", None)
    parallel = pick(parallel, cfg, "parallel", "data")
    no_shard = no_shard or cfg.get("no_shard", False)
    landscape = pick(landscape, cfg, "landscape", True)
    report = pick(report, cfg, "report", True)
    try:
        settings = AnalysisSettings(
            num_steps=int(pick(steps, cfg, "steps", default_of("num_steps"))),
            num_probes=int(pick(probes, cfg, "probes", default_of("num_probes"))),
            seed=int(pick(seed, cfg, "seed", default_of("seed"))),
            n=float(pick(n, cfg, "n", default_of("n"))),
            ct_threshold=float(pick(ct_threshold, cfg, "ct_threshold", default_of("ct_threshold"))),
            model_mode=pick(model_mode, cfg, "model_mode", default_of("model_mode")),
            lr=pick(lr, cfg, "lr", default_of("lr")),
            dtype=pick(dtype, cfg, "dtype", default_of("dtype")),
            device=pick(device, cfg, "device", default_of("device")),
            heldout_criteria=heldout_criteria or bool(cfg.get("heldout_criteria", False)),
            params=params or cfg.get("params"),
            max_memory=parse_bytes(pick(max_memory, cfg, "max_memory", None)),
            hvp_method=pick(hvp_method, cfg, "hvp_method", default_of("hvp_method")),
        )
        if settings.device is not None:  # before loading anything
            check_device(settings.device, "--device", "hesd analyze")
        if settings.max_memory is not None:  # large buffers mapped and unmapped: resident memory follows the plan
            tune_allocator(reuse_large=False)
        model_factory = load_object(model, "--model") if model else None
        loss_fn: Any = load_object(loss, "--loss") if loss else (None if hf else torch.nn.functional.cross_entropy)
        text: dict[str, Any] = dict(
            tokenizer=pick(tokenizer, cfg, "tokenizer", None), text_field=pick(text_field, cfg, "text_field", "text"),
            label_field=pick(label_field, cfg, "label_field", "label"),
            max_length=pick(max_length, cfg, "max_length", 128), batch_size=pick(batch_size, cfg, "batch_size", 8),
            max_samples=pick(max_samples, cfg, "max_samples", None),
        )  # fmt: skip
        train_data = load_batches(data, "--data", hf, **text)
        held = load_batches(heldout, "--heldout", hf, **text) if heldout else None

        def make_model():
            return call_factory(model_factory, "--model", model)

        factory = make_model if model_factory is not None else None

        group, rank = init_distributed(distributed or bool(cfg.get("distributed", False)), settings.device)
        if group is not None and parallel == "data" and not no_shard:
            from ..distributed import shard

            train_data = shard(train_data, group=group)
        quiet = quiet or rank != 0
        progress = Progress(quiet or as_json, settings.num_steps * settings.num_probes)
        res = analyze_checkpoints(
            factory, checkpoints, train_data, loss_fn=loss_fn, heldout=held, out_dir=out, settings=settings,
            overwrite=overwrite or bool(cfg.get("overwrite", False)), trust_pickle=trust_pickle, progress=progress,
            process_group=group, parallel=parallel,
        )  # fmt: skip
        progress.close()
    except (HesdError, FileNotFoundError, PermissionError, ValueError) as exc:
        fail(str(exc))
    except RuntimeError as exc:  # a collective broken by a rank that died or hung: name it
        fail_collective(exc)
    ok = res.table["status"] == "ok"
    if rank != 0:  # only rank 0 writes the landscape and the report, and prints
        raise typer.Exit(EXIT_PARTIAL if res.failed else EXIT_OK)
    if landscape and ok.any():
        store_landscape(out, factory, train_data, loss_fn, res.selections, model_mode=settings.model_mode,
                        trust_pickle=trust_pickle, dtype=getattr(torch, settings.dtype) if settings.dtype else None,
                        seed=settings.seed, hvp_method=settings.hvp_method,
                        max_memory=settings.max_memory)  # fmt: skip
    report_path = None
    if report and ok.any():
        from .report import build_report

        report_path = build_report(out)
    if as_json:
        emit_json({"results": res.table.drop(columns=["qs_reason"], errors="ignore").to_dict(orient="records"),
                    "selections": res.selections, "report": str(report_path) if report_path else None})  # fmt: skip
    elif not quiet:
        print_summary(res.table, res.selections)
        typer.echo(f"\nresults: {out / 'results.csv'}" + (f"\nreport:  {report_path}" if report_path else ""))
    if res.failed:
        for ckpt, err in res.failed:
            typer.echo(f"failed: {ckpt}: {err}", err=True)
        raise typer.Exit(EXIT_PARTIAL)


# ------------------------------------------------------------------------------------------------ report
@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="Results folder (or a folder of them).")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML path [DIR/report.html].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report path as JSON.")] = False,
) -> None:
    """(Re)build the HTML report from stored results, without recomputing anything."""
    from .report import build_report

    try:
        path = build_report(directory, out)
    except (HesdError, FileNotFoundError, PermissionError) as exc:
        fail(str(exc))
    if as_json:
        emit_json({"report": str(path)})
    elif not quiet:
        typer.echo(f"report: {path}")


def main() -> None:
    """Console-script entry point."""
    app()
