"""Records to features: the schema checks and the numeric and categorical transforms
(``preprocess``), with the knot lookups behind the quantile transform (``knot_lookup``)."""
