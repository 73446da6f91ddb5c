"""
The three frozen pretrained encoders of U2A, written by hand in plain PyTorch.

U2A (paper section 3) keeps one pretrained transformer per modality frozen and splits each into two pieces:
  - eq. 1, the embedding layer: input -> token sequence, with the pretrained class token at index 0 and
    position embeddings added (`embed`);
  - eq. 3, the encoder stack f_m: any token sequence -> same-shaped sequence (`encode`). U2A runs it on
    [CLS, tokens, MT] and trains only the LoRA factors that lora.py puts on its attention projections.

The checkpoints (the reference code is transformers' models/clip/modeling_clip.py, models/bert/modeling_bert.py
and models/audio_spectrogram_transformer/modeling_audio_spectrogram_transformer.py; their key names: LAYOUTS):
  - ViT : vision tower of CLIP ViT-B/16 (openai/clip-vit-base-patch16), pre-LN, quick_gelu.
  - BERT: bert-base-uncased (or any BertModel file such as MiniLM), post-LN, erf GELU.
  - AST : Audio Spectrogram Transformer (MIT/ast-finetuned-audioset-10-10-0.4593), pre-LN, erf GELU.
All three share one `Attention`, `MLP` and `Block`; they differ only in their embeddings and norm placement.
`from_pretrained` reads the published safetensors files directly (no transformers at runtime).

There is no dropout anywhere in this file: the encoders are frozen, so their dropout would only add noise;
the LoRA branch's own dropout (lora.py) is U2A's only regulariser.
"""
import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

INIT_STD = 0.02  # random init only matters without a checkpoint (tests); from_pretrained overwrites it all


# ----------------------------------------------------------------------------------------------------------
# Shared building blocks


