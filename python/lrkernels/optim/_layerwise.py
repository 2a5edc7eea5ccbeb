"""Layer-wise stepping for the GaLore optimizers: each weight steps in its
post-accumulate-grad hook during backward and its gradient is freed at once, so gradients of
the whole model never exist together (every ``accumulation_steps``-th backward steps)."""

import torch


class LayerwiseSteps:
    """Mixin: ``layerwise=True`` support. Needs ``self.layerwise``, ``self.accumulation_steps``
    and ``self._step_param(p, group)``."""

    def _install_layerwise_hooks(self):
        self._hooks = []
        if self.layerwise:
            for group in self.param_groups:
                for p in group["params"]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    def _layerwise_hook(self, p):
        state = self.state[p]
        state["micro"] = int(state.get("micro", 0)) + 1
        if state["micro"] % self.accumulation_steps:
            return
        groups = getattr(self, "_group_of", None)
        if groups is None or id(p) not in groups:
            groups = self._group_of = {id(q): g for g in self.param_groups for q in g["params"]}
        with torch.no_grad():
            self._step_param(p, groups[id(p)])
        p.grad = None
