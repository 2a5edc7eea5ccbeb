"""Checkpoint dtype policy of the GaLore optimizers."""

import torch


class KeepsStateDtypes:
    """Mixin: ``load_state_dict`` that keeps every state tensor's saved dtype (torch.optim's
    default casts floating state to the parameter's dtype)."""

    def load_state_dict(self, state_dict):
        """Loads a checkpoint; unlike torch.optim's default, the moments keep their saved dtype
        (float32 moments of a bfloat16 weight stay float32)."""
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for sid, p in zip(saved_ids, params):
            if sid not in saved:
                continue
            st = self.state[p]
            for k, v in saved[sid].items():
                if torch.is_tensor(v):
                    st[k] = v.to(device=p.device, copy=True)
