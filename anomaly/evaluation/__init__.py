"""Detection quality on labelled data, behind ``anomaly evaluate``: the metrics (``metrics``),
the report's plots (``plots``) and HTML / JSON (``report``, template ``report.html.j2``), and the
command's steps from model to report (``run``)."""
