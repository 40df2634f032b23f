"""Dataset loading, normalisation, augmentation and sampling, in numpy only."""
