"""Per-example gradients of one *use* of a parameter, and the three things the engine asks of them.

Each time a clipped layer runs forward, its backward hands the engine, per parameter, the per-example
gradient of that use in the cheapest exact form:

* ``Factored(a, g)``: ``G_i = sum_t g_it ⊗ a_it = g_i^T a_i``. A linear weight (p, d): ``a`` its inputs (B, T, d),
  ``g`` its output gradients (B, T, p); the operand order of the kernels (``linear_norm2_*(a, g)``).
* ``OneHot(ids, g, rows)``: ``G_i = sum_t e_{ids_it} ⊗ g_it``. An embedding table (rows, d): ``g`` (B, T, d),
  zeroed at padding positions.
* ``Dense(G)``: the per-example gradients themselves (B, *shape): biases, norm weights, small LoRA factors.

The engine needs (1) per-example squared norms, (2) per-example inner products between two uses of one
parameter (tied embeddings: ``||G1 + G2||^2 = ||G1||^2 + ||G2||^2 + 2 <G1, G2>``), and (3) the clipped
sum ``sum_i c_i G_i`` (book-keeping: no second backward).

Squared norms and inner products accumulate in ``compute_dtype`` (float32, or float64 for float64
inputs). Nothing here calls ``.item()`` or otherwise syncs with the host: every loop bound is a shape.

Gram identity (the "ghost" norm), for two factored uses:
    <sum_t U_t ⊗ V_t, sum_s U'_s ⊗ V'_s> = sum_{t,s} (U_t · U'_s) (V_t · V'_s)
and with a one-hot factor, ``e_x · U'_s = U'_s[x]`` (a gather).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ghostdp import kernels

NormMethod = Literal["ghost", "instantiated"]  # the kernels' names (norm_cost)

# Largest transient a chunked computation may allocate, in elements (~256 MiB in fp32).
CHUNK_ELEMENTS = 1 << 26


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (norms and sums never accumulate in 16 bits)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _batch_chunk(per_example_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, per_example_elements))


def _row_chunk(batch: int, cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch * cols))


class PerExampleGrad:
    """One use's per-example gradient of a parameter of shape ``shape``; batch size ``batch``."""

    shape: tuple[int, ...]

    @property
    def batch(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def kept_elements(self) -> int:
        """Elements this representation keeps alive until the end of backward."""
        raise NotImplementedError  # pragma: no cover

    @property
    def dense_elements(self) -> int:
        return self.batch * math.prod(self.shape)

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-example gradients of examples [start, stop), (b, *shape), in compute dtype."""
        raise NotImplementedError  # pragma: no cover

    def norm2(self, method: NormMethod, impl: str = "torch") -> torch.Tensor:
        """(B,) squared Frobenius norms of the per-example gradients."""
        raise NotImplementedError  # pragma: no cover

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """sum_i c_i G_i, shape ``shape``, in compute dtype."""
        raise NotImplementedError  # pragma: no cover

    def add_clipped_sum_(self, c: torch.Tensor, out: torch.Tensor, impl: str = "torch",
                         accumulate: bool = True) -> None:
        """out += sum_i c_i G_i (``accumulate=False``: out = sum_i c_i G_i, its old contents never read),
        summed in compute dtype and rounded once into ``out``."""
        total = self.clipped_sum(c)
        if not accumulate:
            out.copy_(total)
        elif out.dtype == total.dtype:
            out.add_(total)
        else:  # a bf16/fp16 gradient: sum in the compute dtype, round once
            out.copy_(total + out.to(total.dtype))

    def device(self) -> torch.device:
        raise NotImplementedError  # pragma: no cover


@dataclass(eq=False)
class Dense(PerExampleGrad):
    G: torch.Tensor  # (B, *shape)

    def __post_init__(self):
        self.shape = tuple(self.G.shape[1:])

    @property
    def batch(self) -> int:
        return self.G.shape[0]

    @property
    def kept_elements(self) -> int:
        return self.G.numel()

    def device(self) -> torch.device:
        return self.G.device

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        G = self.G[start:stop]
        return G.to(compute_dtype(G))

    def norm2(self, method: NormMethod = "instantiated", impl: str = "torch") -> torch.Tensor:
        G = self.G.flatten(1)
        return G.to(compute_dtype(G)).pow(2).sum(1)

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        G = self.G.flatten(1)
        dt = compute_dtype(G, c)
        return (c.to(dt) @ G.to(dt)).view(self.shape)


@dataclass(eq=False)
class Factored(PerExampleGrad):
    """G_i = g_i^T a_i, a (B, T, d) the inputs and g (B, T, p) the output gradients: a linear layer's weight."""

    a: torch.Tensor
    g: torch.Tensor

    def __post_init__(self):
        self.shape = (self.g.shape[-1], self.a.shape[-1])

    @property
    def batch(self) -> int:
        return self.a.shape[0]

    @property
    def kept_elements(self) -> int:
        return self.a.numel() + self.g.numel()

    def device(self) -> torch.device:
        return self.a.device

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        dt = compute_dtype(self.a, self.g)
        a, g = self.a[start:stop].to(dt), self.g[start:stop].to(dt)
        return g.transpose(1, 2) @ a  # (b, p, d)

    def norm2(self, method: NormMethod, impl: str = "torch") -> torch.Tensor:
        if method == "ghost":
            return kernels.linear_norm2_ghost(self.a, self.g, impl=impl)
        return kernels.linear_norm2_instantiated(self.a, self.g, impl=impl)

    def add_clipped_sum_(self, c: torch.Tensor, out: torch.Tensor, impl: str = "torch",
                         accumulate: bool = True) -> None:
        kernels.linear_clipped_sum(self.a, self.g, c, out=out, accumulate=accumulate, impl=impl)


@dataclass(eq=False)
class OneHot(PerExampleGrad):
    """G_i = sum_t e_{ids_it} ⊗ g_it: an embedding table (rows, d) looked up at ids (B, T)."""

    ids: torch.Tensor  # (B, T) int64
    g: torch.Tensor  # (B, T, d), zero where the lookup gets no gradient (padding_idx)
    rows: int

    def __post_init__(self):
        self.shape = (self.rows, self.g.shape[-1])

    @property
    def batch(self) -> int:
        return self.g.shape[0]

    @property
    def kept_elements(self) -> int:
        return self.g.numel() + self.ids.numel()

    def device(self) -> torch.device:
        return self.g.device

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        ids, g = self.ids[start:stop], self.g[start:stop]
        b, T = ids.shape
        dt = compute_dtype(g)
        out = g.new_zeros((b * self.rows, g.shape[-1]), dtype=dt)
        flat = (torch.arange(b, device=ids.device)[:, None] * self.rows + ids).flatten()
        out.index_add_(0, flat, g.to(dt).flatten(0, 1))
        return out.view(b, self.rows, -1)

    def norm2(self, method: NormMethod, impl: str = "torch") -> torch.Tensor:
        if method == "ghost":
            return gram_inner_onehot(self.ids, self.g, self.ids, self.g)
        return self._sparse_norm2()

    def _sparse_norm2(self) -> torch.Tensor:
        """Instantiate only the non-zero rows of each G_i: sort (example, id) keys, sum g per key.

        Segments come from a cumulative sum over the sorted keys, so every buffer has a static size
        (B·T rows) and nothing waits on the host, unlike ``torch.unique``.
        """
        B, T = self.ids.shape
        dt = compute_dtype(self.g)
        if B * T == 0:
            return self.g.new_zeros(B, dtype=dt)
        keys = (torch.arange(B, device=self.ids.device)[:, None] * self.rows + self.ids).flatten()
        sorted_keys, order = keys.sort()
        is_new = torch.ones_like(sorted_keys, dtype=torch.bool)
        is_new[1:] = sorted_keys[1:] != sorted_keys[:-1]
        segment = is_new.cumsum(0) - 1  # (B·T,) segment of each sorted lookup
        sums = self.g.new_zeros((B * T, self.g.shape[-1]), dtype=dt)
        sums.index_add_(0, segment, self.g.flatten(0, 1).to(dt)[order])
        segment_example = torch.zeros_like(sorted_keys).scatter_(0, segment, sorted_keys // self.rows)
        return sums.new_zeros(B).index_add_(0, segment_example, sums.pow(2).sum(1))

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(self.g, c)
        out = self.g.new_zeros(self.shape, dtype=dt)
        out.index_add_(0, self.ids.flatten(), self._clipped_rows(c, dt))
        return out

    def _clipped_rows(self, c: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """(B·T, d): c_i g_it, the rows added at ids_it."""
        return (self.g.to(dt) * c.to(dt)[:, None, None]).flatten(0, 1)

    def add_clipped_sum_(self, c: torch.Tensor, out: torch.Tensor, impl: str = "torch",
                         accumulate: bool = True) -> None:
        """Index-add the clipped rows straight into ``out`` when it has the compute dtype: no (rows, d)
        buffer, no extra pass over the table (only the B·T looked-up rows are touched, plus a zero-fill
        when ``out`` is written rather than accumulated)."""
        dt = compute_dtype(self.g, c)
        if out.dtype != dt:
            return super().add_clipped_sum_(c, out, impl, accumulate)
        if not accumulate:
            out.zero_()
        out.index_add_(0, self.ids.flatten(), self._clipped_rows(c, dt))


def gram_inner(U1, V1, U2, V2) -> torch.Tensor:
    """(B,) sum_{t,s} (U1_t·U2_s)(V1_t·V2_s), blocked over t so no (B, T, T) buffer is stored whole."""
    dt = compute_dtype(U1, V1, U2, V2)
    B, T1 = U1.shape[:2]
    out = U1.new_zeros(B, dtype=dt)
    U2t, V2t = U2.to(dt).transpose(1, 2), V2.to(dt).transpose(1, 2)
    step = _row_chunk(B, U2.shape[1])
    for t in range(0, T1, step):
        gu = U1[:, t:t + step].to(dt) @ U2t  # (B, t', T2)
        gv = V1[:, t:t + step].to(dt) @ V2t
        out += (gu * gv).sum((1, 2))
    return out


def gram_inner_onehot(ids1, V1, ids2, V2) -> torch.Tensor:
    """(B,) sum_{t,s} [ids1_t == ids2_s] (V1_t·V2_s): two embedding lookups of one table."""
    dt = compute_dtype(V1, V2)
    B, T1 = ids1.shape
    out = V1.new_zeros(B, dtype=dt)
    V2t = V2.to(dt).transpose(1, 2)
    step = _row_chunk(B, ids2.shape[1])
    for t in range(0, T1, step):
        eq = ids1[:, t:t + step, None] == ids2[:, None, :]  # (B, t', T2)
        out += ((V1[:, t:t + step].to(dt) @ V2t) * eq).sum((1, 2))
    return out


def gram_inner_onehot_factored(ids, V1, U2, V2) -> torch.Tensor:
    """(B,) <sum_t e_{ids_t} ⊗ V1_t, sum_s U2_s ⊗ V2_s> = sum_{t,s} U2_s[ids_t] (V1_t·V2_s).

    ids, V1: the embedding use (``OneHot.ids``, ``OneHot.g``); U2, V2: the linear use's output gradient
    ``Factored.g`` (B, S, rows) and input ``Factored.a`` (B, S, d).

    The tied embedding / LM head cross term: gather the head's output-gradient columns at the input ids.
    """
    dt = compute_dtype(V1, U2, V2)
    B, T1 = ids.shape
    S = U2.shape[1]
    out = V1.new_zeros(B, dtype=dt)
    V2t = V2.to(dt).transpose(1, 2)
    step = _row_chunk(B, S)
    for t in range(0, T1, step):
        idx = ids[:, None, t:t + step].expand(B, S, -1)  # (B, S, t')
        gathered = torch.gather(U2, 2, idx).to(dt).transpose(1, 2)  # (B, t', S): U2[b, s, ids[b, t]]
        out += (gathered * (V1[:, t:t + step].to(dt) @ V2t)).sum((1, 2))
    return out


def _dense_inner(x: PerExampleGrad, y: PerExampleGrad) -> torch.Tensor:
    step = _batch_chunk(math.prod(x.shape))
    parts = [
        (x.dense(s, s + step).flatten(1) * y.dense(s, s + step).flatten(1)).sum(1)
        for s in range(0, x.batch, step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, device=x.device())


def inner(x: PerExampleGrad, y: PerExampleGrad) -> torch.Tensor:
    """(B,) per-example <G^x_i, G^y_i> of two uses of one parameter, by the Gram identity where it applies."""
    if isinstance(x, Factored) and isinstance(y, Factored):
        return gram_inner(x.g, x.a, y.g, y.a)
    if isinstance(x, OneHot) and isinstance(y, OneHot):
        return gram_inner_onehot(x.ids, x.g, y.ids, y.g)
    if isinstance(x, OneHot) and isinstance(y, Factored):
        return gram_inner_onehot_factored(x.ids, x.g, y.g, y.a)
    if isinstance(x, Factored) and isinstance(y, OneHot):
        return gram_inner_onehot_factored(y.ids, y.g, x.g, x.a)
    return _dense_inner(x, y)


def summed_norm2(uses: list[PerExampleGrad], method: NormMethod, instantiate_shared: bool, impl: str = "torch") -> torch.Tensor:
    """(B,) ||sum_k G^k_i||^2 over the uses of one parameter.

    With ``instantiate_shared`` the per-example gradients of all uses are added up densely (chunked over
    the batch); otherwise ||sum_k G^k||^2 = sum_k ||G^k||^2 + 2 sum_{k<l} <G^k, G^l>.
    """
    if len(uses) == 1:
        return uses[0].norm2(method, impl)
    if instantiate_shared:
        step = _batch_chunk(math.prod(uses[0].shape))
        parts = []
        for s in range(0, uses[0].batch, step):
            total = sum(u.dense(s, s + step) for u in uses)
            parts.append(total.flatten(1).pow(2).sum(1))
        return torch.cat(parts)
    out = sum(u.norm2(method, impl) for u in uses)
    for k in range(len(uses)):
        for m in range(k + 1, len(uses)):
            out = out + 2 * inner(uses[k], uses[m])
    return out
