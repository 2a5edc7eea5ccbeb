"""FSDP2 (DTensor) support of the GaLore optimizers: projected weights sharded on dim 0 over a
1-D mesh, with replicated projectors and moments and r-sized all-reduces."""

import torch


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class ShardedProjection:
    """Mixin: the sharded form of the projected step. Needs ``_refresh_due``, ``_refresh`` and
    ``_check_finite``."""

    def _prepare_sharded(self, p, w):
        """FSDP2 (DTensor sharded on dim 0 over a 1-D mesh). The projector and the moments are
        replicated: every rank computes the same ones. R is assembled from the shards with one
        all-reduce of an r-sized tensor (Pᵀ G = Σ_k P_kᵀ G_k for a left projection; the rows
        G_k Pᵀ for a right one), so the full gradient is only gathered at refresh steps, for the
        SVD. Each rank then writes its own rows of W."""
        import torch.distributed as dist
        from torch.distributed.tensor import Shard
        group, state = w["group"], w["state"]
        placements = p.placements
        if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise NotImplementedError(f"{type(self).__name__}: DTensor parameters must be sharded on dim 0 over a "
                                      f"1-D mesh (FSDP2 fully_shard), got placements {placements}")
        mesh = p.device_mesh
        world, me = mesh.size(), mesh.get_local_rank()
        chunk = -(-p.shape[0] // world)  # torch.chunk's split, which FSDP2 uses
        local = p.to_local()
        offset = min(me * chunk, p.shape[0])
        rows = slice(offset, offset + local.shape[0])
        g_local = p.grad.to_local().contiguous()
        w.update(weight=local, grad=g_local, row_offset=offset, pg=mesh.get_group(), full_rows=p.shape[0])
        if self._refresh_due(group, state, p):
            full = p.grad.full_tensor()
            if not self._check_finite(full, p, state):
                return None
            self._refresh(p, full, group, state)
            del full
        proj = state["projector"]
        if state["project_left"]:
            r_grad = proj[rows].t() @ g_local
        else:
            r_grad = g_local.new_zeros((p.shape[0], proj.shape[0]))
            r_grad[rows] = g_local @ proj.t()
        dist.all_reduce(r_grad, group=w["pg"])
        w["check"] = w["r_grad"] = r_grad
        return w


