"""Low-rank adaptation (LoRA) of frozen nn.Linear layers, written out by hand.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) keeps a
pretrained weight W (out, in) frozen and learns an update of rank r as the product of two small factors:

    y = W x + b + (alpha / r) * B A x,        A: (r, in),  B: (out, r)

U2A (paper section 3, eq. 3: the learnable parameters Delta_{f,m}; section 4.2 and supplementary Table 5)
inserts LoRA with rank 1, alpha 1 and dropout 0.1 into the query, key, value and output projections
(`q_proj`, `k_proj`, `v_proj`, `out_proj` in encoders.py) of every transformer block of each frozen
encoder. With rank 1 one adapted 768x768 projection learns 768 + 768 numbers instead of 590,592.

Layout follows microsoft/LoRA loralib/layers.py: `scaling = alpha / r`, the factors are created on the base
weight's device and dtype, parameters are named `lora_A` / `lora_B` so they can be picked out by the
`lora_` prefix, and a `merged` flag guards folding B A into W for inference.
"""
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + (alpha/rank) * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int = 1, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, found {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, found {rank}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1], found {dropout}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank  # alpha/r: changing r does not require re-tuning the learning rate (LoRA sec. 4.1)
        w = base.weight  # factors live where the pretrained weight lives, in its dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=w.device, dtype=w.dtype))
        # dropout regularises the update only: the pretrained path must see the input untouched
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self):
        # A like nn.Linear's default weight init (kaiming_uniform_ with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))),
        # B = 0. Then B A = 0: a fresh adapter is exactly the pretrained layer, so training starts from the
        # pretrained model. A must NOT also be zero: the gradient of A is proportional to B and that of B to A,
        # so two zero factors would never move. (loralib's comment on this swaps A and B; tests/test_lora.py
        # checks the actual values.)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, N, out)
        if self.merged:  # B A already folded into base.weight
            return y
        # left to right: x A^T is a (B, N, rank) intermediate, far cheaper than forming the (out, in) B A
        # scaling applied to the (B, N, r) intermediate, not the (B, N, out) result: the same product, r/out the work
        h = (self.dropout(x) @ self.lora_A.T) * self.scaling  # (B, N, in) @ (in, r) -> (B, N, r)
        return y + h @ self.lora_B.T  # (B, N, r) @ (r, out) -> (B, N, out)

    @torch.no_grad()
    def merge(self):
        """Fold scaling * B A into base.weight: inference then costs one matmul. Merging twice is an error
        (it would add the update twice). While merged, the LoRA factors get no gradient: merge for
        inference or export only, and save adapters with lora_state_dict (unaffected by merging)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged (call unmerge() first)")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again (exact up to floating-point rounding). Unmerging an unmerged layer is an error."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def add_lora(model: nn.Module, targets, rank: int = 1, alpha: float = 1.0, dropout: float = 0.0) -> list[str]:
    """Replace, in place, every nn.Linear child whose attribute name is in `targets` by a LoRALinear wrapping
    it; every name in `targets` must match one at least. Returns the dotted paths of the replaced modules.
    (U2A's targets and settings: u2a.U2AConfig.)"""
    # collect first, replace after: swapping children while walking named_modules() would change the walk
    found = [(parent_name, parent, name, child)
             for parent_name, parent in model.named_modules()
             for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    if not found:
        raise ValueError(f"add_lora: no nn.Linear named any of {list(targets)} in {type(model).__name__}; "
                         f"nn.Linear names found: {linears}")
    unmatched = [t for t in targets if t not in {name for _, _, name, _ in found}]
    if unmatched:  # a typo (peft's "o_proj" for out_proj) would silently leave that projection unadapted
        raise ValueError(f"add_lora: targets {unmatched} match no nn.Linear in {type(model).__name__}; "
                         f"nn.Linear names found: {linears}")
    paths = []
    for parent_name, parent, name, child in found:
        setattr(parent, name, LoRALinear(child, rank=rank, alpha=alpha, dropout=dropout))
        paths.append(f"{parent_name}.{name}" if parent_name else name)
    return paths


def mark_only_lora_as_trainable(model: nn.Module, also=()):
    """requires_grad True for parameters named `...lora_...` or starting with a prefix in `also` (e.g. the
    classifier head and U2A's CLS / mask tokens); False for everything else."""
    also = tuple(also)
    unused = set(also)
    for name, p in model.named_parameters():
        hits = {prefix for prefix in also if name.startswith(prefix)}
        unused -= hits
        p.requires_grad_("lora_" in name or bool(hits))
    if unused:  # a typo here would silently freeze a part meant to be trained
        raise ValueError(f"mark_only_lora_as_trainable: no parameter name starts with {sorted(unused)}")


def merge_lora(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def lora_state_dict(model: nn.Module) -> dict:
    """Only the LoRA factors: a few KB to save instead of the whole frozen encoders."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_table(model: nn.Module, depth: int = 1) -> str:
    """Trainable and total parameters per part of the model: parameters grouped by the first `depth`
    components of their name (depth=1: one row per top-level child), then a total line."""
    rows = {}  # part name -> [trainable, total], in model order
    for name, p in model.named_parameters():
        part = ".".join(name.split(".")[:depth])
        row = rows.setdefault(part, [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel()
    trainable, total = count_parameters(model)
    width = max([len("part")] + [len(part) for part in rows])
    lines = [f"{'part':<{width}}  {'trainable':>13}  {'total':>13}"]
    lines += [f"{part:<{width}}  {t:>13,}  {n:>13,}" for part, (t, n) in rows.items()]
    share = 100.0 * trainable / max(total, 1)
    lines.append(f"{'total':<{width}}  {trainable:>13,}  {total:>13,}  ({share:.2f}% trainable)")
    return "\n".join(lines)
