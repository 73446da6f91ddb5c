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

After the encoders, what they read (one home for each encoder's input contract): the preprocessing each was
pretrained on (`clip_image`: CLIPImageProcessor; `load_tokenizer`: BERT's uncased WordPiece with [CLS] ... [SEP];
`fbank`: ASTFeatureExtractor's Kaldi log-mel), and `batch_inputs`, which stacks one modality's inputs into the
batch keys its encoder reads (MODALITY_INPUTS), with the paper's placeholder (zeros, "") for a missing one.

There is no dropout anywhere in this file: the encoders are frozen, so their dropout would only add noise;
the LoRA branch's own dropout (lora.py) is U2A's only regulariser.
"""
import functools
import json
import math
import os
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing

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
    act = ACTIVATIONS[cfg.hidden_act]  # checked when the config was made (Config.__post_init__)
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

    def __post_init__(self):
        # here rather than when the model is built: u2a.check_encoders_fit reads configs before a run starts
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:  # json's own message names no file
                raise ValueError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} holds a JSON {type(d).__name__}, not the object of a config.json")
        d = d.get("vision_config", d)  # a full CLIPConfig nests the vision tower; every other config.json is flat
        try:
            return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


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
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(file) and os.path.isfile(index):  # transformers' layout for files above its shard size
        raise FileNotFoundError(f"{path} holds a sharded checkpoint ({index} and its model-*-of-*.safetensors): "
                                "only one model.safetensors is read; merge the shards into one file first")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is a directory without model.safetensors "
                                "(only safetensors files are read)")
    return file


def load_pretrained(model_cls, config_cls, path, config=None, device=None, dtype=None):
    """Build model_cls from the config.json beside the weights (or `config`) and copy the weights in.
    device="meta" reads no tensor: the model is built without memory and the file's keys and shapes are checked,
    all from the file's header (u2a.check_encoders_fit, before a run writes anything)."""
    file = find_checkpoint(path)
    with open_safetensors(file) as checkpoint:  # opened first: a bad file fails before a model is built
        config_file = os.path.join(os.path.dirname(file), "config.json")
        if config is None:
            config = config_cls.from_json(config_file) if os.path.isfile(config_file) else config_cls()
        with torch.device("meta") if str(device) == "meta" else nullcontext():
            model = model_cls(config)
        load_weights(model, checkpoint, file, **LAYOUTS[model_cls])
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)  # frozen: only LoRA factors and U2A's own tokens/heads are trained
    return model


def open_safetensors(file):
    try:
        return safe_open(file, framework="pt")  # never torch.load: unpickling can run arbitrary code
    except SafetensorError as e:
        # a truncated file (an interrupted copy) fails here too: the same words would send its owner to convert it
        raise ValueError(f"{file} is not a safetensors file, or one cut short ({e}): fetch it again if a download "
                         "or copy was interrupted, else convert it to .safetensors first") from e


def load_weights(model, checkpoint, file, prefixes, skip, renames):
    """Copy an open safetensors `checkpoint` into `model`: every parameter found, every shape right.
    Skipped tensors are never read (the CLIP file's text tower stays on disk)."""
    keys = list(checkpoint.keys())
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        raise KeyError(f"{file}: no key starts with {prefixes}: not a {type(model).__name__} checkpoint")
    params = dict(model.named_parameters())
    loaded = {}  # our name -> the key it came from
    for key in keys:
        if not key.startswith(prefix) or key[len(prefix):].startswith(skip):
            continue
        name = key[len(prefix):]
        for old, new in renames:
            name = name.replace(old, new, 1)
        if name not in params:
            raise KeyError(f"{file}: key {key!r} (our name {name!r}) has no place in {type(model).__name__}")
        if name in loaded:  # e.g. a LayerNorm under both names (gamma and weight): the later would silently win
            raise KeyError(f"{file}: keys {loaded[name]!r} and {key!r} both load {name!r}: keep one of them")
        shape = tuple(checkpoint.get_slice(key).get_shape())
        if shape != tuple(params[name].shape):
            raise ValueError(f"{file}: key {key!r} (our name {name!r}): expected shape "
                             f"{tuple(params[name].shape)}, found {shape}")
        if not params[name].is_meta:  # a meta model (load_pretrained's check) has no values to fill
            with torch.no_grad():
                params[name].copy_(checkpoint.get_tensor(key))
        loaded[name] = key
    missing = [name for name in params if name not in loaded]
    if missing:
        raise KeyError(f"{file}: missing weights for {missing} (key prefix {prefix!r}): not a complete "
                       f"{type(model).__name__} checkpoint")


# ==========================================================================================================
# What the encoders read: the preprocessing each was pretrained on, and batches of its inputs
#
# An encoder only reads inputs made as in its pretraining, so that preprocessing lives here, beside the encoders
# (as CLIP's repository keeps its `_transform` beside the model): CLIP's image transform, BERT's WordPiece with
# its [CLS] ... [SEP] template, AST's Kaldi log-mel. data.py reads the datasets' files through it and
# u2a.predict a user's own inputs; batch_inputs (the end of the file) stacks them into the keys each encoder
# reads, with the paper's placeholder in place of a missing input.
# ----------------------------------------------------------------------------------------------------------

# Images and video frames, for the ViT: transformers' CLIPImageProcessor, as the CLIP checkpoints'
# preprocessor_config.json sets it
IMAGE_SIZE = 224
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
WHITE = (255, 255, 255, 255)
# The modes of 8 bits a channel, read as CLIPImageProcessor reads them (Pillow's conversion to RGB)
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# Grey images beyond 8 bits, by the value that means white. Converted to RGB as they are, Pillow (and so
# CLIPImageProcessor) clips them at 255: a 16-bit PNG turns white, a float TIFF in [0, 1] black. They are
# read by their range instead, into the 8 bits CLIP's preprocessing and pretraining work in. Pillow opens a
# 16-bit PNG as "I;16" ("I" in older versions): "I" is read as 16-bit too, and a value beyond it refused.
FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
# The centre crop keeps 1/ratio of a long image, after resizing its *shortest* side to 224: a 1 x 20000 PNG
# became a 224 x 4.5M image (4.3 GB) to keep 0.005% of it. Beyond 20:1 (a panorama is ~4:1, a 1080p frame
# 16:9) the crop shows too little of the picture to be a sample of it: such images are refused.
MAX_ASPECT_RATIO = 20


def image_problem(pil):
    """Why clip_image cannot read `pil` (its mode or its shape), or None. Needs only the header, so the
    datasets ask it when they are built."""
    if pil.mode not in EIGHT_BIT_MODES and pil.mode not in FULL_SCALE:
        return (f"image mode {pil.mode!r} is not supported: expected one of {', '.join(EIGHT_BIT_MODES)} "
                f"(8 bits a channel), or grey {', '.join(FULL_SCALE)} (16-bit, or float in [0, 1])")
    w, h = pil.size
    if min(w, h) == 0:  # e.g. a crop with no area; resizing it would divide by zero
        return f"{w} x {h} pixels: the image is empty"
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return (f"{w} x {h} pixels, an aspect ratio above {MAX_ASPECT_RATIO}:1: CLIP's 224 x 224 centre crop "
                f"would keep too little of it (crop or pad it nearer to square)")
    return None


def to_8_bit(pil):
    """A grey image of a FULL_SCALE mode -> "L", its values scaled so that full scale is 255."""
    x = np.asarray(pil, dtype=np.float64)                                         # (H, W)
    top = FULL_SCALE[pil.mode]
    if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= top):
        raise ValueError(f"image mode {pil.mode!r} with values in [{x.min():g}, {x.max():g}]: expected "
                         f"{'[0, 1]' if pil.mode == 'F' else f'0..{top}'} (white at {top})")
    return Image.fromarray(np.rint(x * (255 / top)).astype(np.uint8))