class Attention(nn.Module):
    """Multi-head self-attention. lora.py wraps exactly q_proj, k_proj, v_proj and out_proj."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"hidden size {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, keep=None):
        """keep: positions whose output is kept (None = all), (B, S, D) -> (B, Q, D); keys and values
        always come from every token."""
        B, S, D = x.shape
        xq = x if keep is None else x[:, keep]  # (B, Q, D)
        Q = xq.shape[1]
        q = self.q_proj(xq).view(B, Q, self.heads, -1).transpose(1, 2)  # (B, H, Q, D/H)
        k = self.k_proj(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, D/H)
        v = self.v_proj(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, D/H)
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, S): the same keys are hidden from every head and query
        # None keeps SDPA free to pick its fastest kernel; the default scale is (D/H)^-0.5 as in all three models
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, D/H)
        y = y.transpose(1, 2).reshape(B, Q, D)  # (B, Q, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (B, S, D)


def quick_gelu(x):
    """CLIP's GELU approximation x * sigmoid(1.702 x); using erf GELU instead would drift from the pretrained
    CLIP weights. Written through silu(z) = z * sigmoid(z), the same function: silu is one kernel with a
    one-kernel backward, so autograd keeps one activation instead of two (x and sigmoid(1.702 x)) and skips
    three elementwise passes; ~3% of a CPU training step of U2A (tests/bench.py)."""
    return F.silu(1.702 * x) / 1.702


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # transformers' "gelu" is the exact erf GELU


class Block(nn.Module):
    """One transformer layer. CLIP and AST normalise before each sub-layer, BERT after the residual sum."""

    def __init__(self, dim, heads, mlp_hidden, act, eps, pre_norm):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden, act)

    def forward(self, x, mask=None, keep=None):
        """keep: positions whose output is kept (None = all): (B, S, D) -> (B, Q, D). Attention reads
        every token; everything after it runs on the kept rows only."""
        rows = x if keep is None else x[:, keep]  # (B, Q, D): their residual stream
        if self.pre_norm:
            x = rows + self.attn(self.norm1(x), mask, keep)  # (B, Q, D)
            x = x + self.mlp(self.norm2(x))
        else:
            x = self.norm1(rows + self.attn(x, mask, keep))  # (B, Q, D)
            x = self.norm2(x + self.mlp(x))
        return x


def make_blocks(cfg, pre_norm):
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}")
    act = ACTIVATIONS[cfg.hidden_act]
    return nn.ModuleList(
        Block(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, act, cfg.layer_norm_eps, pre_norm)
        for _ in range(cfg.num_hidden_layers)
    )


def run_blocks(blocks, h, mask=None, keep=None):
    """h (B, S, D) through every block. With `keep` (positions, e.g. U2A's [0, -1] for CLS and MT) the last
    block computes only those rows, (B, len(keep), D): no block follows to mix them with the others, so
    the other rows would be computed only to be thrown away (~1/12 of a 12-block encoder's work)."""
    for block in blocks[:-1]:
        h = block(h, mask)
    return blocks[-1](h, mask, keep)


@dataclass
class Config:
    """What make_blocks reads, shared by the three config dataclasses; the defaults are the base-size stack
    (768 wide, 12 blocks) that all three checkpoints use. Reads the fields it knows from a transformers
    config.json, ignoring the rest."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # transformers' "gelu" is the exact erf GELU (BERT, AST)
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            d = json.load(f)
        d = d.get("vision_config", d)  # a full CLIPConfig nests the vision tower; every other config.json is flat
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# ----------------------------------------------------------------------------------------------------------
# ViT: the vision tower of CLIP ViT-B/16


@dataclass
class ViTConfig(Config):
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


class ViT(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or ViTConfig()
        D, P = cfg.hidden_size, cfg.patch_size
        num_patches = (cfg.image_size // P) ** 2
        self.class_embedding = nn.Parameter(torch.randn(D) * INIT_STD)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, kernel_size=P, stride=P, bias=False)  # CLIP: no bias
        self.position_embedding = nn.Embedding(1 + num_patches, D)
        nn.init.normal_(self.position_embedding.weight, std=INIT_STD)
        self.pre_layrnorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # (sic) the checkpoint's spelling
        self.blocks = make_blocks(cfg, pre_norm=True)
        self.final_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # CLIP's post_layernorm: CLIP applies it to
        # its class-token output (pooler_output), not to last_hidden_state, so encode leaves it to the caller

    def embed(self, pixel_values):
        """eq. 1: (B, 3, H, W) -> (B, 1+N, D), class embedding first, positions added."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1+N, D)

    def encode(self, h, mask=None, keep=None):
        """eq. 3, f_m: (B, S, D) -> (B, S, D), or the `keep` positions only (run_blocks). CLIP normalises
        the embedded sequence before its blocks."""
        return run_blocks(self.blocks, self.pre_layrnorm(h), mask, keep)

    def class_token(self):
        return self.class_embedding + self.position_embedding.weight[0]  # (D,)

    def forward(self, pixel_values):
        return self.encode(self.embed(pixel_values))  # (B, 1+N, D) == CLIPVisionModel last_hidden_state

    @classmethod
    def from_pretrained(cls, path, config=None, device=None, dtype=None):
        return load_pretrained(cls, ViTConfig, path, config, device, dtype)


# ----------------------------------------------------------------------------------------------------------
# BERT: bert-base-uncased and other BertModel checkpoints (e.g. MiniLM)


@dataclass
class BERTConfig(Config):
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    cls_token_id: int = 101  # [CLS] in the uncased WordPiece vocab: its embedding is BERT's class token


class BERT(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or BERTConfig()
        D = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, D)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=INIT_STD)
        self.embed_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.blocks = make_blocks(cfg, pre_norm=False)
        self.final_norm = nn.Identity()  # post-LN: the last block already ends in a LayerNorm

    def embed(self, input_ids, token_type_ids=None):
        """eq. 1: (B, L) token ids -> (B, L, D); input_ids[:, 0] is [CLS]."""
        L = input_ids.shape[1]
        if L > self.config.max_position_embeddings:
            raise ValueError(f"{L} tokens, but BERT has {self.config.max_position_embeddings} positions")
        pos = self.position_embeddings.weight[:L]  # (L, D), positions start at 0
        if token_type_ids is None:
            typ = self.token_type_embeddings.weight[0]  # (D,): every token is sentence A
        else:
            typ = self.token_type_embeddings(token_type_ids)  # (B, L, D)
        return self.embed_norm(self.word_embeddings(input_ids) + pos + typ)  # (B, L, D)

    def encode(self, h, mask=None, keep=None):
        """eq. 3, f_m: (B, S, D) -> (B, S, D), or the `keep` positions only (run_blocks); mask (B, S) bool,
        True = real token."""
        return run_blocks(self.blocks, h, mask, keep)

    def class_token(self):
        cls = self.word_embeddings.weight[self.config.cls_token_id]  # (D,)
        return self.embed_norm(cls + self.position_embeddings.weight[0] + self.token_type_embeddings.weight[0])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = None if attention_mask is None else attention_mask.bool()  # (B, L), 1/True = real token
        return self.encode(self.embed(input_ids, token_type_ids), mask)  # (B, L, D) == BertModel last_hidden_state

    @classmethod
    def from_pretrained(cls, path, config=None, device=None, dtype=None):
        return load_pretrained(cls, BERTConfig, path, config, device, dtype)


# ----------------------------------------------------------------------------------------------------------
# AST: Audio Spectrogram Transformer


@dataclass
class ASTConfig(Config):
    max_length: int = 1024  # frames (time)
    num_mel_bins: int = 128  # frequency
    patch_size: int = 16
    frequency_stride: int = 10  # patches overlap by 6 in both directions
    time_stride: int = 10


class AST(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or ASTConfig()
        D, P = cfg.hidden_size, cfg.patch_size
        freq_patches = (cfg.num_mel_bins - P) // cfg.frequency_stride + 1  # 12
        time_patches = (cfg.max_length - P) // cfg.time_stride + 1  # 101
        num_patches = freq_patches * time_patches  # 1212
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * INIT_STD)
        self.distillation_token = nn.Parameter(torch.randn(1, 1, D) * INIT_STD)  # from DeiT, AST's initialisation
        self.patch_embedding = nn.Conv2d(1, D, kernel_size=P, stride=(cfg.frequency_stride, cfg.time_stride))
        self.position_embeddings = nn.Parameter(torch.randn(1, 2 + num_patches, D) * INIT_STD)
        self.blocks = make_blocks(cfg, pre_norm=True)
        self.layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.final_norm = nn.Identity()  # the final layernorm is already the last step of encode

    def embed(self, fbank):
        """eq. 1: (B, T, F) = (B, 1024, 128) fbank -> (B, 2+N, D) = (B, 1214, D)."""
        x = fbank.to(self.patch_embedding.weight.dtype)
        x = x.unsqueeze(1).transpose(2, 3)  # (B, 1, F, T): frequency is the image height
        x = self.patch_embedding(x)  # (B, D, 12, 101)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), frequency-major: index = f * 101 + t
        B = x.shape[0]
        special = [self.cls_token.expand(B, -1, -1), self.distillation_token.expand(B, -1, -1)]  # 2 x (B, 1, D)
        return torch.cat([*special, x], dim=1) + self.position_embeddings  # (B, 2+N, D)

    def encode(self, h, mask=None, keep=None):
        """eq. 3, f_m: (B, S, D) -> (B, S, D), or the `keep` positions only (run_blocks), including AST's
        final layernorm."""
        return self.layernorm(run_blocks(self.blocks, h, mask, keep))

    def class_token(self):
        return (self.cls_token + self.position_embeddings[:, 0]).view(-1)  # (D,)

    def forward(self, fbank):
        return self.encode(self.embed(fbank))  # (B, 2+N, D) == ASTModel last_hidden_state

    @classmethod
    def from_pretrained(cls, path, config=None, device=None, dtype=None):
        return load_pretrained(cls, ASTConfig, path, config, device, dtype)


# ----------------------------------------------------------------------------------------------------------
# Loading the published safetensors files
#
# Per model: the key prefixes the file may carry (tried in order; "" = none), the key prefixes (after the
# model prefix is stripped) that U2A does not need, and the renames checkpoint name -> our module name.
# Each rename replaces the first occurrence of its left side, in the listed order. weights/make_toy.py runs
# them backwards to write its toy files in these layouts, so every rename names its whole piece (no "x." -> "").
# Everything outside the model prefix is skipped: CLIP's text tower, visual/text projections and logit_scale
# (U2A uses the 768-d vision hidden states), BERT's pre-training heads cls.* and AST's AudioSet classifier.*.
# Inside it: position_ids is a constant buffer in older files, BERT's pooler is not used by U2A.

LAYOUTS = {
    ViT: dict(
        prefixes=("vision_model.",),
        skip=("embeddings.position_ids",),
        renames=[
            ("embeddings.class_embedding", "class_embedding"),  # the embeddings live on the model itself
            ("embeddings.patch_embedding", "patch_embedding"),
            ("embeddings.position_embedding", "position_embedding"),
            ("encoder.layers.", "blocks."),
            ("self_attn.", "attn."),
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("post_layernorm", "final_norm"),  # the norm U2A applies to the CLS and MT outputs, in every encoder
        ],
    ),
    BERT: dict(
        prefixes=("bert.", ""),  # bert-base-uncased is a BertForPreTraining file; MiniLM a bare BertModel
        skip=("embeddings.position_ids", "pooler."),
        renames=[
            (".gamma", ".weight"),  # bert-base-uncased keeps TensorFlow's LayerNorm names
            (".beta", ".bias"),
            ("embeddings.LayerNorm", "embed_norm"),
            ("embeddings.word_embeddings", "word_embeddings"),
            ("embeddings.position_embeddings", "position_embeddings"),
            ("embeddings.token_type_embeddings", "token_type_embeddings"),
            ("encoder.layer.", "blocks."),
            ("attention.self.query", "attn.q_proj"),
            ("attention.self.key", "attn.k_proj"),
            ("attention.self.value", "attn.v_proj"),
            ("attention.output.dense", "attn.out_proj"),
            ("attention.output.LayerNorm", "norm1"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
            ("output.LayerNorm", "norm2"),
        ],
    ),
    AST: dict(
        # The hub file (and transformers 5's save_pretrained) use these ViT-style names, not the names of
        # transformers' live modules.
        prefixes=("audio_spectrogram_transformer.", ""),
        skip=(),
        renames=[
            ("embeddings.patch_embeddings.projection", "patch_embedding"),
            ("embeddings.cls_token", "cls_token"),
            ("embeddings.distillation_token", "distillation_token"),
            ("embeddings.position_embeddings", "position_embeddings"),
            ("encoder.layer.", "blocks."),
            ("attention.attention.query", "attn.q_proj"),
            ("attention.attention.key", "attn.k_proj"),
            ("attention.attention.value", "attn.v_proj"),
            ("attention.output.dense", "attn.out_proj"),
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ],
    ),
}


def find_checkpoint(path):
    """A .safetensors file, or a directory holding model.safetensors -> the file's path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected a .safetensors file or a directory "
                                "holding model.safetensors")
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is a directory without model.safetensors "
                                "(only safetensors files are read)")
    return file


def load_pretrained(model_cls, config_cls, path, config=None, device=None, dtype=None):
    """Build model_cls from the config.json beside the weights (or `config`) and copy the weights in."""
    file = find_checkpoint(path)
    with open_safetensors(file) as checkpoint:  # opened first: a bad file fails before a model is built
        config_file = os.path.join(os.path.dirname(file), "config.json")
        if config is None:
            config = config_cls.from_json(config_file) if os.path.isfile(config_file) else config_cls()
        model = model_cls(config)
        load_weights(model, checkpoint, file, **LAYOUTS[model_cls])
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)  # frozen: only LoRA factors and U2A's own tokens/heads are trained
    return model


def open_safetensors(file):
    try:
        return safe_open(file, framework="pt")  # never torch.load: unpickling can run arbitrary code
    except SafetensorError as e:
        raise ValueError(f"{file} is not a safetensors file ({e}); convert it to .safetensors first") from e


def load_weights(model, checkpoint, file, prefixes, skip, renames):
    """Copy an open safetensors `checkpoint` into `model`: every parameter found, every shape right.
    Skipped tensors are never read (the CLIP file's text tower stays on disk)."""
    keys = list(checkpoint.keys())
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        raise KeyError(f"{file}: no key starts with {prefixes}: not a {type(model).__name__} checkpoint")
    params = dict(model.named_parameters())
    loaded = set()
    for key in keys:
        if not key.startswith(prefix) or key[len(prefix):].startswith(skip):
            continue
        name = key[len(prefix):]
        for old, new in renames:
            name = name.replace(old, new, 1)
        if name not in params:
            raise KeyError(f"{file}: key {key!r} (our name {name!r}) has no place in {type(model).__name__}")
        shape = tuple(checkpoint.get_slice(key).get_shape())
        if shape != tuple(params[name].shape):
            raise ValueError(f"{file}: key {key!r} (our name {name!r}): expected shape "
                             f"{tuple(params[name].shape)}, found {shape}")
        with torch.no_grad():
            params[name].copy_(checkpoint.get_tensor(key))
        loaded.add(name)
    missing = [name for name in params if name not in loaded]
    if missing:
        raise KeyError(f"{file}: missing weights for {missing} (key prefix {prefix!r}): not a complete "
                       f"{type(model).__name__} checkpoint")
