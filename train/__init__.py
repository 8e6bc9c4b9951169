"""Unsupervised training: LUMIR dataset reader, synthetic pairs, losses built on ``lumireg.kernels``."""