def upright_rgb(pil):
    """PIL image -> the 8-bit RGB picture CLIP's preprocessing reads: turned upright by its EXIF Orientation tag,
    16-bit and float grey read by their range (FULL_SCALE), transparency on white. Other modes and aspect ratios
    above MAX_ASPECT_RATIO raise a ValueError naming them."""
    problem = image_problem(pil)
    if problem:
        raise ValueError(problem)
    # A phone stores a portrait photo sideways with an Orientation tag. CLIPImageProcessor given a file opens it
    # with transformers' load_image, which applies the tag (ImageOps.exif_transpose); given an already opened PIL
    # image it does not, and would read such a photo sideways: we turn it upright in both cases. exif_transpose
    # returns the image without the tag, so a second call (augment_frame, then clip_image) turns nothing.
    pil = ImageOps.exif_transpose(pil)
    if pil.mode in FULL_SCALE:
        pil = to_8_bit(pil)
    if pil.mode != "RGB":  # transparent pixels become white, as in transformers' convert_to_rgb
        has_alpha = "A" in pil.getbands() or "transparency" in pil.info
        if has_alpha:
            pil = Image.alpha_composite(Image.new("RGBA", pil.size, WHITE), pil.convert("RGBA"))
        pil = pil.convert("RGB")
    return pil


