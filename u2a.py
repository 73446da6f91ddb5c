"""
U2A: Unified Unimodal Adaptation (Reza et al., 2025, arXiv 2501.17823), section 3, end to end.

Two frozen pretrained encoders, one per modality, each adapted with rank-1 LoRA. Every encoder reads
[CLS, tokens, MT]: a learnable class token and a learnable Mask Token around its frozen embeddings (eq. 1-3).
When both modalities are there, the two CLS outputs are summed and classified (eq. 5). When one is missing,
its CLS is replaced by the MT output of the modality that is there (eq. 4), and an alignment loss teaches
each MT to imitate the other modality's CLS on complete samples (eq. 6-7).

Four methods (METHODS) differ in what stands in for a missing modality and how they train for it: naive
(the paper's placeholder inputs, trained on the data as it is), placeholder-dropout (the same with section
3's modality dropout), u2a-no-align (mask tokens and dropout, lambda = 0) and u2a (the paper's method). What
each adds is measured, not assumed: the default run (README, "The default run") prints them side by side.

Read top to bottom: the methods and the config -> loading the pretrained encoders -> one modality branch ->
the two-branch model (token selection, fusion, head) -> the loss -> random modality dropout -> checkpoints
and run folders -> scoring the paper's scenarios -> predict.

Choices the paper leaves open, made here:
- CLS starts as the encoder's own pretrained class token (as it enters the encoder, position included): an
  untrained model reads each input as the pretrained one does but for every token's attention to the MT. The MT
  starts as a copy of the CLS (mt_init="cls", the real datasets' default) or a random vector of its norm
  (mt_init="random", the toy's). On the toy's default design both learn to estimate the other modality's CLS
  (README, "The default run": mean MSE 0.30 / 0.50 from a copy over seeds 0-1, 0.76 / 0.93 from random over
  seeds 0-3, against 0.97 / 0.88 for a constant guess; from random, seed 2 and seed 3's text -> image ended
  above that guess); random gave the complete case 2.2 points more over seeds 0-1.
- Eq. 6 may treat its CLS targets as constants (align_stop_grad, the toy's default): the alignment then
  moves the MTs only, and never pulls a CLS towards what its MT can guess. On the toy, without it, the
  complete case fell from 98.1 to 91.2 (seeds 0-1).
- Eq. 6 averages over the samples whose two modalities are both present *at that step*, after dropout: it
  is live on the steps where dropout keeps both (probability 1/3 a step on a complete set), zero on the others.
- Our CLS takes the place of the pretrained class token (position 0, with position 0's embedding folded in);
  the MT goes at the end of the sequence with no position embedding of its own: it is a learned vector, so
  any position embedding would only be folded into it. For BERT, the padding mask never hides CLS or MT.
- The selected tokens pass through the encoder's own final norm (`final_norm`): CLIP's post_layernorm, which
  CLIP applies to its class token; nothing for BERT (it has no final norm) and AST (its final layernorm is
  already part of `encode`).
- Video: each of the T frames is its own sequence [CLS, 196 patches, MT] through the image ViT, and the CLS
  and MT outputs are averaged over frames. One long sequence of 3 x 196 patches would reuse CLIP's 197
  positions three times (CLIP never saw such inputs) and cost 9x the attention instead of 3x; averaging frame
  features is what audio-video work built on CLIP does (e.g. MMLoRA, MLA).
- Random modality dropout (section 3, last paragraph) is drawn once per training step for the whole batch:
  "for each training iteration, we either use both modalities or randomly drop one".
"""
import json
import os
import socket
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from encoders import (AST, BERT, IMAGE_SIZE, MAX_FRAMES, MODALITY_INPUTS, NUM_MEL_BINS, ASTConfig, BERTConfig, ViT,
                      ViTConfig, batch_inputs, clip_image, is_missing_text, load_tokenizer, preprocessed_image_problem)
from lora import add_lora, mark_only_lora_as_trainable, parameter_table
from weights.download import CHECKPOINTS

# Which encoder class reads each modality (the keys of a batch it reads: encoders.MODALITY_INPUTS).
MODALITY_ENCODER = {"image": ViT, "video": ViT, "audio": AST, "text": BERT}
MODALITY_CONFIG = {"image": ViTConfig, "video": ViTConfig, "audio": ASTConfig, "text": BERTConfig}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # paper 4.2: query, key, value and output


@dataclass(frozen=True)
class Method:
    """What a method puts in place of a missing modality's CLS (eq. 4), and how it trains for it."""
    stand_in: str   # "mask_token": the present modality's MT (eq. 4); "placeholder": the encoder's CLS of
                    # the paper's placeholder input (zeros / empty text), the baseline of section 4
    dropout: bool   # section 3's random modality dropout, on a complete training set
    align: bool     # eq. 6 in the loss with weight lambda; False: lambda = 0


# The four methods, each one step from the next: naive -> + dropout -> + mask tokens -> + alignment.
METHODS = {
    "naive": Method("placeholder", dropout=False, align=False),               # trained on the data as it is
    "placeholder-dropout": Method("placeholder", dropout=True, align=False),
    "u2a-no-align": Method("mask_token", dropout=True, align=False),
    "u2a": Method("mask_token", dropout=True, align=True),                    # the paper's method
}


