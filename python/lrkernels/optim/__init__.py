"""Optimizers built on the lrkernels ops."""

__all__ = []
