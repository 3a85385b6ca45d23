"""``hesd spectrum``: one checkpoint's HESD summary and type (registered on the app in :mod:`~hesd.interfaces.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..analysis.checkpoints import apply_state_dict, load_state_dict
from ..analysis.model import analyze_model
from ..analysis.rows import VIEWS
from ..analysis.settings import AnalysisSettings, default_of
from ..checks import check_device
from ..errors import HesdError
from .cli_support import EXIT_OK, HVP_HELP, emit_json, fail, fail_collective, init_distributed, write_density_plot

__all__ = ["spectrum"]


def spectrum(
    checkpoint: Annotated[Path, typer.Argument(help="One checkpoint file.")],
    model: Annotated[str, typer.Option("--model", help="MODULE:FACTORY returning the nn.Module.")],
    data: Annotated[str, typer.Option("--data", help="MODULE:FACTORY returning training batches.")],
    loss: Annotated[str | None, typer.Option("--loss", help="MODULE:FN; default cross-entropy.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Lanczos steps per probe.")] = default_of("num_steps"),
    probes: Annotated[int, typer.Option("--probes", help="SLQ probe vectors.")] = default_of("num_probes"),
    seed: Annotated[int, typer.Option("--seed", help="Probe seed.")] = default_of("seed"),
    ct_threshold: Annotated[float, typer.Option("--ct-threshold", help="MP if Ct > this.")] = default_of(
        "ct_threshold"
    ),
    device: Annotated[str | None, typer.Option("--device", help="Device to run on.")] = None,
    hvp_method: Annotated[str, typer.Option("--hvp-method", help=HVP_HELP)] = default_of("hvp_method"),
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the density plot (PNG/SVG/PDF).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow arbitrary unpickling (UNSAFE).")] = False,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="Data parallel under torchrun: batches sharded round-robin.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the type.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """One checkpoint: print its HESD summary (λmin, λmax, trace, re, KH05, Ct) and type."""
    import torch

    from ._common import call_factory, load_object
    from .demo import text_histogram

    if plot is not None and (plot.suffix.lower() not in (".png", ".svg", ".pdf") or not plot.parent.is_dir()):
        fail(f"--plot {plot}: give a .png, .svg or .pdf path in an existing folder (checked before any work)")
    try:
        if device:
            check_device(device, "--device", "hesd spectrum")
        factory = load_object(model, "--model")
        net = call_factory(factory, "--model", model)
        if device:
            net = net.to(device)
        apply_state_dict(net, load_state_dict(checkpoint, trust_pickle=trust_pickle), checkpoint)
        batches = call_factory(load_object(data, "--data"), "--data", data)
        loss_fn = load_object(loss, "--loss") if loss else torch.nn.functional.cross_entropy
        settings = AnalysisSettings(num_steps=steps, num_probes=probes, seed=seed, ct_threshold=ct_threshold,
                                    hvp_method=hvp_method)  # fmt: skip
        group, rank = init_distributed(distributed, device)
        if group is not None:
            from ..distributed import shard

            batches = shard(batches, group=group)
        row, spec = analyze_model(net, batches, loss_fn=loss_fn, settings=settings, process_group=group)
        if rank != 0:
            raise typer.Exit(EXIT_OK)
    except (HesdError, ValueError) as exc:
        fail(str(exc))
    except RuntimeError as exc:  # a collective broken by a rank that died or hung: name it
        fail_collective(exc)
    if plot is not None:
        write_density_plot(plot, spec, f"{checkpoint.name}: {row['hesd_type']}-HESD, Ct = {row['ct']:.3f}")
    keys = VIEWS["spectrum"]
    summary = {k: row[k] for k in keys} | {"checkpoint": str(checkpoint), "type_reason": row["type_reason"]}
    if as_json:
        emit_json(summary | {"spectrum": spec.to_dict()})
    elif quiet:
        typer.echo(row["hesd_type"])
    else:
        for k in keys:
            v = row[k]
            typer.echo(f"{k:>12}: {v:.6g}" if isinstance(v, float) else f"{k:>12}: {v}")
        if row["hesd_type"] == "undetermined":
            typer.echo(f"\nHESD type undetermined: {row['type_reason']}\n")
        else:
            verdict = "curvature analysis applies" if row["hesd_type"] == "MP" else "curvature analysis does NOT apply"
            typer.echo(f"\n{row['hesd_type']}-HESD (Ct {row['ct']:.3f} vs threshold {ct_threshold}): {verdict}\n")
        typer.echo(text_histogram(spec))
        if plot is not None:
            typer.echo(f"\nplot: {plot}")
