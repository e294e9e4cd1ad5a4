"""SparsePO's learned token-mask networks on the reference model's hidden states.

SparsePO (Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token
Masks", arXiv:2410.05102) scores every response token with a small network that reads the frozen
reference model's hidden states at the position predicting that token. ``simple_all`` is the paper's
network; the others are the variants its code defines but cannot build, made to work here:

* ``simple_all``: one LayerNorm(d) shared by all layers, then per layer l = 1..L
  ``s_l = ReLU(w_l · LN(H^l) + b_l)``, then ``m = ReLU(Σ_l a_l s_l)`` (bias-free Linear(L → 1) mixer).
* ``simple_last``: ``m = ReLU(w · LN(H^L) + b)`` on the last layer only. (The paper code has no LayerNorm
  here; it is kept for the same scale invariance as ``simple_all``.)
* ``mlp_all`` / ``mlp_last``: as ``simple_*`` with the per-layer score a two-layer MLP
  ``ReLU(W_2 ReLU(W_1 LN(H) + b_1) + b_2)``, hidden width 200. (The paper code's ``DoubleFFMaskLayer``
  has no activation between the two Linears, which collapses them into one linear map.)
* ``random``: no parameters, no gradient: U(0, 1) per response token, from a ``torch.Generator`` seeded
  at build time, so that a given seed gives the same sequence of masks (calls advance the generator; the
  state is not checkpointed). An ablation, as the paper code's ``RandomMask`` (numpy, fixed seed 42).

Layers are numbered as in :class:`sparsealign.models.logprobs.TokenOutputs` (0 = embeddings, l = after
block l); the ``*_all`` networks use 1..L (the paper drops the embedding output), ``*_last`` use L.

Initialisation (spec §3.2: the paper's mask modules get the base model's ``_init_weights``): every Linear
weight ~ N(0, 0.02), every bias 0, LayerNorm γ = 1, β = 0, drawn from a generator seeded by ``seed`` (the
global RNG is untouched). Initial masks are therefore small (per-layer scores ~0.02·√d), as in the paper.
The mixer's ReLU sees non-negative layer scores, so a mixer whose weights are all negative gives an
all-zero mask with no gradient, for good: probability 2^-L at initialisation, negligible for real models
but 1/4 for a 2-layer test model (choose the seed there).
Dropout is omitted: the paper's ``disable_dropout=True`` zeroes it. Compute is float32 whatever the
dtype of the hidden states or of the parameters.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_KINDS: tuple[str, ...] = ("simple_all", "simple_last", "mlp_all", "mlp_last", "random")
INIT_STD = 0.02
MLP_HIDDEN = 200
LAYER_NORM_EPS = 1e-5


def _linear(module: nn.Linear, x: Tensor) -> Tensor:
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x, module.weight.float(), bias)


def _new_linear(in_features: int, out_features: int, bias: bool, generator: torch.Generator) -> nn.Linear:
    """A Linear with weight ~ N(0, INIT_STD) and zero bias from ``generator`` (``skip_init`` avoids the
    default initialisation, which would draw from the global RNG)."""
    module = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
    with torch.no_grad():
        module.weight.normal_(0.0, INIT_STD, generator=generator)
        if module.bias is not None:
            module.bias.zero_()
    return module


class _LayerScore(nn.Module):
    """Per-layer score ``ReLU(w · x + b)`` or ``ReLU(W_2 ReLU(W_1 x + b_1) + b_2)``; ``x`` already normalised."""

    def __init__(self, hidden_size: int, mlp: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.hidden = _new_linear(hidden_size, MLP_HIDDEN, True, generator) if mlp else None
        self.out = _new_linear(MLP_HIDDEN if mlp else hidden_size, 1, True, generator)

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden is not None:
            x = F.relu(_linear(self.hidden, x))
        return F.relu(_linear(self.out, x)).squeeze(-1)


class MaskNetwork(nn.Module):
    """One learned mask network: shared LayerNorm, per-layer scores and (``*_all`` kinds) a mixer.

    ``forward(hidden)`` takes the ``[N, T, d]`` hidden states of :attr:`layer_ids` in that order and
    returns ``[N, T]`` non-negative float32 scores (not yet masked).
    """

    def __init__(
        self, layer_ids: list[int], hidden_size: int, mlp: bool, mix: bool, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.layer_ids = list(layer_ids)
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)  # γ = 1, β = 0 by construction
        self.scores = nn.ModuleList(_LayerScore(hidden_size, mlp, generator) for _ in self.layer_ids)
        self.mixer = _new_linear(len(self.layer_ids), 1, False, generator) if mix else None

    def forward(self, hidden: list[Tensor]) -> Tensor:
        weight, bias = self.norm.weight.float(), self.norm.bias.float()
        per_layer = [
            score(F.layer_norm(h.float(), weight.shape, weight, bias, self.norm.eps))
            for score, h in zip(self.scores, hidden, strict=True)
        ]
        if self.mixer is None:
            return per_layer[0]
        stacked = torch.stack(per_layer, dim=-1)  # [N, T, L]
        return F.relu(_linear(self.mixer, stacked)).squeeze(-1)


class RandomMask(nn.Module):
    """Uniform U(0, 1) token weights from its own seeded generator; no parameters, no gradient."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.layer_ids: list[int] = []
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, shape: torch.Size, device: torch.device) -> Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float32).to(device)


