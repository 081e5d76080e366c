"""Sparse autoencoders: architectures, activation store, trainer, evaluation, file formats, splicing."""