def clip_image(pil, size=IMAGE_SIZE):
    """PIL image -> (3, size, size) float, as CLIPImageProcessor: upright 8-bit RGB (upright_rgb), shortest side
    to size (bicubic), centre crop size, /255, CLIP mean/std. size: CLIP's 224, or an encoder's own (the toy
    ViT's 32). Unsupported modes and aspect ratios raise a ValueError naming them (image_problem)."""
    pil = upright_rgb(pil)
    w, h = pil.size
    long = int(size * max(w, h) / min(w, h))  # transformers truncates, so do we
    pil = pil.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255  # (3, size, size) in [0, 1]
    return (x - CLIP_MEAN) / CLIP_STD


# clip_image's values lie within +-2.15 ((1 - 0.408) / 0.276, blue); the synthetic data's images reach ~5. A tensor
# beyond MAX_PREPROCESSED is not a preprocessed image: most often a photo's 0..255 pixels made float.
MAX_PREPROCESSED = 10.0


def preprocessed_image_problem(x):
    """Why a float tensor given as a preprocessed image is not one (NaN/Inf, or values beyond MAX_PREPROCESSED),
    or None."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:  # they would make every probability NaN
        return f"holds {bad} NaN/Inf value{'s' if bad > 1 else ''}"
    top = x.abs().max().item() if x.numel() else 0.0
    if top > MAX_PREPROCESSED:
        return (f"holds values up to {top:g}: it is not preprocessed (clip_image's lie within +-2.15): pass raw "
                f"pixels as a PIL image (PIL.Image.fromarray) or a file path, or preprocess them with clip_image")
    return None


# Text, for BERT: uncased WordPiece, [CLS] ... [SEP], truncated to the dataset's max length (sec. 4.2)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's vocab.txt order


def wordpiece_tokenizer(vocab):
    """A BERT-uncased tokenizer from a {token: id} vocab (lowercase + strip accents, BERT splitting)."""
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = BertNormalizer(lowercase=True)  # strip_accents follows lowercase, as in BERT
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # as transformers' BertTokenizer (and tokenizer.json's added tokens): "[SEP]" in a text is that one token
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
    return tok


def bert_template(tok, max_len, source):
    """`tok` with BERT's [CLS] ... [SEP] template, truncating to max_len (specials included) and right-padding
    with [PAD] to the longest text of each encode_batch call. source: named when a special token is missing."""
    # [UNK] is read only at the first unknown word (WordPiece then fails): checked here, not mid-training
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer {source} lacks the BERT special tokens {missing}")
    # set here rather than trusted from tokenizer.json, whose padding/truncation settings vary
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]",
                                            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(direction="right", pad_id=ids["[PAD]"], pad_token="[PAD]")  # to the longest
    return tok


def load_tokenizer(path, max_len):
    """`path`: a checkpoint folder with tokenizer.json or vocab.txt, or either file. Returns a
    tokenizers.Tokenizer adding [CLS] ... [SEP], truncating to max_len (specials included) and
    right-padding with [PAD] to the longest text of each encode_batch call (bert_template)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in ("tokenizer.json", "vocab.txt") if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (expected tokenizer.json or vocab.txt)")
    if path.suffix == ".json":
        tok = Tokenizer.from_file(str(path))
    else:
        tok = wordpiece_tokenizer(WordPiece.read_file(str(path)))
    return bert_template(tok, max_len, source=path)


