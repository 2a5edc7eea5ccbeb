"""merge() / unmerge() shared by the adapter layers that sit on a frozen base linear."""

import torch
from torch import nn


class MergeableAdapter:
    """Mixin for an nn.Module with ``weight``, ``bias``, ``merged`` and ``delta_weight()``:
    merging folds ΔW into the base weight so forward runs the base linear alone."""

    @torch.no_grad()
    def merge(self):
        """Fold ΔW into the base weight; forward then runs the base linear alone."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: already merged")
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract ΔW from the base weight again (up to rounding in low precision)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: not merged")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def merged_forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)
