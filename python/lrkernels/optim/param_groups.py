"""Parameter groups for the GaLore-family optimizers, picked by module name as PEFT picks its
target modules."""

import re
from typing import Iterable, List, Optional, Union

from torch import nn


def _matches(name: str, target_modules: Union[str, Iterable[str]]) -> bool:
    if isinstance(target_modules, str):  # a regular expression matched against the whole name (PEFT's rule)
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def galore_param_groups(model: nn.Module, target_modules: Union[str, Iterable[str]], rank: int, *,
                        update_proj_gap: int = 200, scale: Optional[float] = None, **group_options) -> List[dict]:
    """Param groups for :class:`GaLoreAdamW` / :class:`FiraAdamW`: the trainable 2-D parameters of
    the modules named by ``target_modules`` project their gradients onto rank ``rank``; every
    other trainable parameter gets plain AdamW (a group without ``rank``).

    ``target_modules``: module-name suffixes (``["q_proj", "v_proj"]``: a module matches when its
    qualified name is one of them or ends with ``"." + `` one of them) or one regular expression
    matched against the whole name, as in PEFT's ``LoraConfig``. ``update_proj_gap``, ``scale``
    (GaLore's α; for FiraAdamW pass ``alpha=`` instead) and ``group_options`` (``proj_type``,
    ``proj_method``, ...) go into the projected group. Raises ValueError when no module matches.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"galore_param_groups: rank must be a positive int, got {rank!r}")
    projected, seen = [], set()
    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad and p.dim() == 2 and id(p) not in seen:
                projected.append(p)
                seen.add(id(p))
    if not projected:
        raise ValueError(f"galore_param_groups: no trainable 2-D parameter in a module matching {target_modules!r}")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    group = {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, **group_options}
    if scale is not None:
        group["scale"] = scale
    return ([{"params": rest}] if rest else []) + [group]
