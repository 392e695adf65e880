"""The detectors. Each module imports on its own:
``from anomaly.estimator.detectors.vae import VAEDetector`` does not import the flow or GAN code."""
