"""Tests for lora.py: the math against peft's LoRA, init, merge, dropout placement, freezing, and counts."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, add_lora, count_parameters, lora_state_dict, mark_only_lora_as_trainable,
                  merge_lora, parameter_table, unmerge_lora)

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class TinyAttention(nn.Module):
    """Same Linear names as encoders.Attention; simple enough that every projection affects the output."""

    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):  # (B, N, D)
        att = (self.q_proj(x) @ self.k_proj(x).transpose(-2, -1)).softmax(-1)  # (B, N, N)
        return self.out_proj(att @ self.v_proj(x))


class TinyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = TinyAttention(dim)
        self.fc1 = nn.Linear(dim, dim)  # not a target: must stay a plain frozen Linear

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc1(x)


class TinyModel(nn.Module):
    def __init__(self, dim=16, depth=3, num_classes=5):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # (B, N, D) -> (B, C)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def randomize_B(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()


def test_init_A_kaiming_B_zero():
    # loralib's reset_parameters comment swaps A and B: check the actual values
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(768, 64), rank=4)
    bound = 1 / math.sqrt(768)  # kaiming_uniform_(a=sqrt(5)) on fan_in=768, same as nn.Linear's default
    assert layer.lora_A.shape == (4, 768) and layer.lora_B.shape == (64, 4)
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound  # really spread over the kaiming range, not tiny or zero
    assert (layer.lora_A != 0).all()
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.scaling == 1.0 / 4


def test_first_step_gradient_reaches_B_not_A():
    # why B (not A) starts at zero and A must not: with B = 0, dL/dA = 0 but dL/dB != 0, so training moves
    # B first; if both were zero neither would ever get a gradient
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2)
    layer(torch.randn(3, 8)).square().sum().backward()
    assert torch.all(layer.lora_A.grad == 0)
    assert layer.lora_B.grad.abs().sum() > 0


def test_fresh_adapter_is_the_pretrained_layer():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    x = torch.randn(2, 7, 32)
    expected = base(x)
    layer = LoRALinear(base, rank=1, alpha=1.0)
    assert torch.equal(layer(x), expected)


def test_factors_follow_base_dtype():
    layer = LoRALinear(nn.Linear(4, 3).double())
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.lora_A.device == layer.base.weight.device


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 8.0)])
def test_merge_equals_unmerged_and_unmerge_restores(rank, alpha):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24).double(), rank=rank, alpha=alpha)
    randomize_B(layer)
    w0 = layer.base.weight.clone()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, layer.base(x))  # the adapter does something
    layer.merge()
    assert layer.merged and not torch.allclose(layer.base.weight, w0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 8.0)])
def test_matches_peft_lora(rank, alpha):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = TinyModel()
    theirs = peft.get_peft_model(copy.deepcopy(ours),
                                 peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=list(TARGETS)))
    paths = add_lora(ours, TARGETS, rank=rank, alpha=alpha)
    randomize_B(ours)  # with B = 0 both would trivially equal the base model
    # copy our factors into peft's adapter: same A, B -> outputs must agree
    peft_modules = dict(theirs.base_model.model.named_modules())
    for path in paths:
        mine, ref = ours.get_submodule(path), peft_modules[path]
        assert ref.scaling["default"] == mine.scaling
        with torch.no_grad():
            ref.lora_A["default"].weight.copy_(mine.lora_A)
            ref.lora_B["default"].weight.copy_(mine.lora_B)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    # the trainable sets agree too: peft also freezes everything but its lora_ factors
    mark_only_lora_as_trainable(ours)
    assert count_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=2, dropout=1.0)  # p=1 drops the whole LoRA input in train mode
    randomize_B(layer)
    x = torch.randn(4, 16)
    layer.train()
    # the base path sees x untouched (dropout on it would leave only the bias), the LoRA branch sees zeros
    assert torch.equal(layer(x), base(x))
    layer.eval()  # no dropout at eval: the update is back
    expected = base(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), base(x))


def test_add_lora_replaces_exactly_the_named_projections():
    model = TinyModel(depth=3)
    paths = add_lora(model, TARGETS, rank=1, alpha=1.0, dropout=0.1)
    assert len(paths) == 3 * 4
    assert set(paths) == {f"blocks.{i}.attn.{n}" for i in range(3) for n in TARGETS}
    loras = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert sorted(loras) == sorted(paths)
    assert all(isinstance(model.blocks[i].fc1, nn.Linear) for i in range(3))  # not a target
    assert isinstance(model.head, nn.Linear)
    assert "rank=1, alpha=1.0" in repr(model.blocks[0].attn.q_proj)
    assert isinstance(model.blocks[0].attn.q_proj.dropout, nn.Dropout)


def test_add_lora_raises_when_nothing_matches():
    with pytest.raises(ValueError, match=r"query.*nn.Linear names found: \['fc1', 'head'"):
        add_lora(TinyModel(), targets=("query",))
    model = TinyModel()
    add_lora(model, TARGETS)
    with pytest.raises(ValueError, match="no nn.Linear named"):  # already wrapped: nothing left to wrap
        add_lora(model, TARGETS)


def test_add_lora_raises_when_a_target_matches_nothing():
    """peft's name for the output projection is often "o_proj": with it among the targets, add_lora wrapped
    q, k, v only and said nothing (seen: 9 of 12 projections adapted), a quarter of the paper's LoRA missing."""
    model = TinyModel(depth=3)
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no nn.Linear.*out_proj"):
        add_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before any is wrapped

