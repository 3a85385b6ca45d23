"""Seeded probe vectors, identical on every device and dtype."""

from __future__ import annotations

import torch

__all__ = ["STREAM", "gaussian", "rademacher"]

#: names how :func:`rademacher` turns a seed into probes; stored with results (``hesd.analysis.series``),
#: so that a results folder is not resumed with probes drawn another way
STREAM = "rademacher: bits of random bytes"


def _sign_table(dtype: torch.dtype) -> torch.Tensor:
    """``(256, 8)``: row ``b`` holds the bits of byte ``b``, least significant first, as ±1 (bit 1: +1)."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return (2 * bits - 1).to(dtype)


def rademacher(n: int, k: int, seed: int, dtype: torch.dtype, device: torch.device, offset: int = 0) -> torch.Tensor:
    r"""``(n, k)`` Rademacher (±1) probes, identical for a given ``seed`` on every device and dtype.

    Column ``j`` is drawn from generator state ``seed`` advanced by ``offset + j`` probes, so
    chunked and unchunked draws agree: :math:`\lceil n/8 \rceil` random bytes from the host's
    generator, each giving eight signs (its bits, least significant first), looked up in a table
    of the 256 bytes' signs. One random byte per eight entries: 0.15 s for 124 M entries on two
    cores, against 0.7–0.95 s for one random ``int8`` per entry, as hesd 0.3.0 drew them (other
    probes: :data:`STREAM` tells them apart; BENCHMARKS.md §9). The columns are stored one after
    another (the transpose of a ``(k, n)`` tensor): each probe is one contiguous vector, as
    operators take their columns and give their results
    (:meth:`hesd.operators.ParameterLayout.result`).
    """
    out = torch.empty(k, n, dtype=dtype, device=device).T
    host = out.device.type == "cpu"
    table = _sign_table(dtype if host else torch.int8)  # elsewhere: drawn as int8 on the host, then copied
    whole, rest = divmod(n, 8)
    for j in range(k):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + offset + j)
        draw = torch.randint(0, 256, (whole + (rest > 0),), generator=g, dtype=torch.uint8).int()
        col = out[:, j] if host else torch.empty(n, dtype=torch.int8)
        torch.index_select(table, 0, draw[:whole], out=col[: 8 * whole].view(whole, 8))
        if rest:
            col[8 * whole :] = table[int(draw[whole]), :rest]
        if not host:
            out[:, j].copy_(col)
    return out


#: entries of a Gaussian vector drawn at a time (a multiple of 16: see :func:`gaussian`)
GAUSSIAN_CHUNK = 1 << 20


def gaussian(
    n: int, seed: int, dtype: torch.dtype, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A seeded standard normal vector, the same on every device and dtype: one float32 draw on the host.

    Drawn in float32, whatever the result's dtype, because PyTorch's CPU sampler is vectorised
    there: 0.48 s for 124 M entries on two cores against 2.05 s in float64 (BENCHMARKS.md §9); a
    float64 result holds the float32 values exactly (a start vector needs randomness, not digits).
    Drawn in chunks of :data:`GAUSSIAN_CHUNK` entries, each cast into the result, so no second
    vector of ``n`` entries is held. The values are those of a single
    ``torch.randn(n, dtype=torch.float32)``: PyTorch's CPU sampler turns uniforms into normals 16
    at a time and redraws the last 16 entries of a draw whose length is not a multiple of 16, so
    every chunk but the last is a multiple of 16 and the last is at least 16 long (tested against
    the single draw).

    Args:
        n: length.
        seed: the generator's seed.
        dtype: the result's dtype.
        device: the result's device.
        out: a vector of ``n`` entries to fill instead of a new one.

    Examples:
        >>> import torch
        >>> from hesd.algorithms.probes import gaussian
        >>> x = gaussian(5, 0, torch.float64, torch.device("cpu"))
        >>> torch.equal(x, torch.randn(5, generator=torch.Generator().manual_seed(0)).double())
        True
    """
    g = torch.Generator().manual_seed(int(seed))
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    starts = list(range(0, n, GAUSSIAN_CHUNK))
    if len(starts) > 1 and n - starts[-1] < 16:
        starts.pop()  # the remainder joins the chunk before it
    for i, c in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        out[c:end] = torch.randn(end - c, generator=g, dtype=torch.float32)
    return out