@dataclass
class U2AConfig:
    """Everything that builds a U2A model, with the paper's values (section 4.2, Table 5) as defaults.
    Every checkpoint stores it, so a trained model rebuilds from its file alone (from_checkpoint, below)."""
    encoders: dict                      # modality -> folder of its pretrained encoder, in (m1, m2) order
    class_names: list                   # the head's classes, in label order
    multilabel: bool = False            # MM-IMDb: sigmoid per genre instead of one softmax
    method: str = "u2a"                 # a key of METHODS
    rank: int = 1                       # LoRA rank
    alpha: float = 1.0                  # LoRA alpha
    lora_dropout: float = 0.1
    lora_targets: tuple = LORA_TARGETS
    lam: float = 0.2                    # lambda of eq. 7, for a method that aligns (METHODS[method].align)
    mt_init: str = "cls"                # "cls": MT starts as the pretrained class token, as CLS does;
                                        # "random": Gaussian, of the class token's norm (see the docstring)
    align_stop_grad: bool = False       # eq. 6's CLS target as a constant: the alignment moves only the MT
    text_max_len: int = None            # the run's text length in tokens ([CLS], [SEP] included): predict
                                        # cuts a text there too; None: the text encoder's longest input
    encoder_configs: dict = field(default_factory=dict)  # filled when built: checked when rebuilt

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.mt_init not in ("cls", "random"):
            raise ValueError(f"mt_init must be 'cls' or 'random', got {self.mt_init!r}")

    @property
    def align_weight(self):
        """lambda as the loss uses it: the method's own 0 when it does not align."""
        return self.lam if METHODS[self.method].align else 0.0


# -----------------------------------------------------------------------------
# Pretrained encoders for a modality

# Where each modality's encoder lives under a weights folder, and the command that puts it there: the paper's
# encoders (weights/download.py's folders) or the toy ones the synthetic data is made for (weights/make_toy.py).
ENCODER_FOLDERS = {
    "paper": {"image": CHECKPOINTS["clip"].folder, "video": CHECKPOINTS["clip"].folder,
              "text": CHECKPOINTS["bert"].folder, "audio": CHECKPOINTS["ast"].folder},
    "toy": {"image": "toy/vit", "text": "toy/bert"},
}
GET_ENCODERS = {"paper": "python weights/download.py --dest {weights}", "toy": "python weights/make_toy.py"}


def load_encoder(modality, path):
    """The frozen pretrained encoder for a modality, read from a checkpoint folder or file."""
    if modality not in MODALITY_ENCODER:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(MODALITY_ENCODER)}")
    return MODALITY_ENCODER[modality].from_pretrained(path)


def encoder_config(modality, folder):
    """An encoder's config as load_encoder will read it (its folder's config.json, or the class's defaults
    without one), without loading the weights: enough to check that it fits the data."""
    config_file, config_class = Path(folder) / "config.json", MODALITY_CONFIG[modality]
    return config_class.from_json(config_file) if config_file.is_file() else config_class()


def check_encoders_fit(folders, info, tokenizer):
    """Before training: the encoders ({modality: folder}) take the data's image size (info: data.py's DatasetInfo),
    fbank's frames and mel bins, its longest text, and its tokenizer's (None without text) every token id and
    [CLS]; a ValueError names each misfit. Unchecked, each fails only at the first batch that meets it (maybe
    epochs in), and a wrong [CLS] never: CLS would silently start from another token's embedding. Then each
    weights file is checked as load_encoder reads it (keys, shapes), from its header: it is read only later."""
    problems = []
    for m, folder in folders.items():
        config, config_file = encoder_config(m, folder), Path(folder) / "config.json"
        if m in ("image", "video") and config.image_size != info.image_size:
            problems.append(f"the {m} encoder at {folder} takes {config.image_size}x{config.image_size} images "
                            f"(image_size in {config_file}); {info.name} feeds it {info.image_size}x{info.image_size}")
        if m == "text" and tokenizer.get_vocab_size() > config.vocab_size:
            problems.append(f"the text encoder at {folder} knows {config.vocab_size} tokens (vocab_size in "
                            f"{config_file}); {info.name}'s tokenizer gives {tokenizer.get_vocab_size()}")
        if m == "text" and info.text_max_len and info.text_max_len > config.max_position_embeddings:
            problems.append(f"the text encoder at {folder} has {config.max_position_embeddings} positions "
                            f"(max_position_embeddings in {config_file}); {info.name}'s texts run to "
                            f"{info.text_max_len} tokens")
        if m == "text" and (cls := tokenizer.token_to_id("[CLS]")) != config.cls_token_id:  # else CLS starts wrong
            problems.append(f"[CLS] is token {cls} in the tokenizer, but the text encoder at {folder} takes its class "
                            f"token from cls_token_id {config.cls_token_id} (101 when absent): set it in {config_file}")
        if m == "audio" and (config.max_length, config.num_mel_bins) != (MAX_FRAMES, NUM_MEL_BINS):
            problems.append(f"the audio encoder at {folder} takes {config.max_length} frames x {config.num_mel_bins} "
                            f"mel bins (max_length, num_mel_bins in {config_file}); encoders.fbank gives "
                            f"{MAX_FRAMES} frames x {NUM_MEL_BINS}")
    if problems:
        raise ValueError(f"the encoders do not fit the data: {'; '.join(problems)}. Point --weights at the encoders "
                         f"made for {info.name} (weights/make_toy.py's toy encoders fit only the synthetic data)")
    for m, folder in folders.items():  # then each weights file: every key and shape, read from its header alone
        try:
            MODALITY_ENCODER[m].from_pretrained(folder, device="meta")
        except KeyError as e:  # a key missing or out of place: the file's to fix, a ValueError as the others
            raise ValueError(e.args[0]) from e


# -----------------------------------------------------------------------------
# One modality: frozen embedding -> [CLS, tokens, MT] -> encoder with LoRA (eq. 1-3)

