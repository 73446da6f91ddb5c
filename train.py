"""
Train and evaluate U2A (paper section 4) on one dataset, then report every missing-modality scenario of the
paper. Runs as a plain script, on one CPU, one GPU, or several through torchrun (DDP).

    python train.py                                  # offline default: synthetic data + toy encoders, <1 min on CPU
    python train.py --data food101 --gpu 0           # the paper's recipe (Table 5) on UPMC Food-101
    torchrun --nproc_per_node 2 train.py --data mmimdb
    python train.py --data food101 --eval-only runs/food101-.../best.safetensors

Read top to bottom: defaults (Table 5) -> command line -> learning-rate schedule -> metrics -> checkpoints
-> evaluation over the paper's scenarios -> the training loop -> main.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
from u2a import U2A, load_encoder, modality_dropout, u2a_loss

# -----------------------------------------------------------------------------
# Defaults: the paper's Table 5 (supplementary section 2) and section 4.2

PAPER = dict(weight_decay=0.02, eps=1e-8, power=0.9, warmup_epochs=5, warmup_factor=0.1,
             rank=1, alpha=1.0, lora_dropout=0.1, lam=0.2)
RECIPES = {  # per dataset group: learning rate, epochs, batch size
    "image-text": dict(lr=1e-3, epochs=10, batch_size=8),
    "audio-video": dict(lr=5e-5, epochs=100, batch_size=4),
    # Not the paper's: the toy default is sized to finish U2A and the naive baseline in ~3 CPU minutes.
    "synthetic": dict(lr=2e-3, epochs=6, batch_size=32, warmup_epochs=1),
}
# Where each modality's pretrained encoder lives under --weights (as weights/download.py writes it).
ENCODER_FOLDERS = {"image": "clip-vit-base-patch16", "video": "clip-vit-base-patch16",
                   "text": "bert-base-uncased", "audio": "ast-finetuned-audioset"}
TOY_FOLDERS = {"image": "toy/vit", "text": "toy/bert"}  # weights/make_toy.py: tiny encoders for the default
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def recipe_of(name):
    return "synthetic" if name == "synthetic" else (
        "image-text" if data.dataset_info(name).modalities == ("image", "text") else "audio-video")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--data-root", help="dataset folder (default data/<name>/)")
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder of pretrained checkpoints")
    p.add_argument("--out", type=Path, help="run folder (default runs/<data>-<time>/)")
    p.add_argument("--gpu", type=int, help="CUDA device index; without it the run uses the CPU")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, split across DDP processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--weight-decay", type=float, default=PAPER["weight_decay"])
    p.add_argument("--rank", type=int, default=PAPER["rank"], help="LoRA rank")
    p.add_argument("--alpha", type=float, default=PAPER["alpha"], help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=PAPER["lora_dropout"])
    p.add_argument("--lam", type=float, default=PAPER["lam"], help="lambda of eq. 7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-missing-rate", type=float, help="eta for the training set, e.g. 0.7 (default 0)")
    p.add_argument("--train-missing-type", help="which modality is missing in training: m1, m2 name or 'both'")
    p.add_argument("--test-missing-rate", type=float, help="extra test setting (default: the training one)")
    p.add_argument("--test-missing-type")
    p.add_argument("--modality-dropout", choices=("auto", "on", "off"), default="auto",
                   help="auto: on when the training set is complete (section 3)")
    p.add_argument("--method", choices=("u2a", "naive"), default="u2a",
                   help="naive: no mask tokens, placeholders through the encoders (the baseline)")
    p.add_argument("--compare-naive", action=argparse.BooleanOptionalAction,
                   help="also train the naive baseline and print both (default: on for synthetic)")
    p.add_argument("--limit", type=int, help="use the first N samples of each split")
    p.add_argument("--eval-only", type=Path, metavar="CKPT", help="evaluate a checkpoint, no training")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: each epoch)")
    p.add_argument("--workers", type=int, help="DataLoader processes (default: 0 for synthetic, else up to 4)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="unreadable files")
    args = p.parse_args(argv)
    if args.data not in data.DATASETS:
        p.error(f"unknown dataset {args.data!r}: expected one of {', '.join(data.DATASETS)}")
    recipe = {**PAPER, **RECIPES[recipe_of(args.data)]}
    for key in ("epochs", "batch_size", "lr", "warmup_epochs"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    args.warmup_factor, args.power, args.eps = PAPER["warmup_factor"], PAPER["power"], PAPER["eps"]
    if args.workers is None:  # the synthetic set is already in memory: worker processes would only cost
        args.workers = 0 if args.data == "synthetic" else min(4, os.cpu_count() or 1)
    if args.compare_naive is None:
        args.compare_naive = args.data == "synthetic" and args.eval_only is None
    if args.data_root is None and args.data != "synthetic":
        args.data_root = f"data/{args.data}"
    if args.resume and args.out is None:
        p.error("--resume needs --out: the run folder to continue")
    if args.eval_only is not None:  # evaluate in the setting the checkpoint was trained in, unless told otherwise
        if not args.eval_only.is_file():
            p.error(f"--eval-only {args.eval_only}: no such checkpoint")
        trained = checkpoint_meta(args.eval_only)["config"]
        for key in ("train_missing_rate", "train_missing_type"):
            if getattr(args, key) is None:
                setattr(args, key, trained[key])
    args.train_missing_rate = args.train_missing_rate or 0.0
    return args


# -----------------------------------------------------------------------------
# Learning rate (Table 5): 0.1x during the warm-up epochs, then polynomial decay with power 0.9

def lr_factor(step, total_steps, warmup_steps, warmup_factor=PAPER["warmup_factor"], power=PAPER["power"]):
    if step < warmup_steps:
        return warmup_factor
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (1.0 - min(progress, 1.0)) ** power


# -----------------------------------------------------------------------------
# Metrics: accuracy (Food-101, audio-video) or F1-macro/micro at 0.5 (MM-IMDb), with per-class scores

def scores(logits, labels, multilabel):
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


def headline(info):
    return "f1_macro" if info.multilabel else "accuracy"


# -----------------------------------------------------------------------------
# Checkpoints: only what training changed (LoRA, CLS/MT, head), as safetensors, written atomically.
# A resumable one also carries the optimizer, the step and the RNG states; no pickle anywhere.

def trainable_state(model):
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, meta, optimizer=None):
    tensors = {f"model.{n}": t for n, t in trainable_state(model).items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().reshape(-1).contiguous() \
                        if value.dim() == 0 else value.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        tensors["rng.numpy"] = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
        meta = {**meta, "rng_python": random.getstate()}
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata={"u2a": json.dumps(meta)})
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def open_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        f = safe_open(str(path), framework="pt")
        return f, json.loads(f.metadata()["u2a"])
    except Exception as err:
        raise ValueError(f"{path} is not a safetensors checkpoint written by train.py: {err}") from None


def checkpoint_meta(path):
    return open_checkpoint(path)[1]


def load_checkpoint(path, model, optimizer=None):
    f, meta = open_checkpoint(path)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    found = {k[len("model."):] for k in f.keys() if k.startswith("model.")}
    if found != expected:
        raise ValueError(f"{path}: trainable tensors do not match this model; missing "
                         f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
    with torch.no_grad():
        for n in expected:
            params[n].copy_(f.get_tensor(f"model.{n}"))
    if optimizer is not None:
        for n in expected:
            state = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"optim.{n}.")
                     and k[len(f"optim.{n}."):].count(".") == 0}
            if state:
                p = params[n]
                optimizer.state[p] = {k: (v.reshape(()) if k == "step" else v.to(p.device)) for k, v in state.items()}
        torch.set_rng_state(f.get_tensor("rng.torch"))
        if torch.cuda.is_available() and "rng.cuda" in f.keys():
            torch.cuda.set_rng_state(f.get_tensor("rng.cuda"))
        state = np.random.get_state()
        np.random.set_state((state[0], f.get_tensor("rng.numpy").numpy().astype(np.uint32), *state[2:]))
        version, internal, gauss = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
    return meta


# -----------------------------------------------------------------------------
# Evaluation. A present modality's CLS and MT outputs depend on that modality alone (each encoder reads
# only its own input), so the test set is encoded once with both modalities and every scenario of the
# paper is then just token selection (eq. 4) + head (eq. 5) over those stored tokens: exact, and ~20x
# cheaper than re-running the encoders per scenario.

@torch.no_grad()
def encode_split(model, loader, device, autocast, desc):
    """-> dict of CPU tensors: cls/mt per modality (n, D), labels, and the set's present table."""
    model.eval()
    parts = {"labels": [], "present": []}
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = to_device(batch, device)
        with autocast:
            cls, mt = model.encode(batch)
        for m in model.modalities:
            parts.setdefault(f"cls.{m}", []).append(cls[m].float().cpu())
            parts.setdefault(f"mt.{m}", []).append(mt[m].float().cpu())
        parts["labels"].append(batch["label"].cpu())
        parts["present"].append(batch["present"].cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def placeholder_tokens(model, info, tokenizer, device):
    """The naive baseline's stand-ins: each encoder's CLS on the paper's placeholder (zeros / "")."""
    empty = {m: None for m in info.modalities}
    dummy_label = torch.zeros(info.num_classes) if info.multilabel else 0
    batch = to_device(data.collate([{**empty, "label": dummy_label, "index": 0}], info, tokenizer), device)
    cls, _ = model.encode(batch)
    return {m: cls[m].float().cpu() for m in model.modalities}


def scenario_tokens(model, feats, present, placeholders=None):
    """The selected tokens (T1, T2) of eq. 4 for stored tokens under a present table: U2A selects MT
    tokens; the naive baseline swaps in its placeholders' CLS."""
    cls = {m: feats[f"cls.{m}"] for m in model.modalities}
    mt = {m: feats[f"mt.{m}"] for m in model.modalities}
    if placeholders is not None:
        cls = {m: torch.where(present[:, i:i + 1], cls[m], placeholders[m]) for i, m in enumerate(model.modalities)}
    return model.select_tokens(cls, mt, present)


@torch.no_grad()
def scenario_logits(model, feats, present, placeholders=None):
    """Eq. 5 over stored tokens: the head of T1 + T2, on the CPU in float32."""
    t1, t2 = scenario_tokens(model, feats, present, placeholders)
    return torch.nn.functional.linear(t1 + t2, model.head.weight.float().cpu(), model.head.bias.float().cpu())


def evaluate(model, feats, info, scenarios, placeholders, seed):
    """Scores of every scenario, plus the analyses behind Figures 3-6: per-class scores and the MSE
    between each MT and the CLS it stands in for."""
    n, labels = len(feats["labels"]), feats["labels"]
    results = {}
    for sc in scenarios:
        present = sc.table(n, seed) & feats["present"]  # a file unreadable in skip mode stays missing
        keep = present.any(1)                            # a sample left with nothing cannot be scored
        logits = scenario_logits(model, feats, present, placeholders)
        results[sc.name] = {"groups": list(sc.groups), **scores(logits[keep], labels[keep], info.multilabel)}
    m1, m2 = model.modalities
    mse = {f"{m1}->{m2}": ((feats[f"mt.{m1}"] - feats[f"cls.{m2}"]) ** 2).mean(1),  # MT_1 estimates CLS_2
           f"{m2}->{m1}": ((feats[f"mt.{m2}"] - feats[f"cls.{m1}"]) ** 2).mean(1)}
    per_class = {}
    for key, per_sample in mse.items():
        if info.multilabel:  # a film counts towards each of its genres
            weights = labels / labels.sum(0).clamp(min=1)
            per_class[key] = (weights * per_sample[:, None]).sum(0).tolist()
        else:
            counts = torch.bincount(labels, minlength=info.num_classes).clamp(min=1)
            per_class[key] = (torch.bincount(labels, per_sample, minlength=info.num_classes) / counts).tolist()
    analysis = {"mt_cls_mse": {k: v.mean().item() for k, v in mse.items()}, "mt_cls_mse_per_class": per_class}
    return results, analysis


def print_tables(results, info, args, title):
    """The paper's tables: Table 4 (a whole modality missing), Table 3/6 (missing ratios), Figure 2."""
    key, (m1, m2) = headline(info), info.modalities
    label = "F1-macro / F1-micro" if info.multilabel else "accuracy (%)"
    fmt = (lambda r: f"{r['f1_macro']:6.2f} / {r['f1_micro']:6.2f}") if info.multilabel else \
        (lambda r: f"{r['accuracy']:6.2f}")
    print(f"\n== {title}: {info.name}, {label} ==")
    by_group = lambda g: [(name, r) for name, r in results.items() if g in r["groups"]]
    print("Table 4 (trained on complete data, one modality missing at test)")
    print(f"  {'available':<16}{'missing':<12}{label}")
    rows = by_group("complete") + by_group("table4")
    for name, r in rows:
        avail = [m for m, share in zip((m1, m2), name_shares(name, m1, m2)) if share > 0]
        print(f"  {' + '.join(avail):<16}{', '.join(m for m in (m1, m2) if m not in avail) or '-':<12}{fmt(r)}")
    train_setting = "complete" if not args.train_missing_rate else \
        f"{args.train_missing_type} missing {100 * args.train_missing_rate:g}%"
    print(f"Tables 3 and 6 (training: {train_setting}; test:)")
    for name, r in by_group("table3") + [x for x in by_group("table6") if "table3" not in x[1]["groups"]]:
        print(f"  {name:<28}{fmt(r)}")
    sweep = sorted(by_group("figure2"), key=lambda x: name_shares(x[0], m1, m2)[1])
    print(f"Figure 2 ({m1} 100% + {m2} x%):  " + "  ".join(f"{name_shares(n, m1, m2)[1]:g}%:{r[key]:.1f}"
                                                           for n, r in sweep))


def name_shares(name, m1, m2):
    """'image 100% + text 30%' -> (100.0, 30.0)."""
    parts = dict(p.rsplit(" ", 1) for p in name.split(" + "))
    return float(parts[m1].rstrip("%")), float(parts[m2].rstrip("%"))


# -----------------------------------------------------------------------------
# Set-up helpers: devices, DDP, seeds, data, model

def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise a single process. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        device = torch.device(f"cuda:{args.gpu}") if args.gpu is not None else torch.device("cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--gpu {args.gpu} given but CUDA is not available on this machine")
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


class EpochSampler(torch.utils.data.Sampler):
    """Epoch e visits a permutation drawn from (seed, e); rank r of w takes every w-th index, so w
    processes of batch b/w see exactly the samples of one process with batch b. `skip` batches are
    left out at the start: a resumed run continues mid-epoch without reading what it already saw."""

    def __init__(self, n, batch_size, seed, epoch, rank=0, world=1, skip=0):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        order = order[:n - n % world]  # every process gets as many samples, so none waits on a lost batch
        self.indices = order[skip * batch_size:].tolist()[rank::world]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def info_of(args):
    return data.dataset_info(args.data, None if args.data == "synthetic" else args.data_root)


def build_data(args, split):
    return data.make_dataset(args.data, args.data_root, split, train=split == "train", limit=args.limit,
                             on_error=args.on_error, seed=args.seed)


def text_tokenizer(args, info):
    """The text encoder's own WordPiece tokenizer (the synthetic set brings its toy one)."""
    if "text" not in info.modalities or args.data == "synthetic":
        return None
    return data.load_tokenizer(encoder_paths(args, info)["text"], info.text_max_len)


def autocast_for(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def encoder_paths(args, info):
    folders = TOY_FOLDERS if args.data == "synthetic" else ENCODER_FOLDERS
    paths = {}
    for m in info.modalities:
        path = Path(args.weights) / folders[m]
        if not (path / "model.safetensors").is_file():
            fetch = "python weights/make_toy.py" if args.data == "synthetic" else \
                f"python weights/download.py --dest {args.weights}"
            raise FileNotFoundError(f"no pretrained {m} encoder: {path / 'model.safetensors'} is missing; "
                                    f"get it with `{fetch}`")
        paths[m] = path
    return paths


def build_model(args, info, method):
    encoders = {m: load_encoder(m, p) for m, p in encoder_paths(args, info).items()}
    missing = "mask_token" if method == "u2a" else "placeholder"
    return U2A(encoders, info.num_classes, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout,
               missing=missing)


def make_optimizer(model, args):
    """AdamW (Table 5) over trainable parameters only; decay on matrices (LoRA factors, head weight),
    none on vectors (CLS/MT tokens, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, eps=args.eps)


# -----------------------------------------------------------------------------
# One run: train (with validation-based model selection), then evaluate on test

def run(args, method, out, rank, world, device):
    is_main = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    info = info_of(args)
    tokenizer, autocast = text_tokenizer(args, info), autocast_for(device)

    # Missing tables: drawn once from the seed and saved beside the run (section 4.4.1).
    def table(split, n):
        if not args.train_missing_rate:
            return torch.ones(n, 2, dtype=torch.bool)
        return data.missing_table(n, args.train_missing_rate, args.train_missing_type,
                                  args.seed + {"train": 0, "val": 1}[split], info.modalities)

    train_set, val_set = build_data(args, "train"), build_data(args, "val")
    train_set.set_present(table("train", len(train_set)))
    val_set.set_present(table("val", len(val_set)))
    if is_main:
        for split, ds in (("train", train_set), ("val", val_set)):
            data.save_missing_table(out / f"missing_{split}.json", ds.present, rate=args.train_missing_rate,
                                    type=args.train_missing_type, seed=args.seed)
    complete = bool(train_set.present.all())
    lam = args.lam if method == "u2a" else 0.0  # the naive baseline has no mask tokens to align
    use_dropout = method == "u2a" and (args.modality_dropout == "on" or (args.modality_dropout == "auto" and complete))

    torch.manual_seed(args.seed)  # the same LoRA initialisation on every process
    model = build_model(args, info, method).to(device)
    if is_main:
        print(f"{method}: {model.parameter_table()}")
    optimizer = make_optimizer(model, args)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the {world} processes")
    per_rank = args.batch_size // world
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total = steps_per_epoch * args.epochs
    schedule = lambda step: lr_factor(step, total, steps_per_epoch * args.warmup_epochs)
    step, best, best_step = 0, -math.inf, -1
    last_ckpt, best_ckpt = out / "last.safetensors", out / "best.safetensors"
    base = {m: str(p) for m, p in encoder_paths(args, info).items()}
    if args.resume and last_ckpt.is_file():
        meta = load_checkpoint(last_ckpt, model, optimizer)
        step, best, best_step = meta["step"], meta["best"], meta["best_step"]
        if is_main:
            print(f"resumed {last_ckpt} at step {step}/{total}")
    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # a dropped or absent modality leaves its branch without gradients

    def checkpoint(path, with_optimizer):
        meta = {"step": step, "best": best, "best_step": best_step, "method": method, "data": args.data,
                "base_checkpoints": base, "config": vars_json(args)}
        save_checkpoint(path, model, meta, optimizer if with_optimizer else None)

    def validate():
        loader = data.make_loader(val_set, per_rank * 4, False, tokenizer, args.workers, args.seed)
        feats = encode_split(model, loader, device, autocast, "val")
        return scores(scenario_logits(model, feats, feats["present"], None), feats["labels"],
                      info.multilabel)[headline(info)]

    t0, seen = time.time(), 0
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler = EpochSampler(len(train_set), args.batch_size, args.seed, epoch, rank, world, skip)
        loader = data.make_loader(train_set, per_rank, False, tokenizer, args.workers, args.seed + epoch,
                                  sampler=sampler)
        model.train()
        bar = tqdm(loader, desc=f"{method} epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                   **({} if is_main else {"disable": True}))  # (so TQDM_DISABLE=1 still works on rank 0)
        for batch in bar:
            batch = to_device(batch, device)
            if use_dropout:  # the same choice on every process: drawn from the step
                batch["present"] = modality_dropout(batch["present"],
                                                    torch.Generator().manual_seed(args.seed * 7919 + step))
            for group in optimizer.param_groups:
                group["lr"] = args.lr * schedule(step)
            with autocast:
                loss, task, align = u2a_loss(train_model(batch), batch["label"], info.multilabel, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(batch["label"]) * world
            bar.set_postfix(loss=f"{loss.item():.3f}", align=f"{align.item():.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}", sps=f"{seen / (time.time() - t0):.0f}")
            if args.save_every and step % args.save_every == 0 and is_main:
                checkpoint(last_ckpt, True)
            if step % steps_per_epoch == 0:
                break
        if is_main:  # model selection on validation, never on test
            score = validate()
            if score > best:
                best, best_step = score, step
                checkpoint(best_ckpt, False)
            checkpoint(last_ckpt, True)
            print(f"{method} epoch {epoch + 1}/{args.epochs}: val {headline(info)} {score:.2f} "
                  f"(best {best:.2f}), loss {loss.item():.3f}")
        if world > 1:
            dist.barrier()
    if is_main:
        return evaluate_run(args, model, info, tokenizer, out, best_ckpt, device, autocast, time.time() - t0)
    return None


def evaluate_run(args, model, info, tokenizer, out, ckpt, device, autocast, train_seconds=0.0):
    """Test-set evaluation of a checkpoint over every scenario of the paper; writes metrics.json."""
    meta = load_checkpoint(ckpt, model)
    test_set = build_data(args, "test")
    loader = data.make_loader(test_set, args.batch_size * 4, False, tokenizer, args.workers, args.seed)
    feats = encode_split(model, loader, device, autocast, "test")
    placeholders = placeholder_tokens(model, info, tokenizer, device) if model.missing == "placeholder" else None
    test_rate = args.test_missing_rate if args.test_missing_rate is not None else args.train_missing_rate
    test_type = args.test_missing_type or args.train_missing_type
    scenarios = data.eval_scenarios(info, test_rate, test_type, seed=args.seed)
    results, analysis = evaluate(model, feats, info, scenarios, placeholders, args.seed + 2)
    (out / "missing_test").mkdir(exist_ok=True)
    for sc in scenarios:
        data.save_missing_table(out / "missing_test" / f"{slug(sc.name)}.json", sc.table(len(test_set), args.seed + 2),
                                scenario=sc.name, seed=args.seed + 2)
    metrics = {"method": model.missing, "data": args.data, "checkpoint": str(ckpt), "best_step": meta["step"],
               "train_seconds": round(train_seconds, 1), "class_names": info.class_names,
               "scenarios": results, **analysis}
    write_json(out / "metrics.json", metrics)
    if len(feats["labels"]) * model.head.in_features <= 50_000_000:  # tokens for the notebooks' plots
        save_file({k: v.contiguous() for k, v in feats.items()}, str(out / "test_tokens.safetensors"))
    return metrics


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def vars_json(args):
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def lesson_table(metrics_by_method, info):
    """The embedded default's summary: both modalities, then each one missing, per method."""
    key, (m1, m2) = headline(info), info.modalities
    cols = [f"{m1} + {m2}", f"{m1} only", f"{m2} only"]
    names = [f"{m1} 100% + {m2} 100%", f"{m1} 100% + {m2} 0%", f"{m1} 0% + {m2} 100%"]
    lines = [f"{'':34}" + "".join(f"{c:>16}" for c in cols)]
    labels = {"u2a": "U2A (mask tokens + modality drop)", "naive": "naive (placeholders: 0 / '')"}
    for method, metrics in metrics_by_method.items():
        row = [metrics["scenarios"][n][key] for n in names]
        lines.append(f"{labels[method]:34}" + "".join(f"{v:>16.1f}" for v in row))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    seed_everything(args.seed)
    if args.out is None:
        args.out = Path("runs") / f"{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"
    is_main = rank == 0
    if is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "config.json", vars_json(args))
        if args.data == "synthetic":
            print("Offline default: synthetic image+text data and TOY encoders (tiny ViT/BERT pretrained on "
                  "synthetic shapes and words, weights/toy/). The paper's results need the real encoders "
                  "(python weights/download.py) and a real dataset: python train.py --data food101 --gpu 0")
    info = info_of(args)
    if args.eval_only:
        method = checkpoint_meta(args.eval_only)["method"]
        model = build_model(args, info, method).to(device)
        metrics = evaluate_run(args, model, info, text_tokenizer(args, info), args.out, args.eval_only, device,
                               autocast_for(device))
        print_tables(metrics["scenarios"], info, args, f"{method}, {args.eval_only}")
        return {method: metrics}
    methods = [args.method] + (["naive"] if args.compare_naive and args.method != "naive" else [])
    all_metrics, t0 = {}, time.time()
    for method in methods:
        out = args.out if len(methods) == 1 else args.out / method
        metrics = run(args, method, out, rank, world, device)
        if is_main:
            all_metrics[method] = metrics
            print_tables(metrics["scenarios"], info, args, method)
    if is_main:
        print(f"\n== Summary: {args.data}, test {headline(info)} (%), {time.time() - t0:.0f} s, run folder {args.out} ==")
        print(lesson_table(all_metrics, info))
        if args.data == "synthetic":
            print("(toy encoders on synthetic data: a demonstration of the paper's lesson, not its numbers)")
    if world > 1:
        dist.destroy_process_group()
    return all_metrics


if __name__ == "__main__":
    if "--data" not in sys.argv[1:] or "synthetic" in sys.argv[1:]:
        # The toy encoders' matrices are tiny: a second thread only spin-waits (seen here: 15 s on one
        # thread against 20-400 s on two busy cores).
        torch.set_num_threads(1)
    main()
