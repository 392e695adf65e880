"""The estimator: ``AnomalyModel`` (``model``), its detectors (``detectors``), the conformal
calibration of their scores (``calibration``), the ensemble that combines them (``ensemble``) and
the bundle format it is saved in (``bundle``)."""
