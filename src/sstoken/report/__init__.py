"""See what was selected: a self-contained HTML page and PNG plots.

``sstoken show`` reads the per-token scores saved during training (``selection.jsonl``, one
record per example and method, schema in :mod:`sstoken.records`) or scores a model + data
directly, and writes one HTML page that opens without network.

* :mod:`sstoken.records` - the record schema, :func:`read_scores`, :func:`check_record`
* :mod:`.codec` - the page's compact data (fixed-width base-64 numbers) and its decoding
* :mod:`.page` - :func:`write_html`, :func:`read_report`; CSS and JS in ``static/``
* :mod:`.plots` - the PNG plots (matplotlib, imported only when a plot is drawn)
* :mod:`.show` - :func:`show`: records -> plots + page (the ``show`` command)
"""

from ..records import ReportError, check_record, read_scores
from .page import read_report, write_html
from .plots import plot_ablation, plot_rel_vs_attn, plot_score_histograms, plot_training
from .show import show

__all__ = ["write_html", "read_report", "read_scores", "check_record", "ReportError",
           "plot_training", "plot_score_histograms", "plot_rel_vs_attn", "plot_ablation", "show"]