class MaskModel(nn.Module):
    """SparsePO's reward and divergence masks: one shared network or two independent ones.

    ``shared=True`` ("sparse-common", ``method.shared_mask=true``): one network whose output serves as both
    the reward mask m_u and the divergence mask m_d (the same tensor is returned twice, so gradients of
    both terms reach it; pass ``shared_mask=True`` to :func:`sparsealign.losses.sparsepo_loss` to halve the
    L1 weights). ``shared=False`` ("sparse-indp"): two networks of the same architecture with independent
    parameters (``reward`` and ``kl``).
    """

    def __init__(self, kind: str, num_layers: int, reward: nn.Module, kl: nn.Module | None) -> None:
        super().__init__()
        self.kind = kind
        self.num_layers = num_layers
        self.reward = reward
        self.kl = kl

    @property
    def shared(self) -> bool:
        return self.kl is None

    def layers(self, num_layers: int | None = None) -> list[int]:
        """The hidden-state layers (0 = embeddings, l = after block l) that :meth:`forward` needs; ask the
        log-prob path for exactly these. ``num_layers``, if given, must match the model's."""
        if num_layers is not None and num_layers != self.num_layers:
            raise ValueError(f"this mask model was built for {self.num_layers} layers, not {num_layers}")
        return list(self.reward.layer_ids)

    def _run(self, network: nn.Module, layers: Mapping[int, Tensor], mask: Tensor) -> Tensor:
        if isinstance(network, RandomMask):
            values = network(mask.shape, mask.device)
        else:
            values = network([layers[i] for i in network.layer_ids])
        return torch.where(mask.bool(), values, torch.zeros_like(values))

    def forward(self, layers: Mapping[int, Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """``layers[i]``: ``[N, T, d]`` reference hidden states at the predicting positions; ``mask``:
        ``[N, T]`` response mask. Returns ``(reward_mask, kl_mask)``, ``[N, T]`` float32, ≥ 0, zero
        outside ``mask`` (the same tensor twice when shared)."""
        if mask.dim() != 2:
            raise ValueError(f"mask must be [N, T], got shape {tuple(mask.shape)}")
        needed = self.layers()
        missing = [i for i in needed if i not in layers]
        if missing:
            raise ValueError(
                f"mask model '{self.kind}' needs hidden states of layers {needed}; missing {missing}"
            )
        for i in needed:
            if layers[i].dim() != 3 or layers[i].shape[:2] != mask.shape:
                raise ValueError(
                    f"hidden states of layer {i} must be [N, T, d] with [N, T] = {tuple(mask.shape)}, "
                    f"got shape {tuple(layers[i].shape)}"
                )
        reward = self._run(self.reward, layers, mask)
        kl = reward if self.kl is None else self._run(self.kl, layers, mask)
        return reward, kl


def _network(kind: str, num_layers: int, hidden_size: int, generator: torch.Generator) -> nn.Module:
    if kind == "random":
        return RandomMask(int(torch.randint(0, 2**62, (1,), generator=generator)))
    every = kind.endswith("_all")
    layer_ids = list(range(1, num_layers + 1)) if every else [num_layers]
    return MaskNetwork(layer_ids, hidden_size, mlp=kind.startswith("mlp"), mix=every, generator=generator)


def build_mask_model(kind: str, num_layers: int, hidden_size: int, shared: bool, seed: int) -> MaskModel:
    """Build a :class:`MaskModel` of ``kind`` (one of :data:`MASK_KINDS`) for a reference model with
    ``num_layers`` decoder blocks of width ``hidden_size``; ``shared`` selects one common network or two
    independent ones, ``seed`` their initialisation (both networks drawn from one generator, in order
    reward then KL, so they differ)."""
    if kind not in MASK_KINDS:
        close = difflib.get_close_matches(kind, MASK_KINDS, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown mask model kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}.{hint}")
    if num_layers < 1 or hidden_size < 1:
        raise ValueError(f"num_layers and hidden_size must be positive, got {num_layers} and {hidden_size}")
    generator = torch.Generator().manual_seed(seed)
    reward = _network(kind, num_layers, hidden_size, generator)
    kl = None if shared else _network(kind, num_layers, hidden_size, generator)
    return MaskModel(kind, num_layers, reward, kl)
