r"""HESD criteria (Gabdullin 2024, 2025) computed on raw Ritz values and weights.

Per SLQ probe with Ritz values :math:`\lambda_i` and quadrature weights :math:`w_i`:

.. math::

    r_e = \left|\frac{\min_i \lambda_i}{\max_i \lambda_i}\right|, \qquad
    K_{h,n} = \frac{\sum_{\lambda_i < 0} |\lambda_i w_i|^n}{\sum_{\lambda_i > 0} (\lambda_i w_i)^n}, \qquad
    C_t = \frac{\min \{\lambda_i < 0\}}{\max \{\lambda_i > 0\}},

each then averaged over probes (their standard deviation and standard error are reported
too). Lower :math:`r_e` and :math:`K_{h,n}` mean less negative curvature relative to
positive. The HESD is *mainly positive* (MP) when :math:`C_t > ` ``ct_threshold``
(default −0.6): curvature-based generalisation analysis applies. Otherwise it is *mainly
negative* (MN) and it does not.

Edge cases (per probe, documented choices):

* no negative Ritz value: :math:`C_t = 0` and :math:`K_{h,n} = 0` (MP);
* no positive Ritz value: :math:`C_t = -\infty` and :math:`K_{h,n} = +\infty` (MN);
  :math:`r_e` keeps its literal value :math:`|\min\lambda/\max\lambda|` (:math:`+\infty` when
  :math:`\max\lambda = 0`; 0 when every Ritz value is 0);
* a spectrum no verdict can be read from is ``undetermined``, neither MP nor MN
  (:func:`undetermined_reason`): a Hessian that is numerically zero (a saturated or
  constant loss: :math:`\max|\lambda|\,\|\theta\|^2` below ``zero_curvature``), or fewer
  than :data:`MIN_STEPS` Lanczos steps (one or two Ritz values per probe show no negative
  curvature, so :math:`C_t = 0` would read as MP). The selection rules on curvature skip
  such checkpoints;
* a probe whose Lanczos run broke down early (invariant Krylov space) is used as it is:
  its Ritz values are exact eigenvalues and its weights a valid quadrature;
* the mean of per-probe :math:`C_t` is the reported :math:`C_t` (``aggregate="mean"``,
  matching how :math:`r_e` and :math:`K_{h,n}` are averaged over runs); ``"pooled"`` takes
  the most negative and most positive Ritz values over all probes instead.

**Step dependence (measured).** :math:`r_e` and :math:`C_t` depend only on the extreme Ritz
values, which converge fast: on the digits CNN they are within 3e-4 of their 300-step values
after 20 Lanczos steps. :math:`K_{h,n}` does *not* converge with the number of steps
:math:`m`: :math:`\sum_i (\lambda_i w_i)^{n}` with :math:`n < 1` is not a quadrature rule,
and as :math:`m` grows the weights split over more Ritz values and the sums grow (KH05 of the
same checkpoint: 0.21 at 20 steps, 0.33 at 60, 0.41 at 150, 0.47 at 300). Compare KH05 only
between spectra taken with the same ``num_steps``. hesd stores the step count with every
result and refuses to mix settings in one results folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..algorithms.spectrum import Spectrum
from ..errors import HesdTypeError, HesdValueError

__all__ = [
    "Criteria",
    "compare_criteria",
    "criteria",
    "per_probe_criteria",
    "probe_summary",
    "undetermined_reason",
    "zero_mass",
]

#: fewer Lanczos steps than this (below the dimension) leave the HESD's type undetermined
MIN_STEPS = 5


def per_probe_criteria(values: np.ndarray, weights: np.ndarray, n: float = 0.5) -> tuple[float, float, float]:
    """``(re, khn, ct)`` of one probe's Ritz values and weights (edge cases as in the module docs)."""
    lam = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    lo, hi = float(lam.min()), float(lam.max())
    re = abs(lo / hi) if hi != 0 else (0.0 if lo == 0 else math.inf)
    neg, pos = lam < 0, lam > 0
    num = float(np.sum(np.abs(lam[neg] * w[neg]) ** n))
    den = float(np.sum((lam[pos] * w[pos]) ** n))
    khn = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    if not neg.any():
        ct = 0.0
    elif not pos.any():
        ct = -math.inf
    else:
        ct = float(lam[neg].min() / lam[pos].max())
    return re, khn, ct


def probe_summary(values: np.ndarray, weights: np.ndarray, n: float = 0.5) -> np.ndarray:
    """``[λmin, λmax, re, Ct]`` of one probe: what adaptive SLQ waits on to settle.

    :math:`K_{h,n}` is left out on purpose: on raw Ritz values it does not converge as
    Lanczos steps are added (see the module notes), so it cannot signal convergence.
    """
    re, _, ct = per_probe_criteria(values, weights, n)
    return np.array([float(np.min(values)), float(np.max(values)), re, ct])


