"""Detection quality on labelled data: metrics (``metrics``) and the HTML / JSON report
(``report``) behind ``anomaly evaluate``."""