class Branch(nn.Module):
    """Turns one modality's input into its CLS and MT output tokens, each (b, D): embed (eq. 1) ->
    sequence (eq. 2) -> the encoder (eq. 3)."""

    def __init__(self, modality, encoder, mt_init="cls"):
        super().__init__()
        if modality not in MODALITY_INPUTS:
            raise ValueError(f"unknown modality {modality!r}; expected one of {list(MODALITY_INPUTS)}")
        self.modality = modality
        self.input_keys = MODALITY_INPUTS[modality]
        self.encoder = encoder
        pretrained_cls = encoder.class_token().detach().clone()  # (D,)
        self.cls = nn.Parameter(pretrained_cls.clone())           # T_CLS,m of eq. 2
        if mt_init == "random":  # a direction of its own, the class token's size (module docstring)
            mt = torch.randn_like(pretrained_cls)
            mt = mt * pretrained_cls.norm() / mt.norm()
        else:
            mt = pretrained_cls.clone()
        self.mt = nn.Parameter(mt)                                # T_MT,m of eq. 2

    def embed(self, inputs):
        """Eq. 1: the frozen embedding layer. Returns tokens (b, N, D) and a key mask (b, N) or None."""
        enc = self.encoder
        if self.modality == "text":
            ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            tokens = enc.embed(ids)[:, 1:]               # (b, L-1, D): our CLS replaces [CLS]
            return tokens, attention_mask[:, 1:].bool()  # (b, L-1)
        if self.modality == "video":
            frames = inputs["video"]                     # (b, T, 3, H, W)
            tokens = enc.embed(frames.flatten(0, 1))     # (b*T, 1+N, D): each frame its own sequence
            return tokens[:, 1:], None
        # image: drop CLIP's class token; audio: drop AST's cls token, keep its distillation token.
        return enc.embed(inputs[self.modality])[:, 1:], None  # (b, N, D)

    def sequence(self, inputs):
        """Eq. 1-2: [CLS, tokens, MT] (b', N+2, D), b' = b or b*T, and its key mask (b', N+2) or None."""
        tokens, mask = self.embed(inputs)                     # (b', N, D)
        n = tokens.shape[0]
        cls = self.cls.expand(n, 1, -1)                       # (b', 1, D)
        mt = self.mt.expand(n, 1, -1)                         # (b', 1, D)
        seq = torch.cat([cls, tokens.to(cls.dtype), mt], 1)  # (b', N+2, D)  eq. 2
        if mask is not None:
            always = mask.new_ones(n, 1)
            mask = torch.cat([always, mask, always], 1)       # (b', N+2): CLS and MT always attend
        return seq, mask

    def forward(self, inputs):
        seq, mask = self.sequence(inputs)                     # (b', N+2, D)
        # eq. 3; only the CLS and MT outputs are used (eq. 4-5), so the last block computes just those two rows
        out = self.encoder.encode(seq, mask, keep=[0, -1])  # (b', 2, D)
        cls_out = self.encoder.final_norm(out[:, 0])          # (b', D)
        mt_out = self.encoder.final_norm(out[:, 1])           # (b', D)
        if self.modality == "video":                          # average the T frames of each clip
            T = inputs["video"].shape[1]
            cls_out = cls_out.view(-1, T, cls_out.shape[-1]).mean(1)  # (b, D)
            mt_out = mt_out.view(-1, T, mt_out.shape[-1]).mean(1)     # (b, D)
        return cls_out, mt_out


# -----------------------------------------------------------------------------
# The model: two branches, token selection (eq. 4), sum fusion and a linear head (eq. 5)

@dataclass
class U2AOutput:
    logits: torch.Tensor   # (B, C)
    cls: dict              # modality -> (B, D) CLS output; where that modality is missing: zeros (mask-token
    mt: dict               # modality -> (B, D) MT output;  methods), its placeholder's outputs (placeholder ones)
    present: torch.Tensor  # (B, 2) bool, column i = modality i was used


