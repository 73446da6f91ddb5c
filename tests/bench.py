"""
Speed benchmark: our U2A (encoders.py + lora.py + u2a.py) against the same model built the way a user would
build it without this project: transformers' CLIPVisionModel and BertModel with peft LoRA.

Both builds are made in one process from the same random weights (the hub layouts written by
tests/checkpoints.py, read by our from_pretrained and by transformers'), checked to give the same logits,
and then timed alternately: a full training step (forward, loss eq. 7, backward, AdamW step) and an eval
forward, median of several repeats after warm-up. Two more evals measure what a missing modality costs: our
U2A never runs the encoder of a missing modality (eq. 4); the reference, like any model that fills a missing
input with a placeholder, runs both encoders on every sample, and so does ours when all are present.

    python tests/bench.py --threads 1                        # CPU, float32, batch 8, text length 40 (~4 min)
    python tests/bench.py --device cuda --max-batch          # GPU, bf16 autocast: batch 8, then the largest
    python tests/bench.py --device cuda --compile            # ours compiled, as train.py --compile does

What a training step is, and how it matches train.py's (the figures are meant to predict train.py's speed):
  - the same autocast: on CUDA torch.autocast("cuda", dtype=torch.bfloat16) around forward and loss, as
    train.autocast_for (--dtype fp32 turns it off; on the CPU the default is fp32, as train.py's);
  - the same optimizer, U2A.configure_optimizer (AdamW, decay on matrices only, the Food-101 recipe's lr), the
    same loss, u2a.u2a_loss with the paper's lambda, and the paper's LoRA rank, alpha and dropout (train.PAPER);
  - --compile: torch.compile(model) with default settings on our U2A module for the training step, no DDP, as
    train.py --compile; evals stay eager, as train.py's evaluation does. The reference stays eager: it is the
    model as a transformers + peft user runs it;
  - no host synchronisation inside a step (the loss is not read back); each timed call is bracketed by
    torch.cuda.synchronize(), since wall-clock time is only meaningful once the GPU is done; train.py's loop
    also waits for the GPU once a step (its progress bar reads loss.item()).
  Not timed: data loading and the host-to-device copy, and train.py's modality dropout (on a complete training
  set two steps in three drop one modality, whose encoder then does not run): here every sample has both.

On a CPU shared with other jobs, --threads 1 gives the stable figures: with more threads than free cores,
every parallel op waits for a thread that another job holds. Not part of the default test run (pytest
collects test_*.py only); tests/test_bench.py runs it tiny.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # both builds come from local files: never download
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules

import peft
import torch
import torch.nn as nn
import transformers
from transformers.masking_utils import create_bidirectional_mask

import checkpoints  # tests/checkpoints.py: random-weight checkpoints in the hub layouts
import train
from lora import LoRALinear
from u2a import U2A, U2AConfig, U2AOutput, u2a_loss

transformers.logging.set_verbosity_error()  # its load reports list the heads (pooler, cls.*) we do not use
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # peft calls a deprecated name

# -----------------------------------------------------------------------------
# Settings (the paper's Food-101 set-up) and defaults of the command line

BATCH = 8                # paper, Food-101: batch size 8
TEXT_LEN = 40            # paper, Food-101: texts truncated/padded to 40 tokens
NUM_CLASSES = 101        # Food-101
RANK, ALPHA, LORA_DROPOUT = train.PAPER["rank"], train.PAPER["alpha"], train.PAPER["lora_dropout"]
LAM = train.PAPER["lam"]  # eq. 7, weight of the alignment loss
OPTIMIZER = argparse.Namespace(lr=train.RECIPES["food101"]["lr"], weight_decay=train.PAPER["weight_decay"],
                               token_lr_scale=train.RECIPES["food101"]["token_lr_scale"])
# (what train.py gives U2A.configure_optimizer)
MISSING_RATE = 0.7       # eval: share of samples missing the text (then, separately, the image)
WARMUP, REPEATS = 2, 5
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak (no sparsity); --peak-tflops changes it
LOGIT_TOL = {"cpu": 1e-4, "cuda": 1e-3}  # fp32 agreement of the builds (encoder parity tests: 1e-4 on the CPU);
                                         # on a GPU, cuDNN's TF32 conv and SDPA's backends round differently
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]  # BERT's names for q, k, v, out


# -----------------------------------------------------------------------------
# The reference: U2A assembled from transformers + peft, the simple way

class ReferenceU2A(nn.Module):
    """
    U2A from off-the-shelf parts: each HF model's own embeddings module, our learnable CLS and MT placed
    around its output, the HF encoder stack run on that [CLS, tokens, MT] sequence (inputs_embeds path),
    CLIP's post_layernorm on the two outputs, token selection (eq. 4), sum fusion and a linear head (eq. 5).
    Both encoders run on every sample; a missing modality's placeholder input is encoded and then ignored.
    In train mode BERT's own dropout (hidden 0.1, attention 0.1) is active, as in any HF model; CLIP's is 0.
    It returns our U2AOutput, so both builds are trained with the same loss code (u2a.u2a_loss, eq. 6-7).
    """

    def __init__(self, clip_dir, bert_dir, num_classes, encoder_dropout=True):
        super().__init__()
        # sdpa: transformers' fastest built-in attention, the same kernel our encoders call
        clip = transformers.CLIPVisionModel.from_pretrained(clip_dir, attn_implementation="sdpa")
        extra = {} if encoder_dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        bert = transformers.BertModel.from_pretrained(bert_dir, attn_implementation="sdpa", **extra)
        lora = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=LORA_DROPOUT)
        self.clip = peft.get_peft_model(clip, peft.LoraConfig(target_modules=CLIP_TARGETS, **lora))
        self.bert = peft.get_peft_model(bert, peft.LoraConfig(target_modules=BERT_TARGETS, **lora))
        D = clip.config.hidden_size
        self.image_cls, self.image_mt = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.text_cls, self.text_mt = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.head = nn.Linear(D, num_classes)

    def image_branch(self, pixel_values):
        vision = self.clip.get_base_model()                        # CLIPVisionModel with LoRA layers inside
        tokens = vision.embeddings(pixel_values)[:, 1:]            # (B, 196, D): our CLS replaces CLIP's
        B = tokens.shape[0]
        seq = torch.cat([self.image_cls.expand(B, 1, -1), tokens, self.image_mt.expand(B, 1, -1)], 1)
        h = vision.encoder(inputs_embeds=vision.pre_layrnorm(seq)).last_hidden_state  # (B, 198, D)
        return vision.post_layernorm(h[:, 0]), vision.post_layernorm(h[:, -1])

    def text_branch(self, input_ids, attention_mask):
        text = self.bert.get_base_model()                          # BertModel with LoRA layers inside
        tokens = text.embeddings(input_ids=input_ids)[:, 1:]       # (B, L-1, D): our CLS replaces [CLS]
        B = tokens.shape[0]
        seq = torch.cat([self.text_cls.expand(B, 1, -1), tokens, self.text_mt.expand(B, 1, -1)], 1)
        always = attention_mask.new_ones(B, 1)
        mask = torch.cat([always, attention_mask[:, 1:], always], 1)  # (B, L+1)
        mask = create_bidirectional_mask(config=text.config, inputs_embeds=seq, attention_mask=mask)  # as BertModel
        h = text.encoder(seq, attention_mask=mask).last_hidden_state  # (B, L+1, D)
        return h[:, 0], h[:, -1]                                   # BERT has no final norm

    def forward(self, batch):
        present = batch["present"].bool()                          # (B, 2)
        image_cls, image_mt = self.image_branch(batch["image"])
        text_cls, text_mt = self.text_branch(batch["input_ids"], batch["attention_mask"])
        t1 = torch.where(present[:, :1], image_cls, text_mt)       # eq. 4
        t2 = torch.where(present[:, 1:], text_cls, image_mt)
        logits = self.head(t1 + t2)                                # eq. 5
        return U2AOutput(logits, {"image": image_cls, "text": text_cls}, {"image": image_mt, "text": text_mt},
                         present)


def lora_pairs(ours, ref):
    """(our LoRALinear, peft's lora Linear) for every adapted projection, in the same order."""
    vit, bert = ours.branches["image"].encoder, ours.branches["text"].encoder
    clip_layers = ref.clip.get_base_model().encoder.layers
    bert_layers = ref.bert.get_base_model().encoder.layer
    for block, layer in zip(vit.blocks, clip_layers):
        a = layer.self_attn
        yield from zip([block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj],
                       [a.q_proj, a.k_proj, a.v_proj, a.out_proj])
    for block, layer in zip(bert.blocks, bert_layers):
        s, o = layer.attention.self, layer.attention.output
        yield from zip([block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj],
                       [s.query, s.key, s.value, o.dense])


@torch.no_grad()
def copy_trainable(ours, ref):
    """Give the reference our LoRA factors, CLS/MT tokens and head: the two builds become one model."""
    pairs = list(lora_pairs(ours, ref))
    assert len(pairs) == 4 * (len(ours.branches["image"].encoder.blocks) + len(ours.branches["text"].encoder.blocks))
    for mine, theirs in pairs:
        assert isinstance(mine, LoRALinear), type(mine)
        theirs.lora_A["default"].weight.copy_(mine.lora_A)
        theirs.lora_B["default"].weight.copy_(mine.lora_B)
    for m in ("image", "text"):
        getattr(ref, f"{m}_cls").copy_(ours.branches[m].cls)
        getattr(ref, f"{m}_mt").copy_(ours.branches[m].mt)
    ref.head.load_state_dict(ours.head.state_dict())


def build(full=True, encoder_dropout=True, seed=0, device="cpu"):
    """Both builds on the same random weights. full=False: the small test sizes of tests/checkpoints.py."""
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = checkpoints.save_clip(os.path.join(tmp, "clip"), full=full, seed=seed)
        bert_dir = checkpoints.save_bert(os.path.join(tmp, "bert"), full=full, seed=seed + 1)
        torch.manual_seed(seed)
        config = U2AConfig(encoders={"image": clip_dir, "text": bert_dir}, class_names=list(range(NUM_CLASSES)),
                           rank=RANK, alpha=ALPHA, lora_dropout=LORA_DROPOUT)
        ours = U2A(config)
        ref = ReferenceU2A(clip_dir, bert_dir, NUM_CLASSES, encoder_dropout)
    # A fresh adapter has B = 0 (LoRA's init); random B makes the logit check cover the LoRA branch too.
    for mod in ours.modules():
        if isinstance(mod, LoRALinear):
            nn.init.normal_(mod.lora_B, std=0.02)
    copy_trainable(ours, ref)
    return ours.to(device), ref.to(device)


# -----------------------------------------------------------------------------
# Batches (the keys encoders.batch_inputs writes)

def make_batch(ours, B, L, present=None, seed=0, device="cpu"):
    """Random images and right-padded texts of random length; present (B, 2) bool, default all True.
    Missing slots hold the paper's placeholders (encoders.batch_inputs): a zero image, the empty text [CLS][SEP]."""
    g = torch.Generator().manual_seed(seed)
    vit, bert = ours.branches["image"].encoder.config, ours.branches["text"].encoder.config
    if present is None:
        present = torch.ones(B, 2, dtype=torch.bool)
    lengths = torch.randint(L // 4, L + 1, (B,), generator=g)
    lengths[0] = L                                                     # one full-length text
    lengths[~present[:, 1]] = 2                                        # [CLS][SEP]
    first_word = 1000 if bert.vocab_size > 1000 else 10                # skip bert-base's specials and [unused*]
    ids = torch.randint(first_word, bert.vocab_size, (B, L), generator=g)
    ids[:, 0] = bert.cls_token_id
    positions = torch.arange(L)[None]                                  # (1, L)
    ids[positions == (lengths[:, None] - 1)] = bert.cls_token_id + 1   # a stand-in [SEP] id (102 in bert-base)
    mask = (positions < lengths[:, None]).long()                       # (B, L)
    image = torch.randn(B, vit.num_channels, vit.image_size, vit.image_size, generator=g)
    batch = {
        "image": image * present[:, 0, None, None, None],              # zeros where the image is missing
        "input_ids": ids * mask,                                       # [PAD] = 0
        "attention_mask": mask,
        "present": present,                                            # (B, 2): image, text
        "label": torch.randint(0, NUM_CLASSES, (B,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def missing_batch(ours, B, L, modality, rate, seed=0, device="cpu"):
    """round(rate * B) samples, at random rows, miss `modality` ("image" or "text")."""
    g = torch.Generator().manual_seed(seed + 1)
    present = torch.ones(B, 2, dtype=torch.bool)
    present[torch.randperm(B, generator=g)[:round(rate * B)], ("image", "text").index(modality)] = False
    return make_batch(ours, B, L, present, seed, device)


# -----------------------------------------------------------------------------
# What is timed

def autocast(device, dtype):
    """train.py's own context for --precision `dtype` (train.autocast_for)."""
    return train.autocast_for(torch.device(device), dtype)


def make_optimizer(model):
    """U2A.configure_optimizer with train.py's arguments, for our model and the reference alike."""
    return U2A.configure_optimizer(model, OPTIMIZER.lr, OPTIMIZER.weight_decay, OPTIMIZER.token_lr_scale,
                                   train.ADAMW_EPS)


def train_step(model, opt, batch, amp=nullcontext()):
    """One full training step: forward, loss (eq. 7), backward, AdamW."""
    model.train()
    opt.zero_grad(set_to_none=True)
    with amp:
        out = model(batch)
        loss, _, _ = u2a_loss(out, batch["label"], lam=LAM)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def eval_forward(model, batch, amp=nullcontext()):
    model.eval()
    with amp:
        return model(batch).logits


def check_same_logits(ours, ref, batches):
    """Before timing: in eval mode (no dropout) the two builds are one model, up to float rounding."""
    worst = 0.0
    for batch in batches:
        a, b = eval_forward(ours, batch), eval_forward(ref, batch)
        tol = LOGIT_TOL[a.device.type]
        assert torch.allclose(a, b, atol=tol, rtol=tol), f"logits differ by {(a - b).abs().max():.2e}"
        worst = max(worst, (a - b).abs().max().item())
    return worst


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(fns, warmup, repeats, device):
    """{name: (median wall seconds, median process CPU seconds)}. Every repeat runs each fn once, in an order
    rotated each repeat, so slow drift of a shared machine (other jobs, clocks, caches) falls on all builds
    alike. CPU time (all threads of this process) does not count the time other jobs hold the cores; with one
    thread it is the most stable measure on a shared machine."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {n: tuple(statistics.median(x) for x in zip(*t)) for n, t in times.items()}


# -----------------------------------------------------------------------------
# FLOPs: matmuls only, counted analytically (a multiply-add is 2 FLOPs)
#
# Per encoder layer on a sequence of S tokens, width D, MLP width F, LoRA rank r:
#   projections q, k, v, out and the MLP: 2*S*(4*D*D + 2*D*F); attention QK^T and PV: 2 * 2*S*S*D;
#   LoRA: 4 projections x (D->r, r->D): 2*S*4*2*D*r. Plus the patch-embedding conv and the head.
# Backward of a step: the encoders are frozen, so a frozen matmul costs only its input gradient (1x forward);
# attention has no weights but needs dQ, dK, dV and dP (2x forward); LoRA and the head get input and weight
# gradients (2x forward); the patch conv gets none (its input is data, its weight frozen).
# Not counted: LayerNorm, softmax, GELU, adds, the optimizer. Padded text tokens are counted: SDPA computes them.
# Both builds are credited with these FLOPs of the full model (every position through every block).

def encoder_flops(cfg, n, S, rank):
    """(projections+MLP, attention, LoRA) forward FLOPs of n sequences of S tokens."""
    D, F, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    dense = 2 * n * S * (4 * D * D + 2 * D * F) * layers
    attn = 2 * 2 * n * S * S * D * layers
    lora = 2 * n * S * 4 * 2 * D * rank * layers
    return dense, attn, lora


def step_flops(ours, B, L, image_rows, text_rows, train):
    """FLOPs of one step of U2A at batch B, text length L, each encoder run on the rows that have its modality."""
    vit, bert = ours.branches["image"].encoder.config, ours.branches["text"].encoder.config
    patches = (vit.image_size // vit.patch_size) ** 2
    conv = 2 * image_rows * patches * vit.num_channels * vit.patch_size ** 2 * vit.hidden_size
    head = 2 * B * vit.hidden_size * NUM_CLASSES
    v = encoder_flops(vit, image_rows, patches + 2, RANK)   # [CLS, 196 patches, MT]
    t = encoder_flops(bert, text_rows, L + 1, RANK)         # [CLS, L-1 tokens, MT]
    dense, attn, lora = (a + b for a, b in zip(v, t))
    forward = conv + dense + attn + lora + head
    if not train:
        return forward
    return forward + dense + 2 * attn + 2 * lora + 2 * head


# -----------------------------------------------------------------------------
# The benchmark

def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def run(ours, ref, B, L, args, ours_train):
    """Times every case at batch B; returns printable rows and the ratios. ours_train: the module our
    training steps call (ours, or torch.compile(ours) with --compile)."""
    dev, amp = args.device, autocast(args.device, args.dtype)
    full = make_batch(ours, B, L, seed=1, device=dev)
    no_text = missing_batch(ours, B, L, "text", args.missing_rate, seed=2, device=dev)
    no_image = missing_batch(ours, B, L, "image", args.missing_rate, seed=3, device=dev)
    k = int((~no_text["present"][:, 1]).sum())
    opts = {"ours": make_optimizer(ours), "ref": make_optimizer(ref)}

    steps = time_round_robin({
        "ours": lambda: train_step(ours_train, opts["ours"], full, amp),
        "ref": lambda: train_step(ref, opts["ref"], full, amp),
    }, args.warmup, args.repeats, dev)
    # Both encoders on every sample costs the same whatever the "present" flags say (the reference always
    # does it), so the all-present eval is the baseline the missing-modality evals are compared with.
    evals = time_round_robin({
        "ours": lambda: eval_forward(ours, full, amp),
        "ref": lambda: eval_forward(ref, full, amp),
        "no_text": lambda: eval_forward(ours, no_text, amp),
        "no_image": lambda: eval_forward(ours, no_image, amp),
    }, args.warmup, args.repeats, dev)

    f_train, f_eval = step_flops(ours, B, L, B, B, True), step_flops(ours, B, L, B, B, False)
    f_no_text, f_no_image = step_flops(ours, B, L, B, B - k, False), step_flops(ours, B, L, B - k, B, False)
    rows = [  # (case, build, (wall, cpu) seconds, FLOPs the build computes)
        ("train step", "ours", steps["ours"], f_train),
        ("train step", "reference", steps["ref"], f_train),
        ("eval, all present", "ours", evals["ours"], f_eval),
        ("eval, all present", "reference", evals["ref"], f_eval),
        (f"eval, {k}/{B} texts missing", "ours", evals["no_text"], f_no_text),
        (f"eval, {k}/{B} images missing", "ours", evals["no_image"], f_no_image),
    ]
    wall = {name: t[0] for name, t in {**{"train_" + n: v for n, v in steps.items()}, **evals}.items()}
    cpu = {name: t[1] for name, t in {**{"train_" + n: v for n, v in steps.items()}, **evals}.items()}
    ratios = {
        "train": (wall["train_ours"] / wall["train_ref"], cpu["train_ours"] / cpu["train_ref"]),
        "eval": (wall["ours"] / wall["ref"], cpu["ours"] / cpu["ref"]),
        "no_text": (wall["ours"] / wall["no_text"], wall["ref"] / wall["no_text"], f_eval / f_no_text),
        "no_image": (wall["ours"] / wall["no_image"], wall["ref"] / wall["no_image"], f_eval / f_no_image),
    }
    return rows, ratios, k


def print_table(rows, ratios, k, B, args):
    peak = args.peak_tflops * 1e12 if args.device == "cuda" and args.dtype == "bf16" else None
    cpu_col = args.device == "cpu"  # on a GPU the process's CPU time says nothing about the step
    head = (f"{'case':<26} {'build':<10} {'wall ms':>9}" + (f" {'cpu ms':>9}" if cpu_col else "")
            + f" {'samples/s':>10} {'TFLOP/s':>8}" + ("  % bf16 peak" if peak else ""))
    print(f"\nbatch {B}, text length {args.text_len}\n{head}\n" + "-" * len(head))
    for case, build_name, (wall, cpu), flops in rows:
        print(f"{case:<26} {build_name:<10} {wall * 1e3:>9.0f}" + (f" {cpu * 1e3:>9.0f}" if cpu_col else "")
              + f" {B / wall:>10.2f} {flops / wall / 1e12:>8.3f}"
              + (f"  {100 * flops / wall / peak:>11.1f}" if peak else ""))
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    (tw, tc), (ew, ec) = ratios["train"], ratios["eval"]
    cpu = lambda r: f", {r:.3f} cpu" if cpu_col else ""  # noqa: E731
    print(f"train step ours/reference: {tw:.3f} wall{cpu(tc)}   (target <= 0.9: {verdict(tw <= 0.9)})")
    print(f"eval       ours/reference: {ew:.3f} wall{cpu(ec)}")
    for key, what in (("no_text", "texts"), ("no_image", "images")):
        up, up_ref, bound = ratios[key]
        target = f"   (target >= 1.5: {verdict(up >= 1.5)})" if key == "no_text" else ""
        print(f"eval throughput, {k}/{B} {what} missing: {up:.2f}x ours with both encoders, {up_ref:.2f}x the "
              f"reference; skipping can give at most {bound:.2f}x (FLOP ratio){target}")


def max_batch(ours, ref, L, args, start, ours_train):
    """Largest batch (start * 2^k) at which a training step of both builds fits in GPU memory."""
    amp, best, B = autocast(args.device, args.dtype), None, start
    while B <= args.max_batch_limit:
        try:
            batch = make_batch(ours, B, L, seed=1, device=args.device)
            for model in (ours_train, ref):
                train_step(model, make_optimizer(model), batch, amp)
            torch.cuda.synchronize()
            best, B = B, 2 * B
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            for model in (ours, ref):
                model.zero_grad(set_to_none=True)
            batch = None
            torch.cuda.empty_cache()
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"],
                   help="bf16 = autocast, weights stay fp32 (default: bf16 on cuda, as train.py; fp32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model for the training step, "
                                                          "as train.py --compile (the reference stays eager)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--text-len", type=int, default=TEXT_LEN)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, the same for both")
    p.add_argument("--missing-rate", type=float, default=MISSING_RATE, help="share of samples missing a modality")
    p.add_argument("--no-reference-dropout", action="store_true",
                   help="turn off BERT's own dropout in the reference (ours has none in its frozen encoders)")
    p.add_argument("--max-batch", action="store_true", help="cuda: also time the largest batch that fits")
    p.add_argument("--max-batch-limit", type=int, default=4096)
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS / 1e12, help="the GPU's dense bf16 peak")
    p.add_argument("--small", action="store_true", help="tests/checkpoints.py's small models (smoke test only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible to torch")
    if args.max_batch and args.device != "cuda":
        p.error("--max-batch searches GPU memory: use it with --device cuda")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")  # train.autocast_for's choice
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ours, ref = build(full=not args.small, encoder_dropout=not args.no_reference_dropout, device=args.device)
    check = [make_batch(ours, 4, args.text_len, seed=0, device=args.device),
             missing_batch(ours, 4, args.text_len, "text", 0.5, seed=0, device=args.device),
             missing_batch(ours, 4, args.text_len, "image", 0.5, seed=0, device=args.device)]
    worst = check_same_logits(ours, ref, check)
    print_header(args, worst, time.perf_counter() - t0)
    ours_train = torch.compile(ours) if args.compile else ours  # train.py: train_model = torch.compile(model)

    batches = [args.batch]
    if args.max_batch:
        biggest = max_batch(ours, ref, args.text_len, args, args.batch, ours_train)
        print(f"largest batch (batch * 2^k) at which both builds train: {biggest}")
        if biggest and biggest != args.batch:
            batches.append(biggest)
    for B in batches:
        rows, ratios, k = run(ours, ref, B, args.text_len, args, ours_train)
        print_table(rows, ratios, k, B, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def print_header(args, worst, seconds):
    models = "small test models" if args.small else "ViT-B/16 + BERT-base"
    bert_dropout = "none (--no-reference-dropout)" if args.no_reference_dropout else "BERT's hidden+attention 0.1"
    print(f"U2A: ours (encoders.py + lora.py + u2a.py) vs reference (transformers {transformers.__version__} "
          f"CLIPVisionModel + BertModel, sdpa; peft {peft.__version__} LoRA)")
    print(f"{models}, LoRA r={RANK} alpha={ALPHA:g} dropout={LORA_DROPOUT} on q/k/v/out, CLS + MT tokens, sum "
          f"fusion, {NUM_CLASSES}-way head; loss CE + {LAM} * alignment MSE; U2A.configure_optimizer's AdamW "
          f"(lr {OPTIMIZER.lr:g}, decay {OPTIMIZER.weight_decay:g} on matrices)")
    print(f"same weights: eval logits agree, max |diff| {worst:.1e} (built and checked in {seconds:.0f} s)")
    print(f"train-mode dropout: ours LoRA's only (its frozen encoders have none); reference LoRA's + "
          f"{bert_dropout} (CLIP's is 0)")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.device} {args.dtype}; median of {args.repeats} after {args.warmup} warm-up, round-robin")
    print("train step = forward + loss + backward + AdamW, every sample with both modalities; "
          f"ours {'torch.compile(model), as train.py --compile' if args.compile else 'eager'}, reference eager; "
          "FLOPs = matmuls (step_flops)")


if __name__ == "__main__":
    main()
