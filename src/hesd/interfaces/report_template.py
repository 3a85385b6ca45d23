"""The report's page: one Jinja2 template with autoescaping, rendered from plain values.

Everything :func:`hesd.interfaces.report.build_report` passes in — run names, checkpoint names,
reasons, errors, settings — is text; Jinja2 escapes it wherever it lands (element text and
attribute values alike), so a results folder shared between people cannot inject markup. The
only values marked safe are hesd's own base64 PNG figures, which hold no markup characters.

Examples:
    >>> from hesd.interfaces.report_template import render_report
    >>> page = render_report({"title": "<b>x</b>", "generated": "", "version": "0", "root": ".",
    ...                       "series": [], "versions": {}, "multi": False, "study": ""})
    >>> "<title>&lt;b&gt;x&lt;/b&gt;</title>" in page
    True
"""

from __future__ import annotations

from typing import Any

import jinja2
from markupsafe import Markup

__all__ = ["render_report"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.MP{color:#1a7f37;font-weight:600}.MN{color:#cf222e;font-weight:600}
.undetermined{color:#9a6700;font-weight:600;text-decoration:underline dotted}
.failed{background:#fff0f0}img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:13px}
.pick{background:#f6f6f6;border-left:4px solid #888;padding:.5em 1em;margin:.5em 0}
.pick.good{background:#f6fff6;border-color:#1a7f37}.pick.fair{background:#fffbea;border-color:#bf8700}
.pick.poor{background:#fff0f0;border-color:#cf222e}.flag{color:#cf222e;font-size:13px}
.headline{font-size:17px;background:#f6f8fa;border:1px solid #d0d7de;padding:.7em 1em;margin:1em 0}
.warn{color:#9a6700;font-size:14px;margin:.2em 0 .2em 1em}.evidence{color:#555;font-size:12px;margin-top:.3em}
code{background:#f3f3f3;padding:1px 4px}table.settings td{font-family:ui-monospace,monospace}
.scroll{overflow-x:auto}table.results td:not(.l){white-space:nowrap}
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
<p class="note">Generated {{ generated }} by hesd {{ version }} from {{ root }}. Criteria: re = |λmin/λmax|,
KH05 = Σ<sub>λ&lt;0</sub>|λw|<sup>0.5</sup> / Σ<sub>λ&gt;0</sub>(λw)<sup>0.5</sup>, Ct = min λ<sub>neg</sub> /
max λ<sub>pos</sub> on raw Ritz values, averaged over probes (Ct = −re whenever a probe's spectrum has both signs).
MP (mainly positive) when Ct &gt; threshold: curvature-based generalisation analysis applies; MN (mainly
negative): it does not, choose on held-out data; undetermined: the spectrum allows no verdict (a numerically zero
Hessian, too few Lanczos steps; hover the type for why). Quasi-singular (QS): eigenvalues collapsed toward zero,
where λmax stops tracking generalisation.</p>
{% for s in series %}
<div class="headline">{% if multi %}<b>{{ s.label }}</b>: {% endif %}{{ s.decision.sentence }}
{% for w in s.decision.warnings %}<div class="warn">⚠ {{ w }}</div>{% endfor %}</div>
{% endfor %}
{% if study %}<p class="note">{{ study }}</p>{% endif %}
<h2>Summary</h2>
<table><tr><th class="l">series</th><th>checkpoints</th><th>MP</th><th>MN</th><th>undetermined</th>
<th>quasi-singular</th><th>failed</th><th class="l">paper's pick (highest Ct among MP)</th>
<th class="l">smallest λmax pick</th></tr>
{% for s in series %}<tr><td class="l">{{ s.label }}</td><td>{{ s.counts.checkpoints }}</td><td>{{ s.counts.MP }}</td>
<td>{{ s.counts.MN }}</td><td>{{ s.counts.undetermined }}</td><td>{{ s.counts.qs }}</td><td>{{ s.counts.failed }}</td>
<td class="l">{{ s.picks_short[0] }}</td><td class="l">{{ s.picks_short[1] }}</td></tr>
{% endfor %}</table>
{% for s in series %}
<h2>Series: {{ s.label }}</h2>
<h3>Selection</h3>
{% for p in s.picks %}<div class="pick {{ p.grade }}"><b>{{ p.title }}</b>:
{% if p.checkpoint %}{{ p.checkpoint }}{% else %}<i>no pick</i>{% endif %} — {{ p.reason }}
{% for f in p.flags %}<div class="flag">⚠ {{ f }}</div>{% endfor %}
{% if p.reliability %}<div class="evidence">{{ p.reliability }}</div>{% endif %}</div>
{% endfor %}
{% for f in s.figures %}<h3>{{ f.name | title }}</h3>
<img alt="{{ f.name }} {{ s.label }}" src="data:image/png;base64,{{ f.src | safe }}">
{% else %}<p class="note">No checkpoint of this series was analysed successfully: no figures. The errors are in
the table below.</p>
{% endfor %}
<h3>Results</h3>
<div class="scroll"><table class="results">
<tr>{% for h in s.table.head %}<th class="{{ h.cls }}">{{ h.text }}</th>{% endfor %}</tr>
{% for r in s.table.rows %}<tr class="{{ 'failed' if r.failed else '' }}">
{%- for c in r.cells %}<td class="{{ c.cls }}"{% if c.tip %} title="{{ c.tip }}"{% endif %}>{{ c.text }}</td>
{%- endfor -%}
</tr>
{% endfor %}</table></div>
<p class="note">Full table: <code>{{ s.csv }}</code></p>
<h3>Settings</h3>
<table class="settings">{% for k, v in s.settings %}<tr><td class="l">{{ k }}</td><td class="l">{{ v }}</td></tr>
{% endfor %}</table>
{% endfor %}
<h2>Versions</h2>
<table>{% for k, v in versions.items() %}<tr><td class="l">{{ k }}</td><td class="l">{{ v }}</td></tr>{% endfor %}
</table>
</body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_PAGE = _ENV.from_string(TEMPLATE)


def render_report(context: dict[str, Any]) -> str:
    """The report page for ``context`` (the keys :func:`~hesd.interfaces.report.build_report` fills)."""
    return _PAGE.render(css=Markup(CSS), **context)