class U2A(nn.Module):
    """The model a U2AConfig describes. encoders: {modality: encoder} for exactly two modalities, in the
    order (m1, m2) of the batch's "present" columns; default: loaded from config.encoders. The method
    (METHODS[config.method]) decides the stand-in for a missing modality: the other modality's MT, or the
    encoder's CLS of the paper's placeholder input (the batch holds it: encoders.batch_inputs)."""

    def __init__(self, config, encoders=None):
        super().__init__()
        if encoders is None:
            encoders = {m: load_encoder(m, path) for m, path in config.encoders.items()}
        if len(encoders) != 2:
            raise ValueError(f"U2A takes exactly two modalities, got {list(encoders)}")
        found = {m: asdict(enc.config) for m, enc in encoders.items()}
        for m, expected in config.encoder_configs.items():  # the same frozen weights' shape as in training
            if found.get(m) != expected:
                raise ValueError(f"the {m} encoder at {config.encoders[m]} is not the one this model was "
                                 f"trained on: its config is {found.get(m)}, expected {expected}")
        self.config = replace(config, encoder_configs=found)
        self.method = METHODS[config.method]
        self.modalities = tuple(encoders)
        self.branches = nn.ModuleDict({m: Branch(m, enc, config.mt_init) for m, enc in encoders.items()})
        dims = {enc.config.hidden_size for enc in encoders.values()}
        if len(dims) != 1:  # sum fusion (eq. 5) needs one width
            raise ValueError(f"sum fusion needs encoders of one width, got {sorted(dims)}")
        self.head = nn.Linear(dims.pop(), len(config.class_names))  # h(.; Theta_h) of eq. 5
        # LoRA on q/k/v/out of every block (section 4.2); only LoRA, the tokens and the head learn.
        for enc in encoders.values():
            add_lora(enc, tuple(config.lora_targets), rank=config.rank, alpha=config.alpha,
                     dropout=config.lora_dropout)
        tokens = [f"branches.{m}.{t}" for m in self.modalities for t in ("cls", "mt")]
        mark_only_lora_as_trainable(self, also=(*tokens, "head."))

    def encode(self, batch):
        """Runs each modality's branch on the samples that have it; returns cls, mt dicts of (B, D)."""
        present = batch["present"].bool()                  # (B, 2)
        if self.method.stand_in == "placeholder":          # the baselines encode the placeholders too
            present = torch.ones_like(present)
        elif not present.any(1).all():
            raise ValueError("a sample has neither modality: U2A needs at least one per sample")
        rows_present = present.cpu()
        B = present.shape[0]
        cls, mt = {}, {}
        for i, (m, branch) in enumerate(self.branches.items()):
            rows = rows_present[:, i]
            D = self.head.in_features
            if rows.all() and B > 0:  # common case: no indexing, no copies
                cls[m], mt[m] = branch({k: batch[k] for k in branch.input_keys})
                continue
            # A missing modality's encoder output is never used (eq. 4), so it is never computed:
            # only the rows that have this modality go through its encoder.
            idx = rows.nonzero().squeeze(1).to(present.device)  # (b,)
            c = torch.zeros(B, D, device=present.device, dtype=self.head.weight.dtype)
            t = torch.zeros_like(c)
            if len(idx):
                c_rows, t_rows = branch({k: batch[k].index_select(0, idx) for k in branch.input_keys})
                c = c.index_copy(0, idx, c_rows.to(c.dtype))
                t = t.index_copy(0, idx, t_rows.to(t.dtype))
            cls[m], mt[m] = c, t
        return cls, mt

    def select_tokens(self, cls, mt, present):
        """Eq. 4, per sample. Returns (T1, T2), each (B, D)."""
        m1, m2 = self.modalities
        if self.method.stand_in == "placeholder":          # a missing CLS is its placeholder's CLS
            return cls[m1], cls[m2]
        has1 = present[:, 0:1].bool()                      # (B, 1)
        has2 = present[:, 1:2].bool()                      # (B, 1)
        t1 = torch.where(has1, cls[m1], mt[m2])            # m1 missing -> MT of m2
        t2 = torch.where(has2, cls[m2], mt[m1])            # m2 missing -> MT of m1
        return t1, t2

    def classify(self, cls, mt, present):
        t1, t2 = self.select_tokens(cls, mt, present)
        return self.head(t1 + t2)                          # (B, C)  eq. 5: sum fusion, linear head

    def forward(self, batch):
        cls, mt = self.encode(batch)
        present = batch["present"].bool()
        return U2AOutput(self.classify(cls, mt, present), cls, mt, present)

    def parameter_table(self):
        return parameter_table(self)

    def configure_optimizer(self, lr, weight_decay, token_lr_scale=1.0, eps=1e-8):
        """AdamW (Table 5) over the trained parameters only. Where the paper is silent, as nanoGPT: decay on
        matrices (LoRA factors, head weight), none on vectors (biases; the CLS/MT tokens, which learn at
        token_lr_scale x lr). Each group's "lr_scale" is its share of the run's lr at a step."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        token = lambda n: n.endswith((".cls", ".mt"))
        groups = [dict(params=[p for n, p in named if p.dim() >= 2], weight_decay=weight_decay, lr_scale=1.0),
                  dict(params=[p for n, p in named if p.dim() < 2 and not token(n)], weight_decay=0.0, lr_scale=1.0),
                  dict(params=[p for n, p in named if token(n)], weight_decay=0.0, lr_scale=token_lr_scale)]
        return torch.optim.AdamW(groups, lr=lr, eps=eps)


# -----------------------------------------------------------------------------
# The loss: task loss + lambda * alignment of mask tokens (eq. 6-7)

def alignment_loss(out, n_complete=None, stop_grad=False):
    """Eq. 6: MSE(MT_1, CLS_2) + MSE(MT_2, CLS_1), averaged over the modality-complete samples.
    n_complete: the number of complete samples to average over (default: this batch's). Under DDP it is
    the count over all processes: eq. 6 averages over the whole batch, and a process whose share of the
    batch holds no complete sample must not halve the term's weight.
    stop_grad: the CLS targets as constants (U2AConfig.align_stop_grad), so that eq. 6 moves the MTs towards
    the CLS and never the CLS towards the MTs."""
    m1, m2 = list(out.cls)
    complete = out.present.all(1)                                     # (B,)
    cls = {m: t.float() for m, t in out.cls.items()}                  # float32 even under autocast
    if stop_grad:
        cls = {m: t.detach() for m, t in cls.items()}
    mt = {m: t.float() for m, t in out.mt.items()}
    per_sample = ((mt[m1] - cls[m2]) ** 2).mean(1) + ((mt[m2] - cls[m1]) ** 2).mean(1)  # (B,)
    n = complete.sum() if n_complete is None else n_complete
    return (per_sample * complete).sum() / torch.clamp(torch.as_tensor(n, device=per_sample.device), min=1)


def u2a_loss(out, labels, multilabel=False, lam=U2AConfig.lam, n_samples=None, n_complete=None,
             stop_grad=False):
    """Eq. 7: L_total = L_task + lambda * L_align. Returns (total, task, align).
    n_samples, n_complete: the denominators of the task and alignment means (default: this batch's
    counts); train.py passes the counts over every DDP process, so that the averaged gradients equal one
    process's. A model's own lambda and stop_grad: model.config.align_weight, .align_stop_grad."""
    logits = out.logits.float()                                       # (B, C)
    if multilabel:   # MM-IMDb: 23 genres, several per film; the mean over genres, summed over films
        task = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(1).sum()
    else:
        task = F.cross_entropy(logits, labels, reduction="sum")
    n = len(labels) if n_samples is None else n_samples
    task = task / torch.clamp(torch.as_tensor(n, device=logits.device), min=1)
    align = alignment_loss(out, n_complete, stop_grad)
    return task + lam * align, task, align


# -----------------------------------------------------------------------------
# Random modality dropout (section 3): on a complete training set, each step keeps both or drops one

def modality_dropout(present, generator=None):
    """present (B, 2) bool -> (B, 2): unchanged, m1 dropped, or m2 dropped, each with probability 1/3.
    A sample never loses its only modality (one whose other file --on-error skip marked absent)."""
    choice = int(torch.randint(3, (1,), generator=generator))
    if choice == 0:
        return present
    dropped = present.clone()
    dropped[:, choice - 1] = False
    lost_all = ~dropped.any(1)
    dropped[lost_all] = present[lost_all]
    return dropped


# -----------------------------------------------------------------------------
# A trained model: the config that builds it, and a checkpoint that rebuilds it from the file alone

def save_checkpoint(path, model, meta=None, optimizer=None):
    """Only what training changed (LoRA factors, CLS/MT tokens, head) as `model.<name>`, and the model's config
    in the file's metadata beside the caller's `meta` (train.py: the step, the run's settings). With
    `optimizer`, its state too (`optim.<name>.<key>`): all a resumed run needs to continue exactly, since
    train.py keys every random stream by the step. Written to a name of this process's own, then renamed: a
    crash leaves the previous file intact."""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in trained.items()}
    for n, p in trained.items() if optimizer is not None else ():
        for key, value in optimizer.state.get(p, {}).items():  # AdamW: step (0-dim), exp_avg, exp_avg_sq
            tensors[f"optim.{n}.{key}"] = (value.reshape(1) if value.dim() == 0 else value).detach().cpu().contiguous()
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(tensors, tmp, metadata={"u2a": json.dumps({**(meta or {}), "model": asdict(model.config)})})
    os.replace(tmp, path)


def run_folder(out, seed, method, seeds, methods):
    """Where train.py writes the run of one (seed, method) pair under its --out folder `out`: `out` itself for
    one seed and one method, <out>/<method>/ for several methods, <out>/seed<k>/ and <out>/seed<k>/<method>/
    for several seeds."""
    folder = Path(out) / f"seed{seed}" if len(seeds) > 1 else Path(out)
    return folder / method if len(methods) > 1 else folder


def run_folders(out):
    """Every folder of run_folder's layout under `out` that may hold a run (existing or not): `out`, its
    method sub-folders, its seed<k>/ folders and theirs."""
    seeds = sorted(p for p in Path(out).glob("seed*") if p.is_dir())
    return [folder for top in [Path(out), *seeds] for folder in [top] + [top / method for method in METHODS]]


RUN_FILES = ("config.json", "log.jsonl", "last.safetensors", "best.safetensors", "metrics.json")


def run_files(out, names=RUN_FILES):
    """The files `names` of the runs in folder `out` (run_folders' layout) that exist: a folder with any of
    RUN_FILES holds a run, which only train.py --resume may write into."""
    return [folder / name for folder in run_folders(out) for name in names if (folder / name).is_file()]


def write_text(path, text):
    """Whole or not at all: written to a name of this process's own, then renamed over `path`."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def append_log(folder, record):
    """One line of the run's log.jsonl (a step's losses, an epoch's validation score)."""
    with open(Path(folder) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def run_config(out):
    """The settings train.py saved in run folder `out` (its config.json), to resume the run as it was
    configured. A missing or damaged file raises FileNotFoundError or ValueError saying how to go on."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no run to resume (no {path})")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it holds the run's settings: restore it (train.py "
                         f"wrote it as indented JSON), or start a new run with another --out") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not the run's settings (an object); "
                         f"restore it, or start a new run with another --out")
    if "seed" in saved and "seeds" not in saved:  # a folder of a version with one seed per command
        saved["seeds"] = [saved["seed"]]
    return saved


def lock_run_folder(out):
    """A run folder belongs to one live run: its file `lock` holds the run's host and pid. A lock whose process
    is gone (a crash) is taken over; a live one raises FileExistsError. -> the lock file, for the run to remove."""
    lock = Path(out) / "lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a run that died
                continue
            raise FileExistsError(f"run folder {out} is in use by process {pid} on {host} (its file {lock}); "
                                  f"give another --out, or delete {lock} if that run is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return lock


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def cut_log_at_checkpoint(folder):
    """A resumed run continues from its last.safetensors' step (from 0 without one): the log.jsonl lines the
    killed run wrote after it, and a line the kill cut short, are dropped, or they would be logged twice."""
    log, last = Path(folder) / "log.jsonl", Path(folder) / "last.safetensors"
    if not log.is_file():
        return
    step, kept = open_checkpoint(last)[1]["step"] if last.is_file() else 0, []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, TypeError, KeyError):  # cut short: not one of the run's records
            continue
    write_text(log, "".join(kept))


def open_run_folder(out, config, resume=False):
    """Make `out` the folder of one live run: created, locked (lock_run_folder), on a resume each run's log cut
    back to its checkpoint (cut_log_at_checkpoint), and its settings `config` written as config.json.
    -> the lock file, for the run to remove when it ends."""
    Path(out).mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(out)
    for folder in run_folders(out) if resume else []:
        cut_log_at_checkpoint(folder)
    write_json(Path(out) / "config.json", config)
    return lock


def checkpoint_file(path):
    """The checkpoint file `path` names: the file itself, or in a train.py run folder its best.safetensors
    (the validation-selected model), at the top or in the folder's one run (run_folders)."""
    path = Path(path)
    if path.is_file():
        return path
    expected = ("expected a checkpoint file (<run>/best.safetensors) or a run folder holding one "
                "(the --out folder of train.py)")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found: {expected}")
    if (path / "best.safetensors").is_file():
        return path / "best.safetensors"
    found = run_files(path, ["best.safetensors"])  # not at the top: in the folder's runs
    if len(found) == 1:
        return found[0]
    if found:  # which method the caller wants is theirs to say
        names = ", ".join(str(f.relative_to(path)) for f in found)
        raise ValueError(f"run folder {path} holds {len(found)} checkpoints: {names}; pass one of them, "
                         f"e.g. u2a.from_checkpoint('{found[0]}')")
    others = sorted(str(f.relative_to(path)) for f in path.rglob("*.safetensors"))
    raise FileNotFoundError(f"{path} holds no best.safetensors, in it or in a run's subfolder ({expected}); "
                            f"safetensors files in it: {', '.join(others) if others else 'none'}"
                            + ("; pass last.safetensors by name to use the last saved step"
                               if "last.safetensors" in others else ""))


def open_checkpoint(path):
    """-> (open safetensors file, metadata dict) of a checkpoint written by save_checkpoint. path: the file,
    or a run folder holding one (checkpoint_file)."""
    path = checkpoint_file(path)
    try:
        f = safe_open(str(path), framework="pt")  # never torch.load: unpickling can run arbitrary code
        return f, json.loads(f.metadata()["u2a"])
    except Exception as err:
        raise ValueError(f"{path} is not a safetensors checkpoint written by u2a ({err})") from None


def load_trained(model, path, optimizer=None):
    """Copy a checkpoint's trained tensors into `model` (and its optimizer state into `optimizer`, given one);
    every one must fit and be finite (a run that diverged saves NaN, and a model loaded from it would predict
    NaN for every input). Returns the metadata."""
    path = checkpoint_file(path)
    f, meta = open_checkpoint(path)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    found = {k[len("model."):] for k in f.keys() if k.startswith("model.")}
    misfit = sorted(n for n in expected & found if tuple(f.get_slice(f"model.{n}").get_shape()) != params[n].shape)
    if found != expected or misfit:
        trained = meta.get("model", {})
        raise ValueError(f"{path}: its trained tensors do not fit this model (it was trained with method "
                         f"{trained.get('method')}, rank {trained.get('rank')}, "
                         f"{len(trained.get('class_names', []))} classes); missing {sorted(expected - found)[:3]}, "
                         f"unexpected {sorted(found - expected)[:3]}, other shapes {misfit[:3]}")
    tensors = {n: f.get_tensor(f"model.{n}") for n in sorted(expected)}  # all checked before any is copied
    for n, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{path}: model.{n} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} (of {t.numel()}): "
                             "the training that wrote it diverged; use an earlier checkpoint or retrain "
                             "(a lower --lr, for one)")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    for n in sorted(expected) if optimizer is not None else ():  # save_checkpoint's optimizer state
        state = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == f"optim.{n}"}
        if state:
            optimizer.state[params[n]] = {k: v.reshape(()) if k == "step" else v.to(params[n].device)
                                          for k, v in state.items()}
    return meta


def saved_config(meta, path):
    """The U2AConfig a checkpoint's metadata stores; a config written by another version of u2a (fields
    this one does not know, or lacks) is refused by name rather than half-read."""
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} has no model config in its metadata: not a checkpoint written by "
                         "u2a.save_checkpoint")
    known = {f.name: f for f in fields(U2AConfig)}
    unknown = sorted(set(saved) - set(known))
    lacking = [name for name, f in known.items()
               if name not in saved and f.default is MISSING and f.default_factory is MISSING]
    if unknown or lacking:
        problems = ([f"fields unknown here: {', '.join(unknown)}"] if unknown else []) + \
                   ([f"it lacks: {', '.join(lacking)}"] if lacking else [])
        raise ValueError(f"{path} comes from another version of u2a: its model config does not fit this "
                         f"version's U2AConfig ({'; '.join(problems)}); load it with the version of u2a that "
                         "wrote it, or retrain with this one")
    return U2AConfig(**saved)


