"""What compress_kv_heads returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class LayerReport:
    index: int
    groups: List[List[int]]          # old KV heads merged into each new KV head
    key_energy_kept: float           # of the objective's matrix (NaN for "mean")
    value_energy_kept: float
    output_refit_gain: Optional[float] = None  # o_proj refit: calibration error after / before (≤ 1)
    mlp_refit_gain: Optional[float] = None     # refit_mlp: the same for the MLP's output linear


@dataclass
class CompressionReport:
    architecture: str
    method: str
    options: Dict[str, object]
    kv_heads_before: int
    kv_heads_after: int
    num_layers: int
    head_dim: int
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    calibration_tokens: int
    seconds: float
    layers: List[LayerReport] = field(default_factory=list)
    quality: Dict[str, float] = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [f"{self.architecture}: {self.kv_heads_before} -> {self.kv_heads_after} KV heads "
                 f"({self.method}, {self.num_layers} layers, {self.calibration_tokens} calibration tokens, "
                 f"{self.seconds:.1f} s)",
                 f"KV cache per token: {self.kv_cache_bytes_per_token_before} -> "
                 f"{self.kv_cache_bytes_per_token_after} bytes"]
        if self.layers and self.layers[0].key_energy_kept == self.layers[0].key_energy_kept:
            lines.append("energy kept per layer (keys / values): " + ", ".join(
                f"{r.key_energy_kept:.2f}/{r.value_energy_kept:.2f}" for r in self.layers))
        for k, v in self.quality.items():
            lines.append(f"{k}: {v:.4g}")
        return "\n".join(lines)