def zero_mass(spectrum: Spectrum, band: float) -> float:
    """Mean quadrature weight of Ritz values with ``|λ| ≤ band`` (share of spectral mass near zero)."""
    return float(np.mean([w[np.abs(v) <= band].sum() for v, w in zip(spectrum.values, spectrum.weights, strict=True)]))


def undetermined_reason(
    lambda_min: float, lambda_max: float, param_norm: float, num_steps: int, dim: int, zero_curvature: float
) -> str:
    r"""Why no HESD type can be read from a spectrum, or ``""`` when one can (module notes).

    Two cases, in this order:

    * **numerically zero Hessian**: :math:`\max(|\lambda_{\min}|, |\lambda_{\max}|)\,\|\theta\|^2
      < ` ``zero_curvature``. The left side is the second-order change of the loss over a step
      as long as the parameters themselves along the steepest direction, in the loss's units and
      independent of how the parameters are scaled; a saturated classifier (loss 0 in float32)
      has about 1e-5, a trained one about 1 or more;
    * **too few Lanczos steps**: ``num_steps < MIN_STEPS`` while the dimension is larger.

    Examples:
        >>> undetermined_reason(-0.2, 4.8, 16.6, 80, 3466, 1e-4)
        ''
        >>> undetermined_reason(-1e-10, 1e-8, 27.5, 80, 3466, 1e-4)[:33]
        'the Hessian is numerically zero: '
    """
    scale = max(abs(lambda_min), abs(lambda_max)) * param_norm**2
    if scale < zero_curvature:
        return (f"the Hessian is numerically zero: max|λ|·‖θ‖² = {scale:.2g} < zero_curvature {zero_curvature:g} "
                "(a saturated or constant loss), so neither MP nor MN")  # fmt: skip
    if num_steps < min(MIN_STEPS, dim):
        return (f"{num_steps} Lanczos step(s) give {num_steps} Ritz value(s) per probe, too few to show negative "
                f"curvature (Ct would read 0, MP); use at least {MIN_STEPS} steps, 20 or more for stable "
                "criteria")  # fmt: skip
    return ""


def _stats(x: np.ndarray) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean = float(np.mean(x))
        std = float(np.std(x, ddof=1)) if len(x) > 1 and np.isfinite(x).all() else (0.0 if len(x) == 1 else math.nan)
    se = std / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return mean, std, se


@dataclass
class Criteria:
    r"""Criteria of one spectrum. Spreads are across probes (std, and standard error of the mean).

    Attributes:
        re, re_std, re_se: :math:`r_e`.
        khn, khn_std, khn_se: :math:`K_{h,n}` at ``n``.
        kh05, kh05_std: :math:`K_{h,0.5}` (KH05), whatever ``n`` is, and its std across probes.
        ct, ct_std, ct_se: :math:`C_t` (mean over probes); ``ct_pooled`` over all probes at once.
        hesd_type: ``"MP"`` or ``"MN"`` (from ``ct`` and ``ct_threshold``).
        lambda_min, lambda_max: extreme Ritz values over all probes.
        width: ``lambda_max − lambda_min``.
        zero_mass: share of spectral mass with ``|λ| ≤ zero_band · lambda_max`` (QS quantity).
        neg_mass: share of spectral mass on negative Ritz values, :math:`\sum_{\lambda_i<0} w_i`
            averaged over probes (what part of the spectrum is negative, where Ct and re read
            only its edge).
        stable_step: :math:`2/\\lambda_{\\max}`, the largest stable step of plain gradient descent.
        eos_ratio: :math:`\\eta\\lambda_{\\max}/2` when the learning rate is given (> 1: past the edge of stability).
        num_probes, n, ct_threshold, zero_band: the settings used.
        per_probe: per-probe ``re``, ``khn`` and ``ct`` lists.
    """

    re: float
    re_std: float
    re_se: float
    khn: float
    khn_std: float
    khn_se: float
    kh05: float
    kh05_std: float
    ct: float
    ct_std: float
    ct_se: float
    ct_pooled: float
    hesd_type: str
    lambda_min: float
    lambda_max: float
    width: float
    zero_mass: float
    neg_mass: float
    stable_step: float
    eos_ratio: float | None
    num_probes: int
    n: float
    ct_threshold: float
    zero_band: float
    per_probe: dict = field(default_factory=dict)

    @property
    def is_mp(self) -> bool:
        """Whether the HESD is mainly positive (curvature analysis applies)."""
        return self.hesd_type == "MP"

    def to_dict(self, per_probe: bool = False) -> dict:
        """The criteria as a row's keys (``per_probe``: with the per-probe lists)."""
        d = asdict(self)
        if not per_probe:
            d.pop("per_probe")
        return d


