"""Records to features: the ``Preprocessor`` (``preprocess``: schema checks, the numeric and
categorical transforms), reading a frame's columns and naming bad rows (``columns``), the numeric
transforms' parameters and block arithmetic (``numeric``), and the knot lookups behind the
quantile transform (``knot_lookup``)."""