def test_mark_only_lora_as_trainable():
    model = TinyModel()
    add_lora(model, TARGETS)
    mark_only_lora_as_trainable(model, also=("head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.attn.{t}.lora_{f}" for i in range(3) for t in TARGETS for f in "AB"}
    assert trainable == expected | {"head.weight", "head.bias"}
    mark_only_lora_as_trainable(model)  # without `also` the head is frozen again
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    with pytest.raises(ValueError, match="heda"):
        mark_only_lora_as_trainable(model, also=("heda",))


def test_training_step_changes_only_lora_and_also():
    torch.manual_seed(0)
    model = TinyModel()
    add_lora(model, TARGETS, dropout=0.1)
    mark_only_lora_as_trainable(model, also=("head",))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # every parameter goes to AdamW, with weight decay: frozen ones must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.02)
    model.train()
    for _ in range(2):  # step 1 only moves B (A's gradient is 0 while B = 0); step 2 moves A as well
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 6, 16)), torch.randint(0, 5, (4,)))
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in n or n.startswith("head")), n
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" in n or n.startswith("head"):
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_merge_lora_over_model_and_state_dict():
    torch.manual_seed(0)
    model = TinyModel().double()
    add_lora(model, TARGETS, rank=2, alpha=2.0)
    randomize_B(model)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    unmerged = model(x)
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)
    unmerge_lora(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 3 * 4 and all(".lora_A" in k or ".lora_B" in k for k in sd)
    # the adapters alone restore the adapted model on a fresh copy with the same frozen weights
    torch.manual_seed(0)
    fresh = TinyModel().double()
    add_lora(fresh, TARGETS, rank=2, alpha=2.0)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    torch.testing.assert_close(fresh(x), unmerged)


def test_count_parameters_by_hand():
    class OneProj(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(768, 768)
            self.head = nn.Linear(768, 10)

    model = OneProj()
    base_total = 768 * 768 + 768 + 768 * 10 + 10
    assert count_parameters(model) == (base_total, base_total)
    add_lora(model, ("q_proj",), rank=1)
    mark_only_lora_as_trainable(model)
    assert count_parameters(model) == (768 + 768, base_total + 768 + 768)  # rank 1 adds A (1,768) + B (768,1)
    table = parameter_table(model)
    lines = table.splitlines()
    assert lines[1].split() == ["q_proj", "1,536", f"{768 * 768 + 768 + 1536:,}"]
    assert lines[2].split() == ["head", "0", "7,690"]
    share = 100 * 1536 / (base_total + 1536)
    assert lines[-1].startswith("total") and f"({share:.2f}% trainable)" in lines[-1]


def test_lora_dropout_is_nn_dropout_on_the_branch_input():
    """Train mode with 0 < p < 1: the branch sees nn.Dropout's mask on x (kept entries scaled by 1/(1-p)),
    the base path sees x itself."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=2, dropout=0.5).train()
    randomize_B(layer)
    x = torch.randn(4, 16)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, p=0.5, training=True)  # the same mask, drawn from the same seed
    assert not torch.equal(dropped, x)
    expected = layer.base(x) + layer.scaling * dropped @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y, expected)