def check_trained_on(path, class_names, encoders=None):
    """Before a checkpoint's model is resumed or evaluated: it was trained on these classes (the data's, in
    label order) and, given `encoders` ({modality: folder} where they are now), with encoders of the same
    config. A ValueError says which differ: found now, before anything is written."""
    trained = open_checkpoint(path)[1]["model"]
    there, here = list(trained["class_names"]), list(class_names)
    if here != there:
        lost, added = [c for c in there if c not in here], [c for c in here if c not in there]
        differ = ([f"not in the data given: {', '.join(lost[:5])}"] if lost else []) + \
                 ([f"in the data given, not in the checkpoint: {', '.join(added[:5])}"] if added else [])
        if not differ:  # the same names in another order: each label would mean another class
            i = next(i for i, (a, b) in enumerate(zip(there, here)) if a != b)
            differ = [f"the same classes in another label order (first: label {i} is {there[i]} there, {here[i]} here)"]
        raise ValueError(f"{path} was trained on {len(there)} classes ({', '.join(there[:5])}, ...) of its dataset; "
                         f"the data given has {len(here)}: {'; '.join(differ)}")
    differ = [m for m, expected in trained.get("encoder_configs", {}).items()
              if encoders and asdict(encoder_config(m, encoders[m])) != expected]
    if differ:
        raise ValueError(f"{path} was trained with other {' and '.join(differ)} encoders than those at "
                         f"{', '.join(str(encoders[m]) for m in differ)} (their config.json differs); point "
                         f"--weights at the encoders the run was trained with")


