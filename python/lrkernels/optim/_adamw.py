"""The AdamW step (HF-style eps, decoupled weight decay) shared by the GaLore optimizers: the
plain step of unprojected parameters, the moments' dtype and the bias-corrected step size."""

import math

import torch

from ..ops.galore import galore_adam_moments


class AdamWSteps:
    """Mixin: AdamW for parameters without ``rank``, and the step-size and moment-dtype rules
    the projected step shares."""

    def _moment_dtype(self, group, p):
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _step_size(self, group, step):
        lr = group["lr"]
        if not group["correct_bias"]:
            return lr
        beta1, beta2 = group["betas"]
        if torch.is_tensor(step):  # capturable: a tensor, no host value to specialise on
            return lr * (1.0 - beta2 ** step).sqrt() / (1.0 - beta1 ** step)
        return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    def _adamw_finish(self, w):
        local, g, group, state = w["weight"], w["grad"], w["group"], w["state"]
        if "exp_avg" not in state:
            dt = self._moment_dtype(group, local)
            state["exp_avg"] = torch.zeros(local.shape, dtype=dt, device=local.device)
            state["exp_avg_sq"] = torch.zeros(local.shape, dtype=dt, device=local.device)
        beta1, beta2 = group["betas"]
        n = galore_adam_moments(state["exp_avg"], state["exp_avg_sq"], g, beta1=beta1, beta2=beta2,
                                eps=group["eps"])
        state["step"] += 1
        step_size = self._step_size(group, state["step"])
        if torch.is_tensor(step_size):
            local.add_((n * -step_size).to(local.dtype))
        else:
            local.add_(n.to(local.dtype), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            local.add_(local, alpha=-group["lr"] * group["weight_decay"])