def is_missing_text(text):
    """None, "" and blank texts are all a missing text. The paper's placeholder for a missing text is the empty
    string, so a blank text carries nothing a missing one does not: it is marked absent (U2A then uses the other
    modality's mask token) rather than encoded as a present [CLS][SEP]. Blank: whitespace and what BERT's
    normalizer deletes (clean_text): control, format (a byte-order mark, a zero-width space) and private-use
    characters, and U+FFFD."""
    deleted = lambda c: c.isspace() or c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf", "Co")
    return text is None or (isinstance(text, str) and all(deleted(c) for c in text))


# Audio, for AST: its Kaldi-compatible log-mel filterbank, matching transformers'
# ASTFeatureExtractor numpy path: no dither, no whole-clip mean subtraction.
SAMPLE_RATE = 16_000
FRAME_LENGTH = 400   # 25 ms
FRAME_SHIFT = 160    # 10 ms
N_FFT = 512          # frame zero-padded to the next power of two, as Kaldi does
NUM_MEL_BINS = 128
MEL_LOW_HZ, MEL_HIGH_HZ = 20.0, SAMPLE_RATE / 2
PREEMPHASIS = 0.97
LOG_FLOOR = 1.192092955078125e-07  # float32 eps, Kaldi's floor before the log
MAX_FRAMES = 1024    # ~10.24 s
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet statistics of the AST checkpoint


def kaldi_mel(hz):
    return 1127.0 * torch.log1p(hz / 700.0)