def from_checkpoint(path, encoders=None):
    """The trained model of a checkpoint, rebuilt from the file alone, in eval mode. path: the file, or a
    run folder holding one (checkpoint_file). encoders: {modality: folder} where the pretrained encoders are
    now, if they moved since training."""
    path = checkpoint_file(path)
    _, meta = open_checkpoint(path)
    config = saved_config(meta, path)
    if encoders:
        config.encoders = {m: str(encoders[m]) for m in config.encoders}
    model = U2A(config)
    load_trained(model, path)
    return model.eval()


# -----------------------------------------------------------------------------
# Scoring the paper's scenarios (section 4.4). A present modality's CLS and MT outputs depend on that
# modality alone (each encoder reads only its own input), so a split is encoded once with every modality
# it has, and each scenario is then eq. 4-5 over the stored tokens: the same select_tokens + head as the
# forward pass, exact, and ~10x cheaper than re-running the encoders per scenario.

def to_device(batch, device):
    """A batch's tensors on `device` (its other entries as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_batch(model, inputs, tokenizer=None):
    """{modality: B inputs, None where missing} -> the batch `model` reads, on its device: encoders.batch_inputs
    at the size of the model's image encoder, with `tokenizer` (default: the text encoder's own folder's,
    truncating where the run did, config.text_max_len, or else at the encoder's longest input)."""
    if "text" in model.modalities and tokenizer is None:
        longest = model.branches["text"].encoder.config.max_position_embeddings
        tokenizer = load_tokenizer(model.config.encoders["text"], model.config.text_max_len or longest)
    # the side of images and video frames: the model's ViT's own (a model without one never reads it)
    sizes = [model.branches[m].encoder.config.image_size for m in model.modalities if m in ("image", "video")]
    batch = batch_inputs({m: inputs[m] for m in model.modalities}, tokenizer, sizes[0] if sizes else IMAGE_SIZE)
    return to_device(batch, model.head.weight.device)


