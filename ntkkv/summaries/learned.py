"""A learned positive feature map per layer and KV head (the "NTK" map), its file, and the `learned` summary.

φ_q(x) = exp(W_q x + b_q − ½ α |x|²) and φ_k(δ) = exp(W_k δ + b_k − ½ β |δ|²), with x = s·q
and δ = k − μ a key centred on its cluster's mean. Started at W_q = c·Ω, W_k = Ω/c, b = 0,
α = c², β = 1/c² with Ω Gaussian, E[φ_q(x)·φ_k(δ)] = exp(x·δ) (positive random features);
training then fits W and b so that the merged attention output matches full attention
(`ntkkv.training`). `init="merge"` starts instead from W ≈ 0 and no damping, where
φ_q·φ_k ≈ 1 and each cluster reads as its merged slot (mean key, mean value, log n), and learns a
correction to it. The outputs are positive, so the normaliser is too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import ClusterSummary, Summarised
from .cluster_state import ClusterState, cluster_state_size

logger = logging.getLogger(__name__)

FILE_FORMAT = "ntkkv-learned-kernel/1"  # the format string of files written so far; kept so they load
INITS = ("random", "merge")
MERGE_INIT_SPREAD = 1e-2


class LearnedFeatures(nn.Module):
    """Feature maps for `num_layers` × `kv_heads`, `num_features` features of `head_dim`-vectors."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_features: int, scale=None, seed: int = 0,
                 init: str = "random"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
        generator = torch.Generator().manual_seed(seed)
        omega = torch.randn(num_layers, kv_heads, num_features, head_dim, generator=generator)
        # c per layer and head balances the two sides: queries (s·q) and centred keys differ in size
        scale = torch.ones(num_layers, kv_heads) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        # "merge": W near 0 and no damping, so that φ_q·φ_k ≈ 1 and each cluster starts as its merged
        # slot; the small random W only breaks the symmetry between features
        spread = MERGE_INIT_SPREAD if init == "merge" else 1.0
        self.query_weight = nn.Parameter(spread * omega * scale[..., None, None])
        self.key_weight = nn.Parameter(spread * omega / scale[..., None, None])
        self.query_bias = nn.Parameter(torch.zeros(num_layers, kv_heads, num_features))
        self.key_bias = nn.Parameter(torch.zeros(num_layers, kv_heads, num_features))
        damped = 0.0 if init == "merge" else 1.0
        self.register_buffer("query_damping", damped * scale**2)
        self.register_buffer("key_damping", damped * scale**-2)
        self.num_layers, self.kv_heads, self.head_dim, self.num_features = num_layers, kv_heads, head_dim, num_features
        self.metadata: dict = {}
        self._copies: dict = {}  # frozen parameters moved to another device/dtype (layer_parameters)

    def sizes(self, r: int) -> tuple[int, int]:
        if r != self.head_dim:
            raise ValueError(f"learned features act on head_dim={self.head_dim} vectors, not {r} (no projection)")
        return self.num_features, self.num_features

    def log_features(self, x, layer_idx: int, side: str):
        """x (batch, kv_heads, ..., d) -> log φ (batch, kv_heads, ..., F)."""
        weight, bias, damping = self.layer_parameters(layer_idx, side, x)
        extra = x.dim() - 3  # dimensions between the heads and the vector
        shape = (1, self.kv_heads) + (1,) * extra
        projected = torch.einsum("bh...d,hfd->bh...f", x, weight)
        return (projected + bias.view(*shape, -1)
                - 0.5 * damping.view(*shape, 1) * (x * x).sum(dim=-1, keepdim=True)
                - 0.5 * math.log(self.num_features))

    def layer_parameters(self, layer_idx: int, side: str, like):
        """(W, b, α) of one layer and side, on `like`'s device and dtype. A frozen map (the
        inference path) keeps one copy per device and dtype: copying from the CPU at every call
        would synchronise the GPU at every layer of every decode step."""
        names = ("query_weight", "query_bias", "query_damping") if side == "query" else \
            ("key_weight", "key_bias", "key_damping")
        parameters = [getattr(self, name) for name in names]
        tensors = [parameter[layer_idx] for parameter in parameters]
        if all(t.device == like.device and t.dtype == like.dtype for t in tensors):
            return tensors
        if any(t.requires_grad for t in tensors):
            return [t.to(like) for t in tensors]
        # a map loaded under inference_mode has no version counter (nor can it be edited outside it)
        version = tuple(0 if p.is_inference() else p._version for p in parameters)
        key = (layer_idx, side, like.device, like.dtype)
        if key not in self._copies or self._copies[key][0] != version:  # an in-place edit renews the copy
            self._copies[key] = (version, [t.to(like) for t in tensors])
        return self._copies[key][1]

    def forward(self, x, layer_idx: int = 0, side: str = "key"):
        """(numerator features, normaliser features, log scale); queries come back divided by
        their largest feature (the log scale) so that exp never overflows."""
        log_phi = self.log_features(x, layer_idx, side)
        if side == "query":
            log_scale = log_phi.amax(dim=-1)
            features = (log_phi - log_scale[..., None]).exp()
        else:
            log_scale = torch.zeros_like(log_phi[..., 0])
            features = log_phi.exp()
        return features, features, log_scale

    # -- the file -------------------------------------------------------------------------------
    def save(self, path) -> None:
        torch.save({"format": FILE_FORMAT, "num_layers": self.num_layers, "kv_heads": self.kv_heads,
                    "head_dim": self.head_dim, "num_features": self.num_features,
                    "state_dict": {name: tensor.detach().cpu() for name, tensor in self.state_dict().items()},
                    "metadata": self.metadata}, path)

    @classmethod
    def load(cls, path) -> LearnedFeatures:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"learned map file {str(path)!r} does not exist (train one with "
                                    f"train_learned_map.py)")
        not_a_kernel = f"{str(path)!r} is not an ntkkv learned map file (format {FILE_FORMAT})"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, or one holding more than plain tensors and types
            # torch's own message advises weights_only=False (unpickling anything), which is wrong advice here
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "weights_only" in str(error) or "Weights only" in reason:
                reason = "it holds more than tensors and plain types"
            raise ValueError(f"{not_a_kernel}: torch.load could not read it ({reason})") from None
        if not isinstance(saved, dict) or saved.get("format") != FILE_FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{not_a_kernel}; found format {found!r}")
        shape = tuple(saved.get(name) for name in ("num_layers", "kv_heads", "head_dim", "num_features"))
        if not all(isinstance(size, int) and size > 0 for size in shape):
            raise ValueError(f"{not_a_kernel}; its (layers, kv_heads, head_dim, features) are {shape}")
        features = cls(*shape)
        try:
            features.load_state_dict(saved["state_dict"])
        except (KeyError, RuntimeError) as error:  # tensors missing, or not of the declared shape
            raise ValueError(f"{str(path)!r}: its tensors do not match its declared (layers, kv_heads, head_dim, "
                             f"features) = {shape}: {error}") from error
        features.metadata = saved.get("metadata", {})
        return features

    def check_model(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        expected = (self.num_layers, self.kv_heads, self.head_dim)
        if expected != (num_layers, kv_heads, head_dim):
            raise ValueError(f"the learned map was trained for (layers, kv_heads, head_dim) = {expected}, "
                             f"this model has {(num_layers, kv_heads, head_dim)}")


@dataclass
class Learned(ClusterSummary):
    """A learned feature map ("NTK") per layer and KV head, applied around each cluster's mean key.

    path: the file `train_learned_map.py` writes; or features: a `LearnedFeatures` in memory
    (straight after training). One of the two.
    """

    path: str | None = None
    features: LearnedFeatures | None = None

    name = "learned"

    def __post_init__(self):
        super().__post_init__()
        if (self.path is None) == (self.features is None):
            raise ValueError("summary 'learned' needs summary_path: a file written by train_learned_map.py")
        if self.features is None:
            self.features = LearnedFeatures.load(self.path).requires_grad_(False)
        elif not isinstance(self.features, LearnedFeatures):
            raise TypeError(f"features must be LearnedFeatures, got {type(self.features).__name__}")
        trained = self.features.metadata.get("settings", {})
        for setting in ("route", "fit_kept"):
            if setting in trained and bool(trained[setting]) != getattr(self, setting):
                logger.info("learned map %s was trained with %s=%s and is used with %s=%s", self.path, setting,
                            trained[setting], setting, getattr(self, setting))

    def cluster_cost(self, head_dim):
        return cluster_state_size(self.features, head_dim, 1)

    def check_model(self, num_layers, kv_heads, head_dim):
        self.features.check_model(num_layers, kv_heads, head_dim)

    def summarise_clusters(self, keys, values, assignment, clusters, layer_idx, window_queries, scaling):
        state = ClusterState(self.features, layer_idx)
        return Summarised(state=state.build(keys, values, assignment, clusters))