@functools.lru_cache(maxsize=1)
def mel_filterbank():
    """(N_FFT//2+1, NUM_MEL_BINS) float64: triangles evenly spaced on Kaldi's mel scale, drawn in
    mel space, unnormalised. (Filter 3 is narrower than the FFT bin spacing and all zero, as in Kaldi.)"""
    edges = torch.linspace(kaldi_mel(torch.tensor(MEL_LOW_HZ)), kaldi_mel(torch.tensor(MEL_HIGH_HZ)),
                           NUM_MEL_BINS + 2, dtype=torch.float64)                     # (130,)
    bin_mel = kaldi_mel(torch.arange(N_FFT // 2 + 1, dtype=torch.float64) * SAMPLE_RATE / N_FFT)[:, None]
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]                            # (128,) each
    rising = (bin_mel - left) / (centre - left)                                         # (257, 128)
    falling = (right - bin_mel) / (right - centre)
    return torch.minimum(rising, falling).clamp(min=0)


def fbank(waveform, sample_rate):
    """1-D float waveform in [-1, 1] -> (MAX_FRAMES, NUM_MEL_BINS) normalised log-mel, as
    ASTFeatureExtractor. Another sample rate is resampled to 16 kHz first."""
    if waveform.dim() != 1:
        raise ValueError(f"fbank expects a 1-D (mono) waveform, got shape {tuple(waveform.shape)}")
    if not waveform.is_floating_point():  # integer PCM read as it is would be ~32768x too loud, silently
        raise ValueError(f"fbank expects float samples in [-1, 1], got {waveform.dtype}: divide 16-bit PCM by 32768")
    # Only the first MAX_FRAMES frames are kept: resampling and analysing the rest of a long recording to drop it
    # cost 3.7 GB and 5.5 s for 10 minutes at 48 kHz. The kept samples are unchanged by the cut: a resampled
    # sample reads its input up to one phase cycle (at most 1 s) plus the filter's half-width past its own time.
    kept = (MAX_FRAMES - 1) * FRAME_SHIFT + FRAME_LENGTH                  # 16 kHz samples the kept frames read
    waveform = waveform[:math.ceil(kept * sample_rate / SAMPLE_RATE) + 2 * int(sample_rate)]
    if sample_rate != SAMPLE_RATE:
        waveform = resample(waveform, sample_rate, SAMPLE_RATE)
    waveform = waveform[:kept]
    if waveform.numel() < FRAME_LENGTH:
        raise ValueError(f"audio has {waveform.numel()} samples, fewer than one {FRAME_LENGTH}-sample window")
    frames = waveform.double().unfold(0, FRAME_LENGTH, FRAME_SHIFT)       # (T, 400), no centring
    frames = frames - frames.mean(dim=1, keepdim=True)                    # DC removal per frame
    first = frames[:, :1] * (1 - PREEMPHASIS)                             # Kaldi: x[0] - 0.97 x[0]
    frames = torch.cat([first, frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64)  # = np.hanning
    power = torch.fft.rfft(frames, n=N_FFT).abs() ** 2                    # (T, 257)
    logmel = (power @ mel_filterbank()).clamp(min=LOG_FLOOR).log()        # (T, 128)
    logmel = logmel[:MAX_FRAMES]
    logmel = torch.nn.functional.pad(logmel, (0, 0, 0, MAX_FRAMES - logmel.shape[0]))  # zeros in log space
    return ((logmel - AST_MEAN) / (2 * AST_STD)).float()                 # (1024, 128)


# Resampling: the windowed-sinc interpolation of torchaudio.functional.resample (its default,
# "sinc_interp_hann"): low-pass at RESAMPLE_ROLLOFF x the lower Nyquist, RESAMPLE_WIDTH zero crossings
# each side. Accuracy 44.1 kHz -> 16 kHz: tones up to ~3 kHz land within 5e-4 of the exact 16 kHz
# signal; tones within ~1.5 kHz of the new 8 kHz Nyquist are attenuated (transition band).
RESAMPLE_ROLLOFF, RESAMPLE_WIDTH = 0.99, 6
# The filter bank holds one filter per output phase, each as long as the input's phase cycle: new * (orig + 2 width)
# taps, the rates divided by their gcd. 44.1 kHz -> 16 kHz: 76k taps; 44.056 kHz (NTSC's pull-down): 11M. A rate
# sharing few factors with 16 kHz needs far more: 11127 Hz (an old Macintosh rate) 178M, seen taking 5.8 GB and
# 14 s for a 10 s clip. Beyond MAX_RESAMPLE_TAPS the rate is refused, naming the conversion that fixes it.
MAX_RESAMPLE_TAPS = 2 ** 24


def resample_plan(orig_rate, new_rate):
    """(orig, new, cutoff, width): the rates divided by their gcd, the low-pass cutoff and the filter's half-width,
    in those units."""
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF
    return orig, new, cutoff, math.ceil(RESAMPLE_WIDTH * orig / cutoff)


def resample_problem(orig_rate, new_rate=SAMPLE_RATE):
    """Why resample refuses orig_rate (its filter bank would be beyond MAX_RESAMPLE_TAPS), or None. The datasets
    ask it of each WAV's header when they are built."""
    orig, new, _, width = resample_plan(orig_rate, new_rate)
    taps = new * (orig + 2 * width)
    if taps <= MAX_RESAMPLE_TAPS:
        return None
    return (f"sample rate {orig_rate} Hz shares too few factors with {new_rate} Hz: resampling it needs a filter "
            f"bank of {taps / 1e6:.0f}M taps ({taps * 8 / 1e9:.1f} GB); convert the file first, e.g. "
            f"`ffmpeg -i IN.wav -ar {new_rate} OUT.wav`")


def resample(waveform, orig_rate, new_rate):
    """1-D waveform at orig_rate -> 1-D waveform at new_rate (polyphase conv1d, one filter per phase).
    A rate whose filter bank would be too large raises a ValueError (resample_problem)."""
    problem = resample_problem(orig_rate, new_rate)
    if problem:
        raise ValueError(problem)
    orig, new, cutoff, width = resample_plan(orig_rate, new_rate)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig         # (1, K)
    t = (taps - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff         # (new, K)
    t = t.clamp(-RESAMPLE_WIDTH, RESAMPLE_WIDTH)
    window = torch.cos(t * math.pi / RESAMPLE_WIDTH / 2) ** 2
    kernel = torch.sinc(t) * window * cutoff / orig                                     # (new, K)
    x = torch.nn.functional.pad(waveform.double()[None, None], (width, width + orig))   # (1, 1, N+pad)
    y = torch.nn.functional.conv1d(x, kernel[:, None], stride=orig)                     # (1, new, N/orig)
    out = y[0].t().reshape(-1)                                                          # phases interleaved
    return out[:math.ceil(new * waveform.numel() / orig)].to(waveform.dtype)


# ----------------------------------------------------------------------------------------------------------
# Batches: a modality's inputs -> the keys of a batch its encoder reads, placeholders where missing

# The keys each modality's encoder reads (u2a.Branch), as batch_inputs writes them
MODALITY_INPUTS = {
    "image": ("image",),                          # (B, 3, H, W)
    "video": ("video",),                          # (B, T, 3, H, W)
    "audio": ("audio",),                          # (B, 1024, 128) fbank
    "text": ("input_ids", "attention_mask"),      # (B, L), (B, L)
}
NUM_FRAMES = 3  # T: the frames of a video clip (sec. 4.2), each a CLIP image through the image ViT


def input_shape(modality, image_size=IMAGE_SIZE):
    """One sample's input to the encoder of an image, a video or an audio clip (a text has no fixed shape)."""
    s = image_size
    return {"image": (3, s, s), "video": (NUM_FRAMES, 3, s, s), "audio": (MAX_FRAMES, NUM_MEL_BINS)}[modality]


def batch_inputs(inputs, tokenizer=None, image_size=IMAGE_SIZE):
    """{modality: B preprocessed inputs, None where missing} -> "present" (B, M) bool (column i: the i-th
    modality of `inputs` is there) and the keys each encoder reads (MODALITY_INPUTS). A missing input holds the
    paper's placeholder (sec. 3): zeros for an image, a video or an audio clip, the empty text ([CLS][SEP])
    for a text; a blank text is missing too (is_missing_text). The texts are tokenised together, padded to the
    longest. image_size: the side of images and video frames (CLIP's 224, the toy ViT's 32).
    The one place that builds a placeholder: data.collate and u2a.predict batch through it, and a batch of
    one sample missing everything, {m: [None]}, is the placeholder batch (data.drop_modalities,
    u2a.placeholder_tokens)."""
    B = len(next(iter(inputs.values())))
    samples = zip(*inputs.values())  # B tuples of M inputs
    present = torch.tensor([[not (is_missing_text(x) if m == "text" else x is None) for m, x in zip(inputs, sample)]
                            for sample in samples], dtype=torch.bool).view(B, len(inputs))  # (B, M)
    batch = {"present": present}
    for m, xs in inputs.items():
        if m == "text":
            enc = tokenizer.encode_batch(["" if is_missing_text(x) else x for x in xs])
            L = len(enc[0].ids) if enc else 0  # all padded to the longest text
            batch["input_ids"] = torch.tensor([e.ids for e in enc], dtype=torch.long).view(B, L)  # (B, L)
            batch["attention_mask"] = torch.tensor([e.attention_mask for e in enc], dtype=torch.long).view(B, L)
        else:
            placeholder = torch.zeros(input_shape(m, image_size))
            rows = [placeholder if x is None else x for x in xs]
            batch[m] = torch.stack(rows) if rows else torch.zeros(0, *placeholder.shape)  # (B, ...)
    return batch