@torch.no_grad()
def placeholder_tokens(model, tokenizer=None):
    """The naive baseline's stand-ins: each encoder's CLS on the paper's placeholders (one sample missing
    every modality, which encoders.batch_inputs fills with zeros / ""), {modality: (1, D)}. tokenizer: the
    run's (the placeholder text "" is [CLS][SEP] whatever its length limit); default: model_batch's."""
    was_training = model.training  # in training mode LoRA's dropout would draw the stand-ins at random
    cls, _ = model.eval().encode(model_batch(model, {m: [None] for m in model.modalities}, tokenizer))
    model.train(was_training)
    return {m: cls[m].float().cpu() for m in model.modalities}


@torch.no_grad()
def encode_batches(model, batches, device, autocast=nullcontext()):
    """A split's tokens, encoded once: {"cls.<m>", "mt.<m>": [(b, D) per batch], "labels", "present",
    "index": [per batch], "unreadable": [(1,) per batch]}, CPU float tensors kept per batch (so that DDP
    processes can gather them before one torch.cat). batches: data.make_loader's; "unreadable" counts the
    files that failed to decode (on_error="skip"), and a batch whose samples were all skipped adds no tokens."""
    model.eval()
    parts = {"labels": [], "present": [], "index": [], "unreadable": []}
    for batch in batches:
        parts["unreadable"].append(batch["unreadable"].reshape(1))
        if len(batch["index"]) == 0:
            continue
        batch = to_device(batch, device)
        with autocast:
            cls, mt = model.encode(batch)
        for m in model.modalities:
            parts.setdefault(f"cls.{m}", []).append(cls[m].float().cpu())
            parts.setdefault(f"mt.{m}", []).append(mt[m].float().cpu())
        for key, name in (("labels", "label"), ("present", "present"), ("index", "index")):
            parts[key].append(batch[name].cpu())
    return parts


@torch.no_grad()
def scenario_logits(model, tokens, present, placeholders=None):
    """Eq. 4-5 over stored tokens {"cls.<m>", "mt.<m>": (n, D)} under a present table (n, 2) -> (n, C)
    float32 on the CPU. The naive baseline's missing CLS become its placeholders' CLS, as in its forward."""
    encoded = tokens.get("present", torch.ones_like(present)).to(present.device)  # (n, 2): the inputs encoded
    if placeholders is None and model.method.stand_in == "placeholder" and (encoded & ~present).any():
        # its stored CLS is the real input's: without the placeholders it would classify with the missing input
        raise ValueError(f"{model.config.method} stands in its placeholders' CLS for a missing modality: pass "
                         "placeholders=u2a.placeholder_tokens(model, tokenizer) to score a table that drops one")
    device = model.head.weight.device
    cls = {m: tokens[f"cls.{m}"].to(device) for m in model.modalities}
    mt = {m: tokens[f"mt.{m}"].to(device) for m in model.modalities}
    present = present.to(device)
    if placeholders is not None:
        cls = {m: torch.where(present[:, i:i + 1], cls[m], placeholders[m].to(device))
               for i, m in enumerate(model.modalities)}
    return model.classify(cls, mt, present).float().cpu()


def scores(logits, labels, multilabel):
    """Accuracy (Food-101, audio-video) or F1-macro/micro at 0.5 (MM-IMDb), with per-class scores."""
    if multilabel:
        pred, truth = logits.sigmoid() > 0.5, labels > 0.5                    # (n, C)
        tp = (pred & truth).sum(0).float()
        fp = (pred & ~truth).sum(0).float()
        fn = (~pred & truth).sum(0).float()
        per_class = 2 * tp / (2 * tp + fp + fn).clamp(min=1)                  # F1 per class (0 if unseen)
        micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
        return {"f1_macro": 100 * per_class.mean().item(), "f1_micro": 100 * micro.item(),
                "per_class": (100 * per_class).tolist()}
    correct = (logits.argmax(1) == labels).float()                           # (n,)
    counts = torch.bincount(labels, minlength=logits.shape[1]).float()
    per_class = torch.bincount(labels, weights=correct, minlength=logits.shape[1]) / counts.clamp(min=1)
    return {"accuracy": 100 * correct.mean().item(), "per_class": (100 * per_class).tolist()}


def headline(multilabel):
    return "f1_macro" if multilabel else "accuracy"


