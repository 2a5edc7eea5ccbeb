"""Bridges to the libraries lrkernels drops into (transformers, PEFT) and offline real models.

Each submodule imports its peer lazily, so ``import lrkernels`` never needs transformers or peft.
"""