def criteria(
    spectrum: Spectrum,
    n: float = 0.5,
    ct_threshold: float = -0.6,
    *,
    aggregate: str = "mean",
    zero_band: float = 0.01,
    lr: float | None = None,
) -> Criteria:
    """Compute :math:`r_e`, :math:`K_{h,n}`, :math:`C_t`, the HESD type and QS/stability quantities.

    Args:
        spectrum: an SLQ :class:`hesd.Spectrum` (or one built with ``Spectrum.from_ritz``).
        n: exponent of :math:`K_{h,n}`; the paper uses 0.5 and recommends ``0 < n < 1``.
        ct_threshold: MP when ``ct > ct_threshold`` (default −0.6, the paper's).
        aggregate: ``"mean"`` (default) or ``"pooled"`` — which :math:`C_t` decides the type.
        zero_band: half-width of the band around zero, relative to ``lambda_max``, for ``zero_mass``.
        lr: the optimiser's learning rate, for ``eos_ratio``.

    Examples:
        >>> import hesd
        >>> s = hesd.Spectrum.from_ritz([[-0.5, 0.1, 2.0]], [[0.25, 0.5, 0.25]])
        >>> c = hesd.criteria(s)
        >>> c.re, round(c.kh05, 4), c.ct, c.hesd_type
        (0.25, 0.3799, -0.25, 'MP')
    """
    caller = "criteria"
    if not isinstance(spectrum, Spectrum):
        raise HesdTypeError(f"{caller}: expected a hesd.Spectrum, got {type(spectrum).__name__}")
    if not (isinstance(n, (int, float)) and n > 0):
        raise HesdValueError(f"{caller}: n must be positive (the paper recommends 0 < n < 1), got {n}")
    if aggregate not in ("mean", "pooled"):
        raise HesdValueError(f"{caller}: aggregate must be 'mean' or 'pooled', got {aggregate!r}")
    if not zero_band > 0:
        raise HesdValueError(f"{caller}: zero_band must be positive, got {zero_band}")
    if lr is not None and not lr > 0:
        raise HesdValueError(f"{caller}: lr must be positive, got {lr}")
    rows = [per_probe_criteria(v, w, n) for v, w in zip(spectrum.values, spectrum.weights, strict=True)]
    kh05 = [per_probe_criteria(v, w, 0.5)[1] for v, w in zip(spectrum.values, spectrum.weights, strict=True)]
    re_s, kh_s, ct_s = (np.array(c) for c in zip(*rows, strict=True))
    re, re_std, re_se = _stats(re_s)
    khn, khn_std, khn_se = _stats(kh_s)
    ct, ct_std, ct_se = _stats(ct_s)
    all_v = np.concatenate(spectrum.values)
    pooled = per_probe_criteria(all_v, np.ones_like(all_v), n)[2]
    decisive = ct if aggregate == "mean" else pooled
    lmin, lmax = spectrum.lambda_min, spectrum.lambda_max
    return Criteria(
        re=re, re_std=re_std, re_se=re_se,
        khn=khn, khn_std=khn_std, khn_se=khn_se, kh05=float(np.mean(kh05)), kh05_std=_stats(np.array(kh05))[1],
        ct=ct, ct_std=ct_std, ct_se=ct_se, ct_pooled=pooled,
        hesd_type="MP" if decisive > ct_threshold else "MN",
        lambda_min=lmin, lambda_max=lmax, width=lmax - lmin,
        zero_mass=zero_mass(spectrum, zero_band * abs(lmax)) if lmax != 0 else 1.0,
        neg_mass=float(np.mean([w[v < 0].sum() for v, w in zip(spectrum.values, spectrum.weights, strict=True)])),
        stable_step=2.0 / lmax if lmax > 0 else math.inf,
        eos_ratio=(lr * lmax / 2.0) if lr is not None else None,
        num_probes=spectrum.num_probes, n=float(n), ct_threshold=float(ct_threshold), zero_band=float(zero_band),
        per_probe={"re": re_s.tolist(), "khn": kh_s.tolist(), "ct": ct_s.tolist()},
    )  # fmt: skip


def compare_criteria(train: Criteria, heldout: Criteria) -> dict[str, float | str]:
    """Side-by-side training vs held-out criteria and their differences (held-out − training).

    The earlier paper reads generalisation from how the criteria change with the data.
    """
    out: dict[str, float | str] = {}
    for key in ("re", "kh05", "khn", "ct", "lambda_min", "lambda_max"):
        a, b = getattr(train, key), getattr(heldout, key)
        out[f"train_{key}"] = a
        out[f"heldout_{key}"] = b
        out[f"diff_{key}"] = b - a
    out["train_hesd_type"] = train.hesd_type
    out["heldout_hesd_type"] = heldout.hesd_type
    return out