def evaluate_scenarios(model, tokens, scenarios, placeholders=None, n=None, seed=None):
    """Scores of every scenario (data.eval_scenarios), plus the analyses behind Figures 3-6: per-class
    scores and the MSE between each MT and the CLS it stands in for. tokens: a split's stored tokens with
    "labels", "present" (the files found) and "index" (the samples, of n in the split: a skipped sample is
    absent); each scenario's table is drawn for all n with `seed`."""
    labels, multilabel = tokens["labels"], model.config.multilabel
    n = len(labels) if n is None else n
    results = {}
    for sc in scenarios:
        present = sc.table(n, seed)[tokens["index"]] & tokens["present"]  # an unreadable file stays missing
        keep = present.any(1)                                              # a sample left with nothing
        logits = scenario_logits(model, tokens, present, placeholders)
        results[sc.name] = {"groups": list(sc.groups), "shares": sc.shares,
                            **scores(logits[keep], labels[keep], multilabel)}
    # Figure 4 compares each MT with the CLS it stands in for: only a sample with both files has that CLS
    # (a missing one's is zeros for U2A, a placeholder's CLS for naive), as eq. 6 aligns only complete ones
    both = tokens["present"].all(1)                                         # (n,)
    m1, m2 = model.modalities
    mse = {f"{m1}->{m2}": ((tokens[f"mt.{m1}"][both] - tokens[f"cls.{m2}"][both]) ** 2).mean(1),  # MT_1 ~ CLS_2
           f"{m2}->{m1}": ((tokens[f"mt.{m2}"][both] - tokens[f"cls.{m1}"][both]) ** 2).mean(1)}
    per_class, labels_both = {}, labels[both]  # the labels of the samples compared
    for key, per_sample in mse.items():
        if multilabel:  # a film counts towards each of its genres
            weights = labels_both / labels_both.sum(0).clamp(min=1)
            per_class[key] = (weights * per_sample[:, None]).sum(0).tolist()
        else:
            counts = torch.bincount(labels_both, minlength=len(model.config.class_names)).clamp(min=1)
            per_class[key] = (torch.bincount(labels_both, per_sample, minlength=len(model.config.class_names))
                              / counts).tolist()
    analysis = {"mt_cls_mse": {k: v.mean().item() for k, v in mse.items()}, "mt_cls_mse_per_class": per_class}
    return results, analysis


# -----------------------------------------------------------------------------
# Predicting for a user's own inputs: an image and/or a text, either may be missing

def checked_image(image, size):
    """predict's image once a path or PIL image has been preprocessed: None, or a preprocessed (3, size, size)
    float tensor (encoders.clip_image's output), finite and in its range (preprocessed_image_problem) -> float32."""
    if image is None:
        return None
    accepted = f"a file path, a PIL image or a preprocessed (3, {size}, {size}) float tensor (encoders.clip_image)"
    if not isinstance(image, torch.Tensor):
        hint = ": wrap an array of pixels with PIL.Image.fromarray" if type(image).__name__ == "ndarray" else ""
        raise TypeError(f"predict: image must be {accepted}, got {type(image).__name__}{hint}")
    if not image.is_floating_point():  # raw pixels: without CLIP's mean/std the encoder reads another image
        raise TypeError(f"predict: an image tensor must be preprocessed floats, got {image.dtype}: pass raw "
                        f"pixels as a PIL image (PIL.Image.fromarray) or a file path instead, or preprocess "
                        f"them with encoders.clip_image")
    if tuple(image.shape) != (3, size, size):
        raise ValueError(f"the image encoder takes (3, {size}, {size}) images, got {tuple(image.shape)}")
    problem = preprocessed_image_problem(image)  # NaN/Inf, or e.g. 0..255 pixels made float
    if problem:
        raise ValueError(f"predict: the image tensor {problem}")
    return image.float()


def checked_text(text):
    """predict's text argument -> one string, or None for a missing text (None, or blank:
    encoders.is_missing_text). Anything else is refused here, rather than by the tokenizer, which reads a list as
    a text pair and fails on bytes with an error that names neither."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        raise TypeError(f"predict takes one text (a string), got a {type(text).__name__}: call it once per text")
    if not isinstance(text, str):
        hint = ": decode it first, e.g. text.decode('utf-8')" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"predict: text must be a string (or None when missing), got {type(text).__name__}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate, e.g. from a bad decode with errors="surrogateescape"
        raise ValueError(f"predict: text is not valid Unicode: {err.reason} at position {err.start} "
                         f"({text[err.start:err.end]!r})") from None
    return None if is_missing_text(text) else text


@torch.no_grad()
def predict(model, image=None, text=None, tokenizer=None):
    """[(class name, probability)] for one sample of an image-text model, most likely first: a softmax over
    the classes, or a sigmoid per class for a multi-label model (MM-IMDb genres).
    image: a file path, a PIL image (both through CLIP's preprocessing, encoders.clip_image, at the image
    encoder's size) or a preprocessed (3, H, W) float tensor. text: a string. A missing one (None; for text
    also "" or whitespace only: the paper's placeholder for a missing text is "") is absent in `present`: U2A
    selects the other modality's mask token for it (eq. 4), the naive baseline encodes the paper's placeholder.
    Other types, and NaN/Inf in an image tensor, are refused (checked_image, checked_text).
    tokenizer: the run's (encoders.load_tokenizer(folder, max_len)); default: the text encoder's own folder's,
    truncating where the run did (config.text_max_len), else at the encoder's longest input."""
    if set(model.modalities) != {"image", "text"}:
        raise ValueError(f"predict takes an image and a text; this model reads {model.modalities}")
    size = model.branches["image"].encoder.config.image_size  # the encoder's own: CLIP's 224, the toy ViT's 32
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as pil:
                image = clip_image(pil, size)                                 # (3, size, size)
        except (OSError, ValueError) as err:  # a file cut short, a mode or size refused: say which file
            raise (OSError if isinstance(err, OSError) else ValueError)(f"predict: image {image}: {err}") from err
    elif isinstance(image, Image.Image):
        image = clip_image(image, size)
    image, text = checked_image(image, size), checked_text(text)
    if image is None and text is None:
        raise ValueError("predict needs an image, a text or both (a blank text counts as missing)")
    config = model.config
    batch = model_batch(model, {"image": [image], "text": [text]}, tokenizer)  # one sample
    was_training = model.training
    logits = model.eval()(batch).logits[0].float()  # (C,)
    model.train(was_training)
    probs = logits.sigmoid() if config.multilabel else logits.softmax(0)
    return sorted(zip(config.class_names, probs.tolist()), key=lambda pair: -pair[1])
