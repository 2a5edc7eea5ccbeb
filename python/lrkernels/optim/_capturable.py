"""capturable mode of the GaLore optimizers: the step count lives in a device tensor and the
projector refreshes move out of ``step()`` into :meth:`prepare_step`, so ``step()`` has no host
synchronisation and no step-dependent Python value (one compiled graph, CUDA-graph capturable)."""

import torch


class CapturableSteps:
    """Mixin: ``prepare_step()``. Needs ``self.capturable``, ``_refresh_due`` and ``_refresh``."""

    @torch.no_grad()
    def prepare_step(self):
        """capturable mode: refreshes the projectors due at the coming step (the same schedule
        as without capturable). Call it eagerly, once, before each ``step()``; it reads the
        gradients, so after backward."""
        if not self.capturable:
            return
        for group in self.param_groups:
            if group.get("rank") is None:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if self._refresh_due(group, state, p):
                    self._refresh(p, p.grad.contiguous(), group, state)
                state["host_step"] = int(state.get("host_step", 0)) + 1
