"""
Train and evaluate U2A (paper section 4) on one dataset, then report every missing-modality scenario of the
paper. Runs as a plain script, on one CPU, one GPU, or several through torchrun (DDP).

    python train.py                                  # offline default: 4 methods, toy encoders, ~2 min on CPU
    python train.py --data food101 --gpu 0           # the paper's recipe (Table 5) on UPMC Food-101
    python train.py --data food101 --gpu 0 --seed 0 1 2 --method u2a naive   # 6 runs; summary.md: mean ± SD
    torchrun --nproc_per_node 2 train.py --data mmimdb
    python train.py --eval-only runs/food101-.../    # a run folder or checkpoint; settings come from it
    python train.py --resume --out runs/food101-.../ # continue a run as it was configured

Read top to bottom: defaults (Table 5, one recipe row per dataset) -> the learning-rate schedule -> the
run folder and its checkpoints -> set-up (devices, data, model, optimizer) -> evaluation over the paper's
scenarios -> the summary over seeds, beside the paper's numbers -> one training step (eq. 7) -> train(), the
loop with the epoch's end in it -> the command line -> main (every (seed, method) pair, then the summary).

Every random draw of a run is keyed by the run's seed through data.stream_seed (the missing tables, each
epoch's order, modality dropout and LoRA dropout per step, frames and crops per sample), so a run is the
same whether it is resumed, split across processes or read by any number of DataLoader workers: no RNG
state has to be saved.
"""
import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

import data
import encoders
import u2a
from u2a import U2AConfig, modality_dropout, u2a_loss
from weights.download import CHECKPOINTS

# -----------------------------------------------------------------------------
# Defaults: the paper's Table 5 (supplementary section 2) and section 4.2

PAPER = dict(weight_decay=0.02, warmup_epochs=5,  # the model's own defaults are the paper's too:
             rank=U2AConfig.rank, alpha=U2AConfig.alpha, lora_dropout=U2AConfig.lora_dropout, lam=U2AConfig.lam)
ADAMW_EPS, WARMUP_FACTOR, POWER = 1e-8, 0.1, 0.9  # Table 5's values that no flag changes
# How the mask tokens train, where the paper is silent: the MT starts as the pretrained class token, as
# the CLS does; eq. 6 moves both tokens; the tokens learn at the run's learning rate.
TOKENS_AS_WRITTEN = dict(mt_init="cls", align_stop_grad=False, token_lr_scale=1.0)
# Per dataset group: learning rate, epochs, batch size, the methods trained by default
IMAGE_TEXT = dict(lr=1e-3, epochs=10, batch_size=8, method=["u2a"], **TOKENS_AS_WRITTEN)
AUDIO_VIDEO = dict(lr=5e-5, epochs=100, batch_size=4, method=["u2a"], **TOKENS_AS_WRITTEN)
# Not the paper's: the toy default (the synthetic designs) trains the four methods side by side in about a
# minute and a half on a CPU. Its token settings are those under which the toy's MTs learn to estimate the
# other modality's CLS (README, "The default run"): with the settings above, on the toy, the MTs ended at the
# constant-guess level and the complete case fell to 88.4 (seeds 0-2).
TOY = dict(lr=2e-3, epochs=12, batch_size=32, warmup_epochs=1, lam=1.0, method=list(u2a.METHODS),
           mt_init="random", align_stop_grad=True, token_lr_scale=10.0)
RECIPES = {"food101": IMAGE_TEXT, "mmimdb": IMAGE_TEXT, "cremad": AUDIO_VIDEO, "ks": AUDIO_VIDEO, "ave": AUDIO_VIDEO,
           **dict.fromkeys(data.SYNTHETIC, TOY)}  # one row per dataset of data.DATASETS
DEFAULT_DATA = "synthetic"
# Where each modality's pretrained encoder lives under --weights: weights/download.py's folders.
ENCODER_FOLDERS = {"image": CHECKPOINTS["clip"].folder, "video": CHECKPOINTS["clip"].folder,
                   "text": CHECKPOINTS["bert"].folder, "audio": CHECKPOINTS["ast"].folder}
TOY_FOLDERS = {"image": "toy/vit", "text": "toy/bert"}  # weights/make_toy.py: tiny encoders for the default
ENCODER_CONFIGS = {"image": encoders.ViTConfig, "video": encoders.ViTConfig, "text": encoders.BERTConfig,
                   "audio": encoders.ASTConfig}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
LOG_EVERY = 10  # steps between progress-bar/log updates: each one waits for the GPU (loss.item())
# A folder holding any of these holds a run: only --resume may write into it.
RUN_FILES = ("config.json", "log.jsonl", "last.safetensors", "best.safetensors", "metrics.json")


class UserError(Exception):
    """A mistake in what the user gave (a flag, a path, the data): `python train.py` prints its message as one
    `train.py: error: ...` line and exits with 2, as argparse does. Any other exception is a bug: a traceback."""


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss became NaN or infinite: bad inputs or too high a learning rate, the user's to fix."""


def defaults(name, gpu=None):
    """What a run on dataset `name` takes for every option left out, in three parts: the run's settings (the
    paper's, then its recipe row: a resumed run keeps them and refuses others), the places and the extra test
    setting (a resumed or evaluated run keeps them unless given again: its data or encoders may have moved),
    and this invocation's own (never taken from a saved run)."""
    toy = name in data.SYNTHETIC
    run = {**PAPER, **RECIPES[name], "data": name, "limit": None, "seeds": [0],
           "train_missing_rate": 0.0, "train_missing_type": None, "modality_dropout": "auto", "on_error": "raise",
           "precision": "bf16" if gpu is not None and torch.cuda.is_bf16_supported() else "fp32"}
    places = {"data_root": None if toy else f"data/{name}", "weights": WEIGHTS_DIR,
              "test_missing_rate": None, "test_missing_type": None}  # None: the training setting
    invocation = {"out": None, "eval_only": None, "resume": False, "gpu": gpu, "compile": False, "save_every": 0,
                  "workers": 0 if toy else min(4, os.cpu_count() or 1)}
    return run, places, invocation


def settings(given, saved=None):
    """The settings of a run: what you give beats what was saved (a resumed run's config.json, an evaluated
    checkpoint's) beats the dataset's defaults."""
    saved = saved or {}
    run, places, invocation = defaults(given.get("data", saved.get("data", DEFAULT_DATA)), given.get("gpu"))
    kept = {k: Path(saved[k]) if k == "weights" else saved[k] for k in (*run, *places) if k in saved}
    args = argparse.Namespace(**{**run, **places, **invocation, **kept, **given})
    args.seed = saved.get("seed", args.seeds[0])  # the seed of one run: run_pairs gives each run its own
    return args


# -----------------------------------------------------------------------------
# Learning rate (Table 5): 0.1x during the warm-up epochs, then polynomial decay with power 0.9. Our choice
# where the paper is silent: after warm-up the factor starts at 1.0 and decays over the remaining steps.

def lr_factor(step, total_steps, warmup_steps):
    if step < warmup_steps:
        return WARMUP_FACTOR
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (1.0 - min(done, 1.0)) ** POWER


# -----------------------------------------------------------------------------
# The run folder and its checkpoints. The model's part (trained tensors + U2AConfig) is u2a.save_checkpoint;
# a resumable checkpoint adds the optimizer and the step. No pickle anywhere.

def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def write_text(path, text):
    """Whole or not at all: a kill mid-write leaves the old file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # this process's own temporary name
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def vars_json(args):
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def checkpoints(out, name):
    """The files `name` (best.safetensors, last.safetensors) of the runs in a run folder."""
    return [folder / name for folder in u2a.run_folders(out) if (folder / name).is_file()]


def holds_run(out):
    """The first file of a run in folder `out` (or in its methods' folders), else None."""
    for folder in u2a.run_folders(out):
        for name in RUN_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def lock_run_folder(out):
    """A run folder belongs to one live run: `lock` holds its host and pid. A lock whose process is gone
    (a crash) is taken over; a live one is an error."""
    lock = out / "lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a run that died
                continue
            raise UserError(f"run folder {out} is in use by process {pid} on {host} (its file {lock}); "
                            f"give another --out, or delete {lock} if that run is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock


def save_resumable(path, model, optimizer, meta):
    """u2a.save_checkpoint + the optimizer state, so --resume continues exactly (the random streams are keyed
    by the step: no RNG state to save)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().reshape(-1).contiguous() \
                    if value.dim() == 0 else value.detach().cpu().contiguous()
    u2a.save_checkpoint(path, model, tensors, meta)


def load_resumable(path, model, optimizer):
    meta = u2a.load_trained(model, path)
    f, _ = u2a.open_checkpoint(path)
    for n, p in model.named_parameters():
        state = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys()
                 if k.startswith(f"optim.{n}.") and k[len(f"optim.{n}."):].count(".") == 0}
        if state:
            optimizer.state[p] = {k: (v.reshape(()) if k == "step" else v.to(p.device)) for k, v in state.items()}
    return meta


# -----------------------------------------------------------------------------
# Set-up: devices, DDP, precision, data, model, optimizer

@dataclass
class Context:
    """Where this process runs and on what: fixed at start, passed to every step that needs it."""
    rank: int
    world: int
    device: torch.device
    info: data.DatasetInfo = None
    tokenizer: object = None     # the text encoder's (text_tokenizer); None without a text modality
    autocast: object = nullcontext()


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise one process. -> Context (rank, world, device)."""
    if "RANK" not in os.environ:
        if args.gpu is None:
            return Context(0, 1, torch.device("cpu"))
        torch.cuda.set_device(args.gpu)  # so every allocation is this GPU's
        return Context(0, 1, torch.device(f"cuda:{args.gpu}"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(rank, world, torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))


def autocast_for(device, precision):
    """fp32: no autocast. bf16/fp16: torch.autocast on the run's device type (fp16 also needs the grad
    scaler train() makes). The CPU tests run bf16 through this same context."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def progress(iterable, ctx, desc):
    """A progress bar on rank 0 only (TQDM_DISABLE=1 silences it: `disable` is left to tqdm there)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **({} if ctx.rank == 0 else {"disable": True}))


def all_sum(t, ctx):
    """Sum a tensor over the DDP processes (in place); the identity for one process."""
    if ctx.world > 1:
        dist.all_reduce(t)
    return t


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def seed_step(seed, rank, step):
    """Step `step` of process `rank` draws its LoRA dropout masks from its own stream: independent across
    processes, and the same after a resume (no RNG state has to survive a crash)."""
    torch.manual_seed(data.stream_seed(seed, "lora_dropout", rank, step))


def threads_for(args):
    """The toy encoders' matrices are tiny: a second thread only spin-waits (on a busy 2-core machine two
    threads ran the default several times slower than one). Real encoders keep torch's default."""
    return 1 if args.data in data.SYNTHETIC else None


def info_of(args):
    return data.dataset_info(args.data, args.data_root)


def encoder_paths(args, info):
    """{modality: folder} of the pretrained encoders under --weights (weights/download.py's folders, or the
    toy encoders' for the synthetic default)."""
    folders = TOY_FOLDERS if args.data in data.SYNTHETIC else ENCODER_FOLDERS
    return {m: Path(args.weights) / folders[m] for m in info.modalities}


@contextmanager
def as_user_errors():
    """data.py's FileNotFoundError and ValueError while a run is set up are about the files given (a missing
    split file, a malformed row, a class without a folder): the user's to fix, so reported as a UserError."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err


def check_inputs(args):
    """The data root and the pretrained weights, checked together so one start reports every fix. A resumed
    or evaluated run looks where its config says they were: if they moved, the fix is to say where they are."""
    saved = args.resume or args.eval_only is not None
    problems = []
    if args.data not in data.SYNTHETIC and not Path(args.data_root).is_dir():
        problems.append(f"no dataset at --data-root {args.data_root}: " + (
            "the run's data was there; if it moved, pass --data-root NEWDIR" if saved else
            f"expected {data.EXPECTED_LAYOUT[args.data]} (README.md, 'Datasets', says where to get it)"))
    info = data.dataset_info(args.data) if problems else info_of(args)
    missing = {m: p / "model.safetensors" for m, p in encoder_paths(args, info).items()
               if not (p / "model.safetensors").is_file()}
    if missing:
        fetch = "python weights/make_toy.py" if args.data in data.SYNTHETIC else \
            f"python weights/download.py --dest {args.weights}"
        folders = ", ".join(sorted({p.parent.relative_to(args.weights).as_posix() + "/" for p in missing.values()}))
        problems.append(f"no pretrained {' and '.join(missing)} encoder: {', '.join(map(str, missing.values()))} "
                        + (f"missing; the run's encoders were there: if they moved, pass --weights NEWDIR, the "
                           f"folder that now holds {folders}" if saved else f"missing; get it with `{fetch}`"))
    if problems:
        raise UserError("cannot start:\n  - " + "\n  - ".join(problems))


def check_missing_settings(args, given):
    """The missing-modality flags together, before training (the test setting used to fail after it): a rate
    needs a type, a type needs a rate, and each type is one of the dataset's modalities or 'both'. A test flag
    left out takes the training one (--help). A type without a rate in a saved run (older versions took it)
    is only refused when given now."""
    modalities = data.dataset_info(args.data).modalities
    types = f"{', '.join(modalities)} or 'both'"
    problems = [f"--{k.replace('_', '-')} {getattr(args, k)!r}: expected {types} ({args.data}'s modalities)"
                for k in ("train_missing_type", "test_missing_type")
                if getattr(args, k) is not None and getattr(args, k) not in (*modalities, "both")]
    test_rate = args.test_missing_rate if args.test_missing_rate is not None else args.train_missing_rate
    test_type = args.test_missing_type or args.train_missing_type
    if args.train_missing_rate and args.train_missing_type is None:
        problems.append(f"--train-missing-rate {args.train_missing_rate} needs --train-missing-type ({types})")
    if test_rate and test_type is None:
        problems.append(f"--test-missing-rate {test_rate} needs --test-missing-type ({types})")
    if "train_missing_type" in given and not args.train_missing_rate:
        problems.append(f"--train-missing-type {args.train_missing_type} without a --train-missing-rate: "
                        f"give the rate too (the paper's is 0.7), or leave the type out")
    if "test_missing_type" in given and not test_rate:
        problems.append(f"--test-missing-type {args.test_missing_type} without a --test-missing-rate: give the "
                        f"rate too (the paper's is 0.7), or leave the type out")
    if problems:
        raise UserError("; ".join(problems))


def encoder_config(modality, folder):
    """An encoder's config as encoders.load_pretrained will read it (its folder's config.json, or the class's
    defaults without one), without loading the weights."""
    config_file, config_class = Path(folder) / "config.json", ENCODER_CONFIGS[modality]
    return config_class.from_json(config_file) if config_file.is_file() else config_class()


def check_encoders_fit(paths, info, tokenizer):
    """The pretrained encoders ({modality: folder}) take what the dataset feeds them: the image side of
    image/video frames, and every token id the tokenizer gives (below the text encoder's vocabulary size).
    Read from their config.json, before anything is written: a misfit used to crash in the first step."""
    problems = []
    for m, folder in paths.items():
        config, config_file = encoder_config(m, folder), Path(folder) / "config.json"
        if m in ("image", "video") and config.image_size != info.image_size:
            problems.append(f"the {m} encoder at {folder} takes {config.image_size}x{config.image_size} images "
                            f"(image_size in {config_file}); {info.name} feeds it {info.image_size}x{info.image_size}")
        if m == "text":
            tokens = tokenizer.get_vocab_size()
            if tokens > config.vocab_size:
                problems.append(f"the text encoder at {folder} knows {config.vocab_size} tokens (vocab_size in "
                                f"{config_file}); {info.name}'s tokenizer gives {tokens}")
    if problems:
        toy = "" if info.name in data.SYNTHETIC else " (weights/make_toy.py's toy encoders fit only the synthetic data)"
        raise UserError("the encoders do not fit the data: " + "; ".join(problems) + ". Point --weights at the "
                        f"encoders made for {info.name}{toy}")


def check_same_encoders(trained, paths, ckpt):
    """A resumed run's encoders, maybe moved (--weights), are still those it was trained with: the configs
    u2a.U2A recorded in the checkpoint's config (`trained`, its "model" metadata)."""
    differ = [m for m, expected in trained.get("encoder_configs", {}).items()
              if asdict(encoder_config(m, paths[m])) != expected]
    if differ:
        raise UserError(f"{ckpt} was trained with other {' and '.join(differ)} encoders than those at "
                        f"{', '.join(str(paths[m]) for m in differ)} (their config.json differs); point --weights "
                        f"at the encoders the run was trained with")


def check_classes(info, trained, ckpt):
    if list(info.class_names) != list(trained["class_names"]):
        differ = [(i, a, b) for i, (a, b) in enumerate(zip(trained["class_names"], info.class_names)) if a != b]
        raise UserError(f"{ckpt} was trained on {len(trained['class_names'])} classes "
                        f"({', '.join(trained['class_names'][:5])}, ...) of its dataset; the data given has "
                        f"{len(info.class_names)} classes (first differences: {differ[:3]})")


def text_tokenizer(args, info):
    """The text encoder's own WordPiece tokenizer (its folder's vocab.txt: the toy's is data.synthetic_vocab())."""
    if "text" not in info.modalities:
        return None
    return encoders.load_tokenizer(encoder_paths(args, info)["text"], info.text_max_len)


def set_missing_tables(sets, args, info):
    """The train/val missing tables of the run's seed: each seed of a multi-seed run draws its own on the
    same data (set_present keeps what was read and redraws only what is missing)."""
    for split in ("train", "val"):
        if split in sets and args.train_missing_rate:
            sets[split].set_present(data.missing_table(len(sets[split]), args.train_missing_rate,
                                                       args.train_missing_type,
                                                       data.stream_seed(args.seed, f"missing/{split}"), info.modalities))
    return sets


def build_splits(args, info, splits=("train", "val", "test")):
    """Every split, built and checked before the first step: a broken test split is found now, not after
    hours of training. The data itself (synthetic samples, the validation carve) is the same for every run
    seed (make_dataset's own data seed); the train/val missing tables are drawn from the run's seed
    (section 4.4.1), as is everything else random about training."""
    sets = {}
    for split in splits:
        ds = data.make_dataset(args.data, args.data_root, split, train=split == "train", limit=args.limit,
                               on_error=args.on_error)
        if len(ds) == 0:
            raise UserError(f"{args.data}/{split} has no samples (data root {args.data_root}, --limit "
                            f"{args.limit}); expected {data.EXPECTED_LAYOUT.get(args.data, 'generated data')}")
        sets[split] = ds
    return set_missing_tables(sets, args, info)


def model_config(args, info, method):
    paths = encoder_paths(args, info)
    return U2AConfig(encoders={m: str(paths[m]) for m in info.modalities}, class_names=list(info.class_names),
                     multilabel=info.multilabel, method=method, rank=args.rank, alpha=args.alpha,
                     lora_dropout=args.lora_dropout, lam=args.lam, mt_init=args.mt_init,
                     align_stop_grad=args.align_stop_grad)


def make_optimizer(model, args):
    """AdamW (Table 5) over trainable parameters only. Our choices where the paper is silent: decay on
    matrices (LoRA factors, head weight), none on vectors (biases, and the CLS/MT tokens, which also learn at
    --token-lr-scale times the learning rate), as nanoGPT does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_token = lambda n: n.endswith((".cls", ".mt"))
    groups = [{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": args.weight_decay, "lr_scale": 1.0},
              {"params": [p for n, p in named if p.dim() < 2 and not is_token(n)], "weight_decay": 0.0,
               "lr_scale": 1.0},
              {"params": [p for n, p in named if is_token(n)], "weight_decay": 0.0, "lr_scale": args.token_lr_scale}]
    return torch.optim.AdamW(groups, lr=args.lr, eps=ADAMW_EPS)


class EpochSampler(torch.utils.data.Sampler):
    """Epoch e visits a permutation drawn from (seed, e), cut into n // B global batches of B samples (the
    n % B left over wait for another epoch, a different few each time). Process r of w (shard (r, w)) takes
    every w-th sample of each global batch, so every process has the same n // B steps of B / w samples and
    w processes see exactly the batches of one. `skip` batches are left out at the start: a resumed run
    continues mid-epoch without reading what it already saw."""

    def __init__(self, n, batch_size, seed, epoch, shard=(0, 1), skip=0):
        (rank, world), steps = shard, n // batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(data.stream_seed(seed, "sampler", epoch)))
        self.indices = order[:steps * batch_size].view(steps, batch_size)[skip:, rank::world].flatten().tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# -----------------------------------------------------------------------------
# Evaluation: a split is encoded once and every scenario scored from the stored tokens (u2a.py, "Scoring
# the paper's scenarios"). Under DDP each process encodes every world-th sample and the tokens are gathered:
# no process idles at a barrier through a long validation (NCCL's watchdog).

@torch.no_grad()
def encode_split(model, dataset, args, ctx, desc):
    """-> dict of CPU tensors, in sample order: cls/mt per modality (n, D), labels, present, index, and
    "unreadable" (an int): the files that failed to decode in on_error="skip" mode. Samples left with no
    modality are absent (their index is not in "index")."""
    model.eval()
    shard = list(range(ctx.rank, len(dataset), ctx.world))
    loader = data.make_loader(dataset, max(1, args.batch_size // ctx.world) * 4, False, ctx.tokenizer,
                              args.workers, data.stream_seed(args.seed, "eval_loader"), sampler=shard)
    parts = {"labels": [], "present": [], "index": [], "unreadable": []}
    for batch in progress(loader, ctx, desc):
        parts["unreadable"].append(batch["unreadable"].reshape(1))
        if len(batch["index"]) == 0:  # every sample of the batch was skipped
            continue
        batch = to_device(batch, ctx.device)
        with ctx.autocast:
            cls, mt = model.encode(batch)
        for m in model.modalities:
            parts.setdefault(f"cls.{m}", []).append(cls[m].float().cpu())
            parts.setdefault(f"mt.{m}", []).append(mt[m].float().cpu())
        parts["labels"].append(batch["label"].cpu())
        parts["present"].append(batch["present"].cpu())
        parts["index"].append(batch["index"].cpu())
    if ctx.world > 1:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, parts)
        parts = {k: [t for p in gathered for t in p.get(k, [])] for k in parts}
    unreadable = int(sum(t.sum() for t in parts.pop("unreadable")))
    if not parts["index"]:  # skip mode, and not one sample of the split could be read
        return None
    feats = {k: torch.cat(v) for k, v in parts.items()}
    order = feats["index"].argsort()
    return {**{k: v[order] for k, v in feats.items()}, "unreadable": unreadable}


def validate(model, val_set, args, ctx):
    """The validation headline metric with the validation set's own missing table; -inf when no validation
    sample could be read (skip mode)."""
    feats = encode_split(model, val_set, args, ctx, "val")
    if feats is None:
        return -math.inf
    logits = u2a.scenario_logits(model, feats, feats["present"])
    return u2a.scores(logits, feats["labels"], ctx.info.multilabel)[u2a.headline(ctx.info.multilabel)]


def evaluate_test(model, test_set, args, ctx, out, ckpt, train_seconds=0.0):
    """Test-set evaluation of a trained model over every scenario of the paper; rank 0 writes metrics.json."""
    feats = encode_split(model, test_set, args, ctx, "test")
    if feats is None:
        raise UserError(f"test: not one of the {len(test_set)} samples could be read (--on-error skip)")
    if ctx.rank > 0:
        return None
    unreadable, skipped, info = feats.pop("unreadable"), len(test_set) - len(feats["index"]), ctx.info
    if unreadable or skipped:
        print(f"test: {unreadable} unreadable files skipped (--on-error skip): {skipped} of {len(test_set)} "
              f"samples had no modality left and are not scored; the others are scored without the file")
    placeholders = None
    if model.method.stand_in == "placeholder":  # the paper's placeholders (zeros / ""), through the encoders
        placeholders = u2a.placeholder_tokens(model, ctx.tokenizer)
    test_rate = args.test_missing_rate if args.test_missing_rate is not None else args.train_missing_rate
    test_type = args.test_missing_type or args.train_missing_type
    seed = data.stream_seed(args.seed, "missing/test")
    scenarios = data.eval_scenarios(info, test_rate, test_type, seed=seed)
    results, analysis = u2a.evaluate_scenarios(model, feats, scenarios, placeholders, len(test_set), seed)
    (out / "missing_test").mkdir(parents=True, exist_ok=True)
    for sc in scenarios:
        data.save_missing_table(out / "missing_test" / f"{slug(sc.name)}.json", sc.table(len(test_set), seed),
                                scenario=sc.name, seed=seed)
    metrics = {"method": model.config.method, "data": info.name, "checkpoint": str(ckpt),
               "train_seconds": round(train_seconds, 1), "class_names": info.class_names,
               "test_samples": len(test_set), "test_skipped": skipped, "test_unreadable": unreadable,
               "scenarios": results, **analysis}
    write_json(out / "metrics.json", metrics)
    if len(feats["labels"]) * model.head.in_features <= 50_000_000:  # tokens for the notebooks' plots
        save_file({k: v.contiguous() for k, v in feats.items()}, str(out / "test_tokens.safetensors"))
    return metrics


def print_tables(results, info, args, title):
    """The paper's tables: Table 4 (a whole modality missing), Table 3/6 (missing ratios), Figure 2. Each
    result says which groups it belongs to and the share of each modality present (u2a.evaluate_scenarios)."""
    key, (m1, m2) = u2a.headline(info.multilabel), info.modalities
    label = "F1-macro / F1-micro" if info.multilabel else "accuracy (%)"
    fmt = (lambda r: f"{r['f1_macro']:6.2f} / {r['f1_micro']:6.2f}") if info.multilabel else \
        (lambda r: f"{r['accuracy']:6.2f}")
    print(f"\n== {title}: {info.name}, {label} ==")
    by_group = lambda g: [(name, r) for name, r in results.items() if g in r["groups"]]
    print("Table 4 (trained on complete data, one modality missing at test)")
    print(f"  {'available':<16}{'missing':<12}{label}")
    for _, r in by_group("complete") + by_group("table4"):
        avail = [m for m in (m1, m2) if r["shares"][m] > 0]
        print(f"  {' + '.join(avail):<16}{', '.join(m for m in (m1, m2) if m not in avail) or '-':<12}{fmt(r)}")
    train_setting = "complete" if not args.train_missing_rate else \
        f"{args.train_missing_type} missing {100 * args.train_missing_rate:g}%"
    print(f"Tables 3 and 6 (training: {train_setting}; test:)")
    for name, r in by_group("table3") + [x for x in by_group("table6") if "table3" not in x[1]["groups"]]:
        print(f"  {name:<28}{fmt(r)}")
    sweep = sorted((r for _, r in by_group("figure2")), key=lambda r: r["shares"][m2])
    print(f"Figure 2 ({m1} 100% + {m2} x%):  " + "  ".join(f"{r['shares'][m2]:g}%:{r[key]:.1f}" for r in sweep))


def lesson_table(summary, shares, info):
    """The lesson in one table: each method's mean test score (summarize) with both modalities, then with each
    one alone (shares: {scenario: % of each modality present}), and for a synthetic design the best any model
    can reach (data.bayes_ceiling, exact from its joint table)."""
    m1, m2 = info.modalities
    columns = {f"{m1} + {m2}": {m1: 100, m2: 100}, f"{m1} only": {m1: 100, m2: 0}, f"{m2} only": {m1: 0, m2: 100}}
    scenario = {column: next(name for name, s in shares.items() if s == want) for column, want in columns.items()}
    lines = [f"{'':22}" + "".join(f"{c:>16}" for c in columns)]
    for method, results in summary.items():  # in u2a.METHODS' order: naive first, u2a last
        lines.append(f"{method:22}" + "".join(f"{results[scenario[c]]['mean']:>16.1f}" for c in columns))
    if info.name in data.SYNTHETIC:
        ceiling = data.bayes_ceiling(info.name)
        lines.append(f"{'Bayes ceiling':22}" + "".join(f"{ceiling[k]:>16.1f}" for k in ("both", m1, m2)))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The summary: each method's test score in every scenario over the seeds (mean, sample SD, n), beside the
# paper's U2A number where the paper reports one for that dataset, training setting and test scenario.

# The paper's U2A results in its headline metric (% accuracy; MM-IMDb: F1-macro): (dataset, % of (m1, m2)
# present in training, the same at test) -> (value, the paper's SD over its 3 seeds or None, table). The
# modalities in data.py's order: (image, text), (audio, video). Tables 3 and 6 train and test at eta = 70%
# (image/text 30/100, 65/65, 100/30); Table 3's numbers are Table 6's diagonal and carry its number.
BOTH = (100, 100)
PAPER_U2A = {
    # Table 1 (MM-IMDb's F1-micro: 69.23) and Table 2: both modalities in training and test
    ("food101", BOTH, BOTH): (94.47, None, 1), ("mmimdb", BOTH, BOTH): (63.58, None, 1),
    ("ks", BOTH, BOTH): (91.21, None, 2), ("ave", BOTH, BOTH): (96.77, None, 2),
    ("cremad", BOTH, BOTH): (88.84, None, 2),
    # Table 4: trained on complete data, one modality entirely missing at test
    ("food101", BOTH, (100, 0)): (75.66, None, 4), ("food101", BOTH, (0, 100)): (80.66, None, 4),
    ("cremad", BOTH, (100, 0)): (67.20, None, 4), ("cremad", BOTH, (0, 100)): (76.21, None, 4),
    ("ks", BOTH, (100, 0)): (68.27, None, 4), ("ks", BOTH, (0, 100)): (85.77, None, 4),
    # Tables 3 and 6: MM-IMDb, training image 30% / 65% / 100%, test each of the three
    ("mmimdb", (30, 100), (30, 100)): (60.21, 0.40, 3), ("mmimdb", (30, 100), (65, 65)): (50.05, 0.53, 6),
    ("mmimdb", (30, 100), (100, 30)): (36.10, 0.19, 6), ("mmimdb", (65, 65), (30, 100)): (57.45, 0.21, 6),
    ("mmimdb", (65, 65), (65, 65)): (54.04, 0.23, 3), ("mmimdb", (65, 65), (100, 30)): (50.05, 0.29, 6),
    ("mmimdb", (100, 30), (30, 100)): (44.72, 0.46, 6), ("mmimdb", (100, 30), (65, 65)): (49.26, 0.42, 6),
    ("mmimdb", (100, 30), (100, 30)): (52.61, 0.12, 3),
    # Tables 3 and 6: UPMC Food-101, the same grid
    ("food101", (30, 100), (30, 100)): (87.48, 0.13, 3), ("food101", (30, 100), (65, 65)): (77.52, 0.29, 6),
    ("food101", (30, 100), (100, 30)): (67.60, 0.26, 6), ("food101", (65, 65), (30, 100)): (87.36, 0.20, 6),
    ("food101", (65, 65), (65, 65)): (82.83, 0.25, 3), ("food101", (65, 65), (100, 30)): (78.40, 0.09, 6),
    ("food101", (100, 30), (30, 100)): (85.34, 0.15, 6), ("food101", (100, 30), (65, 65)): (82.78, 0.22, 6),
    ("food101", (100, 30), (100, 30)): (80.37, 0.18, 3),
}
PAPER_SAMPLES = {"food101": "67,988 / - / 22,716", "mmimdb": "15,552 / 2,608 / 7,799", "cremad": "6,698 / - / 744",
                 "ks": "14,739 / - / 2,594", "ave": "3,339 / 402 / 402"}  # train / val / test (supplement, sec. 1)
TABLE5_KEYS = ("lr", "epochs", "batch_size", "warmup_epochs", "weight_decay", "rank", "alpha", "lora_dropout", "lam")


def paper_result(info, args, test_shares):
    """(value, SD, table) of the paper's U2A in this run's training setting and a test scenario, or None."""
    trained = data.present_shares(info.modalities, args.train_missing_rate or 0.0, args.train_missing_type)
    as_pair = lambda shares: tuple(shares[m] for m in info.modalities)
    return PAPER_U2A.get((info.name, as_pair(trained), as_pair(test_shares)))


def summarize(runs, info, args):
    """{method: {scenario: {"mean", "sd", "n", "paper"}}} of the headline metric over the runs' seeds (runs:
    {(seed, method): metrics}). sd is the sample SD (n - 1) and None for one run: one run measures no spread."""
    key, summary = u2a.headline(info.multilabel), {}
    for method in [m for m in u2a.METHODS if any(m == method for _, method in runs)]:
        per_seed = [metrics["scenarios"] for (_, m), metrics in runs.items() if m == method]
        summary[method] = {}
        for name, result in per_seed[0].items():
            values = [scenarios[name][key] for scenarios in per_seed if name in scenarios]
            paper = paper_result(info, args, result["shares"])
            summary[method][name] = {"mean": statistics.mean(values),
                                     "sd": statistics.stdev(values) if len(values) > 1 else None,
                                     "n": len(values), "paper": paper and paper[0]}
    return summary


def setting_notes(info, args, counts):
    """What a reader must know before comparing a row with the paper (counts: {split: samples we loaded})."""
    if info.name in data.SYNTHETIC:
        return ["synthetic data and toy encoders: a demonstration of the paper's lesson, not one of its experiments "
                "(no paper number applies); the Bayes ceiling is the best any model can reach on this design "
                "(data.bayes_ceiling)"]
    notes = ["the paper column is the paper's U2A, to compare with the u2a column (the other methods are this "
             "code's ablations); the paper gives Tables 3 and 6 as mean ± SD of 3 seeds, Tables 1, 2 and 4 as single "
             "numbers, and does not say how its model was picked; ours is the best validation epoch, never test"]
    if info.multilabel:
        notes.append("the headline is F1-macro, as Tables 3 and 6; metrics.json also has F1-micro (Table 1: 69.23)")
    if not info.has_val:
        notes.append(f"validation is a fixed, seeded {data.VAL_SHARE:.0%} carved from train (the paper names no "
                     f"validation split for {info.name}): the model trains on {100 - 100 * data.VAL_SHARE:.0f}% of "
                     f"the paper's training set")
    loaded = " / ".join(f"{counts[s]:,}" if s in counts else "?" for s in ("train", "val", "test"))
    notes.append(f"samples loaded (train / val / test): {loaded}; the paper's: {PAPER_SAMPLES[info.name]}"
                 + (f" (--limit {args.limit})" if args.limit else ""))
    table5, _, _ = defaults(info.name)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (paper: {table5[k]})" for k in TABLE5_KEYS
               if getattr(args, k) != table5[k]]
    if changed:
        notes.append("settings other than the paper's Table 5: " + ", ".join(changed))
    return notes


def summary_markdown(summary, shares, info, args, seeds, counts):
    """summary.md: one row per test scenario (shares: {name: % of each modality present}), each method's
    mean ± SD (n) beside the paper's U2A number (and, for a synthetic design, the Bayes ceiling), then where
    this setting differs from the paper's."""
    m1, m2 = info.modalities
    ceiling = data.bayes_ceiling(info.name) if info.name in data.SYNTHETIC else None
    cell = lambda s: f"{s['mean']:.2f} ± {s['sd']:.2f} (n={s['n']})" if s["sd"] is not None else f"{s['mean']:.2f} (n=1)"
    trained = data.present_shares(info.modalities, args.train_missing_rate or 0.0, args.train_missing_type)
    lines = [f"# {info.name}: test {u2a.headline(info.multilabel)} (%), mean ± sample SD (n) over seeds "
             f"{' '.join(map(str, seeds))}", "",
             "Trained on " + " + ".join(f"{m} {share:g}%" for m, share in trained.items()) + "; each row a test "
             "scenario (the % of test samples that have each modality).", "",
             "| test scenario | " + " | ".join(summary) + " | paper: U2A |" + (" Bayes ceiling |" if ceiling else ""),
             "| --- |" + " ---: |" * (len(summary) + 1 + bool(ceiling))]
    for name, share in shares.items():
        paper = paper_result(info, args, share)
        row = [name] + [cell(summary[m][name]) if name in summary[m] else "-" for m in summary]
        row.append("-" if paper is None else
                   f"{paper[0]:.2f}" + (f" ± {paper[1]:.2f}" if paper[1] else "") + f" (Table {paper[2]})")
        if ceiling:  # the scenario's samples are complete, m1 only or m2 only in its shares' proportions
            s1, s2 = share[m1] / 100, share[m2] / 100
            row.append(f"{(s1 + s2 - 1) * ceiling['both'] + (1 - s2) * ceiling[m1] + (1 - s1) * ceiling[m2]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    notes = setting_notes(info, args, counts)
    return "\n".join(lines + ["", "Where this setting differs from the paper's:"] + [f"- {n}" for n in notes]) + "\n"


def report(runs, info, args, folder, counts):
    """The summary over seeds ({(seed, method): metrics}), printed and written as summary.json and summary.md."""
    summary = summarize(runs, info, args)
    shares = {name: r["shares"] for metrics in runs.values() for name, r in metrics["scenarios"].items()}
    text = summary_markdown(summary, shares, info, args, sorted({seed for seed, _ in runs}), counts)
    print(lesson_table(summary, shares, info))
    print("\n" + text + f"(written to {folder / 'summary.json'} and {folder / 'summary.md'})")
    write_json(folder / "summary.json", summary)
    (folder / "summary.md").write_text(text)


def by_layout(runs):
    """{method: metrics} for one seed, {seed: {method: metrics}} for several: the run folder's shape."""
    if len({seed for seed, _ in runs}) <= 1:
        return {method: metrics for (_, method), metrics in runs.items()}
    nested = {}
    for (seed, method), metrics in runs.items():
        nested.setdefault(seed, {})[method] = metrics
    return nested


# -----------------------------------------------------------------------------
# One training step (eq. 7). Both means of the loss divide by counts over every process: DDP averages the
# processes' gradients, so each process's loss is scaled by the world size to make the result one process's.

@dataclass
class Learner:
    """One method's model and what trains it: checkpoints save `model`, the steps run `wrapped` (the same
    module under torch.compile and DDP)."""
    model: u2a.U2A
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def train_step(learner, batch, lr, ctx, may_be_empty=False):
    """One optimizer step on the global batch. may_be_empty: in skip mode every sample of a step can be
    unreadable; such a step is left out on every process (AdamW would still decay and move the weights)."""
    for group in learner.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    present, config = batch["present"], learner.model.config
    counts = all_sum(torch.stack([present.new_tensor(len(present), dtype=torch.float),
                                  present.all(1).sum().float()]), ctx)      # (2,) samples, complete samples
    if may_be_empty and counts[0].item() == 0:
        return torch.zeros(3, device=present.device)
    with ctx.autocast:
        out = learner.wrapped(batch)
    loss, task, align = u2a_loss(out, batch["label"], config.multilabel, config.align_weight, counts[0], counts[1],
                                 config.align_stop_grad)
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss * ctx.world).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    return torch.stack([loss.detach(), task.detach(), align.detach()])  # (3,), on the device: no sync


# -----------------------------------------------------------------------------
# One run: set-up, the loop, the end of each epoch (validation, checkpoints), then test

def train(args, method, out, sets, ctx):
    """Train one method on seed args.seed, keep the checkpoint of the best validation score (model selection
    on validation, never on test), then evaluate it on test. Continues from last.safetensors on --resume."""
    info, last = ctx.info, out / "last.safetensors"
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            data.save_missing_table(out / f"missing_{split}.json", sets[split].present, rate=args.train_missing_rate,
                                    type=args.train_missing_type, seed=data.stream_seed(args.seed, f"missing/{split}"))
    torch.manual_seed(data.stream_seed(args.seed, "init"))  # the same initialisation on every process
    model = u2a.U2A(model_config(args, info, method)).to(ctx.device)
    optimizer = make_optimizer(model, args)
    if ctx.rank == 0:
        print(f"{method}: {model.parameter_table()}")
    step, best, best_step = 0, -math.inf, -1
    if args.resume and last.is_file():
        meta = load_resumable(last, model, optimizer)
        step, best, best_step = meta["step"], meta["best"], meta["best_step"]
        if ctx.rank == 0:
            print(f"resumed {last} at step {step}")
    wrapped = torch.compile(model) if args.compile else model
    if ctx.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)  # a dropped or absent modality leaves its branch without gradients
    learner = Learner(model, wrapped, optimizer, torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16"))
    checkpoint_meta = lambda: {"step": step, "best": best, "best_step": best_step, "data": args.data,
                               "config": vars_json(args)}
    complete = bool(sets["train"].present.all())  # section 3: dropout on a complete training set only
    use_dropout = model.method.dropout and (args.modality_dropout == "on" or complete)
    steps_per_epoch = len(sets["train"]) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, steps_per_epoch * args.warmup_epochs
    nonfinite = torch.zeros((), device=ctx.device)  # non-finite losses since the last check, counted on the device
    faults = torch.zeros(2, dtype=torch.long)       # skip mode, this process: samples skipped, files unreadable
    seen, loss, t0 = 0, math.nan, time.time()
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        model.train()
        sets["train"].set_epoch(epoch, args.seed)  # frames and crops of each sample: stream_seed(seed, "sample", epoch, i)
        sampler = EpochSampler(len(sets["train"]), args.batch_size, args.seed, epoch, (ctx.rank, ctx.world), skip)
        loader = data.make_loader(sets["train"], args.batch_size // ctx.world, False, ctx.tokenizer, args.workers,
                                  data.stream_seed(args.seed, "loader", epoch), sampler=sampler)
        bar = progress(loader, ctx, f"{method} epoch {epoch + 1}/{args.epochs}")
        for batch in bar:
            faults += torch.stack([batch["skipped"], batch["unreadable"]])
            batch = to_device(batch, ctx.device)
            if use_dropout:  # section 3, drawn from the step (the same on every process); a dropped input holds
                # the placeholder, as a missing one does (what the placeholder methods encode)
                g = torch.Generator().manual_seed(data.stream_seed(args.seed, "modality_dropout", step))
                batch = data.drop_modalities(batch, modality_dropout(batch["present"], g), info, ctx.tokenizer)
            seed_step(args.seed, ctx.rank, step)
            lr = args.lr * lr_factor(step, total, warmup)
            losses = train_step(learner, batch, lr, ctx, may_be_empty=args.on_error == "skip")
            nonfinite += ~torch.isfinite(losses).all()
            step, seen = step + 1, seen + len(batch["label"]) * ctx.world
            if step % LOG_EVERY == 0 or step % steps_per_epoch == 0:  # the only place the loop waits for the GPU
                if all_sum(nonfinite.clone(), ctx).item() > 0:  # stop before a NaN checkpoint is written
                    raise NonFiniteLoss(f"the loss became NaN or infinite by step {step}; stopped before writing "
                                        f"a checkpoint (the last good one, if any: {last}). Check the inputs (a "
                                        f"file with NaN/Inf values) or lower --lr")
                loss, task, align = all_sum(losses, ctx).tolist()  # each process holds its share of eq. 7
                if ctx.rank == 0:
                    sps = round(seen / (time.time() - t0), 1)
                    append_log(out / "log.jsonl", {"step": step, "epoch": epoch, "loss": loss, "task": task,
                                                   "align": align, "lr": lr, "samples_per_s": sps})
                    bar.set_postfix(loss=f"{loss:.3f}", align=f"{align:.3f}", lr=f"{lr:.1e}", sps=f"{sps:.0f}")
            if args.save_every and step % args.save_every == 0 and ctx.rank == 0:
                save_resumable(last, model, optimizer, checkpoint_meta())
        # the epoch's end: validation, best.safetensors when it improved, last.safetensors always
        score = validate(model, sets["val"], args, ctx)
        skipped, unreadable = all_sum(faults.to(ctx.device), ctx).tolist()
        if ctx.rank == 0:
            if score > best or best_step < 0:
                best, best_step = score, step
                u2a.save_checkpoint(out / "best.safetensors", model, meta=checkpoint_meta())
            save_resumable(last, model, optimizer, checkpoint_meta())
            append_log(out / "log.jsonl", {"step": step, "epoch": epoch, "val": score})
            print(f"{method} epoch {epoch + 1}/{args.epochs}: val {u2a.headline(info.multilabel)} {score:.2f} "
                  f"(best {best:.2f}), loss {loss:.3f}"
                  + (f"; skipped so far: {unreadable} unreadable files, {skipped} samples with none left"
                     if unreadable else ""))
        if ctx.world > 1:
            dist.barrier()  # best.safetensors is written before any process reads it
    # the validation-selected model, with the encoders where they are now (a resumed run may have moved them)
    model = u2a.from_checkpoint(out / "best.safetensors", encoder_paths(args, info)).to(ctx.device)
    return evaluate_test(model, sets["test"], args, ctx, out, out / "best.safetensors", time.time() - t0)


# -----------------------------------------------------------------------------
# Command line. The options' defaults are defaults() and settings(): the parser keeps only what was given.

DEFAULTS_HELP = "\n".join(
    ["defaults per dataset (Table 5; toy: the synthetic data, offline):"]
    + [f"  {group:<12} lr {r['lr']:g}, epochs {r['epochs']}, batch {r['batch_size']}, warm-up epochs "
       f"{r.get('warmup_epochs', PAPER['warmup_epochs'])}, lambda {r.get('lam', PAPER['lam'])}, methods "
       f"{' '.join(r['method'])}; MT init {r['mt_init']}, alignment stop-gradient {r['align_stop_grad']}, "
       f"tokens at {r['token_lr_scale']:g}x lr" for group, r in {"image-text": IMAGE_TEXT, "audio-video": AUDIO_VIDEO, "toy": TOY}.items()]
    + [f"  all          AdamW (eps {ADAMW_EPS:g}, weight decay {PAPER['weight_decay']}), warm-up at "
       f"{WARMUP_FACTOR}x lr, then polynomial decay (power {POWER}); LoRA rank "
       f"{PAPER['rank']}, alpha {PAPER['alpha']:g}, dropout {PAPER['lora_dropout']}; lambda {PAPER['lam']}"])


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=DEFAULTS_HELP, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help=f"one of {', '.join(data.DATASETS)} (default: {DEFAULT_DATA})")
    a("--data-root", help="dataset folder (default: data/<name>/)")
    a("--weights", type=Path, help=f"folder of pretrained checkpoints (default: {WEIGHTS_DIR})")
    a("--out", type=Path, help="run folder (default: runs/<data>-<time>/)")
    a("--gpu", type=int, help="CUDA device index (one process); without it the run uses the CPU")
    a("--precision", choices=("bf16", "fp16", "fp32"),
      help="autocast precision (default: bf16 on GPUs that support it natively, else fp32)")
    a("--epochs", type=int, help="(default: per dataset, below)")
    a("--batch-size", type=int, help="global batch, split across DDP processes (default: per dataset)")
    a("--lr", type=float, help="(default: per dataset)")
    a("--warmup-epochs", type=int, help="(default: per dataset)")
    a("--weight-decay", type=float, help=f"(default: {PAPER['weight_decay']})")
    a("--rank", type=int, help=f"LoRA rank (default: {PAPER['rank']})")
    a("--alpha", type=float, help=f"LoRA alpha (default: {PAPER['alpha']:g})")
    a("--lora-dropout", type=float, help=f"(default: {PAPER['lora_dropout']})")
    a("--lam", type=float, help=f"lambda of eq. 7 (default: {PAPER['lam']})")
    a("--seed", type=int, nargs="+", dest="seeds", metavar="SEED",
      help="one or more run seeds; every (seed, method) pair trains in its own folder, and summary.json gives "
           "the mean and SD over the seeds (default: 0)")
    a("--train-missing-rate", type=float, help="eta for the training set, e.g. 0.7 (default: 0)")
    a("--train-missing-type", help="which modality is missing in training: m1, m2 name or 'both'")
    a("--test-missing-rate", type=float, help="extra test setting (default: the training one)")
    a("--test-missing-type")
    a("--modality-dropout", choices=("auto", "on", "off"),
      help="auto (default): a method with dropout drops on a complete training set (section 3); on: also on "
           "an incomplete one; off: refused for such a method (naive is the method without)")
    a("--method", nargs="+", choices=list(u2a.METHODS), metavar="METHOD",
      help="one or more of " + ", ".join(f"{name} ({m.stand_in}, dropout {'on' if m.dropout else 'off'}, "
                                          f"{'lambda' if m.align else 'lambda 0'})" for name, m in u2a.METHODS.items())
           + " (default: per dataset, below)")
    a("--mt-init", choices=("cls", "random"), help="how each MT starts (default: per dataset)")
    a("--align-stop-grad", action=argparse.BooleanOptionalAction,
      help="eq. 6's CLS targets as constants (default: per dataset)")
    a("--token-lr-scale", type=float, help="the CLS/MT tokens' learning rate over --lr (default: per dataset)")
    a("--limit", type=int, help="use the first N samples of each split")
    a("--eval-only", type=Path, metavar="RUN", help="evaluate a checkpoint or run folder, no training")
    a("--resume", action="store_true", help="continue the run in --out as it was configured")
    a("--save-every", type=int, help="also checkpoint every N steps (default: 0, each epoch)")
    a("--workers", type=int, help="DataLoader processes (default: 0 for the toy data, else up to 4)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--on-error", choices=("raise", "skip"), help="unreadable files: stop (default) or skip and count them")
    return p


# What each numeric option must be. NaN fails every comparison, so `--lr nan` is refused with the rest.
RANGES = {
    **{k: (lambda v: v >= 1, "at least 1") for k in ("epochs", "batch_size", "limit", "rank")},
    **{k: (lambda v: v >= 0, "0 or more") for k in ("warmup_epochs", "save_every", "workers", "gpu")},
    "lr": (lambda v: 0 < v < math.inf, "a finite number above 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
    "alpha": (lambda v: 0 < v < math.inf, "a finite number above 0 (alpha 0 switches LoRA off)"),
    "lam": (lambda v: 0 <= v < math.inf, "a finite number, 0 or more (a negative lambda pushes each mask token "
                                         "away from the class token it stands in for)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train_missing_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "test_missing_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def check_args(p, given):
    """Argument errors, before anything is read or written."""
    out, eval_only, gpu = given.get("out"), given.get("eval_only"), given.get("gpu")
    if "data" in given and given["data"] not in data.DATASETS:
        p.error(f"unknown dataset {given['data']!r}: expected one of {', '.join(data.DATASETS)}")
    for key, (ok, expected) in RANGES.items():
        if key in given and not ok(given[key]):
            p.error(f"--{key.replace('_', '-')} must be {expected}, got {given[key]}")
    if given.get("resume") and out is None:
        p.error("--resume needs --out: the run folder to continue")
    if out is not None and out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file: give a folder for the run")
    if out is not None and not given.get("resume") and eval_only is None and holds_run(out):
        p.error(f"--out {out} holds a run ({holds_run(out)}): `--resume --out {out}` continues it; "
                f"to start a new run, choose another --out")
    if given.get("resume") and eval_only:
        p.error("--resume and --eval-only exclude each other")
    if eval_only is not None and not eval_only.exists():
        p.error(f"--eval-only {eval_only}: no such checkpoint or run folder")
    if gpu is not None and "RANK" in os.environ:
        p.error("--gpu is for one process: under torchrun each process uses cuda:LOCAL_RANK (choose the "
                "GPUs with CUDA_VISIBLE_DEVICES)")
    if gpu is not None and not torch.cuda.is_available():
        p.error(f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__}); "
                f"drop --gpu to run on the CPU")


def check_method_flags(p, args, given):
    """A flag that contradicts every chosen method (u2a.METHODS says what each is) is refused by name."""
    methods = {name: u2a.METHODS[name] for name in args.method}
    if len(set(args.method)) != len(args.method):
        p.error(f"--method {' '.join(args.method)}: a method is named twice")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seed {' '.join(map(str, args.seeds))}: a seed is named twice")
    aligning = [name for name, m in methods.items() if m.align]
    if "lam" in given and not aligning:
        p.error(f"--lam {args.lam}: none of --method {' '.join(methods)} trains eq. 6 (lambda is theirs to be 0); "
                f"u2a is the method that aligns")
    if "lam" in given and args.lam == 0 and aligning:
        p.error(f"--lam 0 with --method {' '.join(aligning)}: u2a with lambda 0 is --method u2a-no-align")
    for key in ("mt_init", "align_stop_grad"):
        if key in given and all(m.stand_in == "placeholder" for m in methods.values()):
            p.error(f"--{key.replace('_', '-')}: none of --method {' '.join(methods)} has mask tokens")
    dropping = [name for name, m in methods.items() if m.dropout]
    if args.modality_dropout == "on" and len(dropping) < len(methods):
        p.error(f"--modality-dropout on: --method {' '.join(n for n in methods if n not in dropping)} trains on the "
                f"data as it is, without dropout; placeholder-dropout is the placeholder baseline with dropout")
    if args.modality_dropout == "off" and dropping:
        p.error(f"--modality-dropout off: --method {' '.join(dropping)} trains with modality dropout (section 3); "
                f"naive is the method without it")


def as_flag(key, value):
    """A setting as the user writes it: --seed 0 1 (the list args.seeds), --method u2a naive, --lr 0.001."""
    return f"--{'seed' if key == 'seeds' else key.replace('_', '-')} " + \
        (" ".join(map(str, value)) if isinstance(value, list) else str(value))


def absolute(places):
    """--data-root and --weights are kept absolute (in config.json too): a resumed or evaluated run finds them
    from any directory."""
    for key in ("data_root", "weights"):
        if places.get(key) is not None:
            places[key] = type(places[key])(Path(places[key]).resolve())


def saved_run(given):
    """--resume continues a run as it was configured: its config.json gives every setting of the run; a
    setting given now that contradicts it is an error."""
    saved_path = given["out"] / "config.json"
    if not saved_path.is_file():
        raise UserError(f"--resume: {given['out']} holds no run to resume (no {saved_path})")
    try:
        saved = json.loads(saved_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--resume: {saved_path} is not valid JSON ({err}); it holds the run's settings: restore "
                        f"it (train.py wrote it as indented JSON), or start a new run with another --out") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {saved_path} holds a JSON {type(saved).__name__}, not the run's settings "
                        f"(an object); restore it, or start a new run with another --out")
    if "seed" in saved and "seeds" not in saved:  # a folder of a version with one seed per command
        saved["seeds"] = [saved["seed"]]
    run, _, _ = defaults(saved.get("data", DEFAULT_DATA))
    clash = [k for k in run if k in given and str(given[k]) != str(saved.get(k))]
    if clash:
        raise UserError("--resume continues the run as it was configured; these settings differ from "
                        f"{saved_path}: " + ", ".join(f"{as_flag(k, given[k])} (run: "
                                                      f"{as_flag(k, saved.get(k))})" for k in clash))
    return saved


def parse_args(argv=None):
    """-> (args: every setting, given: {option: value} of those the user gave). A resumed run's settings come
    from its config.json; an evaluated checkpoint's from the checkpoint (evaluate_only)."""
    p = make_parser()
    given = vars(p.parse_args(argv))
    check_args(p, given)
    absolute(given)
    args = settings(given, saved_run(given) if given.get("resume") else None)
    if args.warmup_epochs and args.epochs <= args.warmup_epochs:
        p.error(f"--epochs {args.epochs} <= --warmup-epochs {args.warmup_epochs}: the whole run would train at "
                f"{WARMUP_FACTOR}x the learning rate; give more epochs or --warmup-epochs 0")
    check_method_flags(p, args, given)
    return args, given


# -----------------------------------------------------------------------------
# main: train every (seed, method) pair (or resume them, or evaluate checkpoints), then the summary

def eval_checkpoints(path):
    """--eval-only takes a checkpoint, or a run folder: its best.safetensors, or else every run's in its
    sub-folders (pair_folder's layout: <method>/, seed<k>/, seed<k>/<method>/)."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = checkpoints(path, "best.safetensors")
    if not found:
        raise UserError(f"--eval-only {path}: no best.safetensors in it, nor in its sub-folders (<method>/, "
                        f"seed<k>/, seed<k>/<method>/; methods: {', '.join(u2a.METHODS)})")
    return found[:1] if found[0].parent == path else found


def evaluated_settings(given, ckpt):
    """--eval-only: the run's settings and the model come from the checkpoint; the user may point at
    other data (--data-root) or another test setting, never change the model (--method picks checkpoints)."""
    with as_user_errors():  # not a checkpoint of this project
        _, meta = u2a.open_checkpoint(ckpt)
    saved, model_keys = meta["config"], {f.name for f in fields(U2AConfig)} - {"method"}
    clash = [k for k in given if k in model_keys and str(given[k]) != str(saved.get(k))]
    if clash:
        raise UserError(f"{ckpt} was trained with " + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}"
                                                                for k in clash)
                        + ": the model's settings come from the checkpoint; leave them out")
    evaluated = settings(given, saved)
    evaluated.out = given.get("out", ckpt.parent)
    return evaluated, meta


def evaluate_only(args, given, proc):
    """Every checkpoint of --eval-only (--method and --seed pick among them), each written where it lies or
    under --out in the same layout, then the summary over them."""
    root, runs, picked = Path(args.eval_only), {}, 0
    for ckpt in eval_checkpoints(root):
        ev, meta = evaluated_settings(given, ckpt)  # ev.seed: the checkpoint's own run seed
        if ("method" in given and meta["model"]["method"] not in args.method) or \
                ("seeds" in given and ev.seed not in args.seeds):
            continue
        picked += 1
        if "out" in given and root.is_dir():  # the evaluated folder's layout, under --out
            ev.out = args.out / ckpt.parent.relative_to(root)
        check_missing_settings(ev, given)
        with as_user_errors():
            check_inputs(ev)
            info = info_of(ev)
            check_classes(info, meta["model"], ckpt)
            tokenizer = text_tokenizer(ev, info)
            test_set = build_splits(ev, info, ("test",))["test"]
        paths = encoder_paths(ev, info) if "weights" in given else None
        check_encoders_fit(paths or meta["model"]["encoders"], info, tokenizer)
        ctx = replace(proc, info=info, tokenizer=tokenizer, autocast=autocast_for(proc.device, ev.precision))
        with as_user_errors():  # --weights holding other encoders than the model was trained on
            model = u2a.from_checkpoint(ckpt, paths).to(proc.device)
        metrics = evaluate_test(model, test_set, ev, ctx, ev.out, ckpt)
        if proc.rank == 0:
            print_tables(metrics["scenarios"], info, ev, f"{metrics['method']}, seed {ev.seed}, {ckpt}")
            runs[(ev.seed, metrics["method"])] = metrics
    if not picked:
        raise UserError(f"--eval-only {root}: none of its checkpoints ({', '.join(map(str, eval_checkpoints(root)))}) "
                        f"is of the --seed / --method given; leave them out to evaluate every one")
    if runs:
        folder = args.out if "out" in given else root if root.is_dir() else root.parent
        print(f"\n== Summary: {info.name}, test {u2a.headline(info.multilabel)} (%), evaluated {root} ==")
        report(runs, info, ev, folder, {"test": len(test_set)})
    return by_layout(runs)


def cut_log_at_checkpoint(folder):
    """A resumed run continues from its last.safetensors' step (from 0 without one): the log lines written
    after that checkpoint by the killed run are dropped, or the resumed run would log those steps twice.
    A line the kill cut short is dropped too. Rewritten whole (write_text): a second kill loses nothing."""
    log, last = folder / "log.jsonl", folder / "last.safetensors"
    if not log.is_file():
        return
    step = u2a.open_checkpoint(last)[1]["step"] if last.is_file() else 0
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, TypeError, KeyError):  # cut short: not one of the run's records
            continue
    write_text(log, "".join(kept))


def run_pairs(args, sets, ctx):
    """Every (seed, method) pair, one after the other, each with its own seed's missing tables and streams.
    With --resume a pair whose metrics.json exists is finished: read back, not trained again; an unfinished
    one continues from its last.safetensors. -> {(seed, method): metrics} (None on ranks other than 0)."""
    pairs = [(seed, method) for seed in args.seeds for method in args.method]
    runs = {}
    for i, (seed, method) in enumerate(pairs, 1):
        out = u2a.run_folder(args.out, seed, method, args.seeds, args.method)
        finished = args.resume and (out / "metrics.json").is_file()
        if ctx.rank == 0:
            print(f"\n== run {i} of {len(pairs)}: {method}, seed {seed}, in {out}"
                  + (": finished, read back ==" if finished else " =="))
        if finished:
            runs[(seed, method)] = json.loads((out / "metrics.json").read_text())
            continue
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        runs[(seed, method)] = train(run_args, method, out, set_missing_tables(sets, run_args, ctx.info), ctx)
        if ctx.rank == 0:
            print_tables(runs[(seed, method)]["scenarios"], ctx.info, run_args, f"{method}, seed {seed}")
    return runs


def train_and_report(args, proc):
    is_main = proc.rank == 0
    if args.batch_size % proc.world:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {proc.world} processes")
    with as_user_errors():
        check_inputs(args)
        info = info_of(args)
        sets = build_splits(args, info)
        tokenizer = text_tokenizer(args, info)
        for ckpt in checkpoints(args.out, "last.safetensors") if args.resume else []:  # the same data and encoders, maybe moved
            trained = u2a.open_checkpoint(ckpt)[1]["model"]
            check_classes(info, trained, ckpt)
            check_same_encoders(trained, encoder_paths(args, info), ckpt)
    if len(sets["train"]) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                        f"({len(sets['train'])} samples)")
    check_encoders_fit(encoder_paths(args, info), info, tokenizer)
    ctx = replace(proc, info=info, tokenizer=tokenizer, autocast=autocast_for(proc.device, args.precision))
    if args.out is None:  # one folder for the run, named on rank 0 and shared with the other processes
        name = [Path("runs") / f"{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if proc.world > 1:
            dist.broadcast_object_list(name, src=0)
        args.out = name[0]
    lock = None
    if is_main:  # only now, every check passed: a failed start leaves no empty run folder behind
        args.out.mkdir(parents=True, exist_ok=True)
        lock = lock_run_folder(args.out)
        if args.resume:
            for folder in u2a.run_folders(args.out):
                cut_log_at_checkpoint(folder)
        write_json(args.out / "config.json", vars_json(args))
        print(f"{args.data}: train {len(sets['train'])}, val {len(sets['val'])}, test {len(sets['test'])} "
              f"samples; {args.precision} on {proc.device}" + (f" x {proc.world} processes" if proc.world > 1 else ""))
        if args.data in data.SYNTHETIC:
            print("Offline default: synthetic image+text data and TOY encoders (tiny ViT/BERT pretrained on "
                  "synthetic shapes and words, weights/toy/). The paper's results need the real encoders "
                  "(python weights/download.py) and a real dataset: python train.py --data food101 --gpu 0")
    try:
        t0 = time.time()
        runs = run_pairs(args, sets, ctx)
        if is_main:
            print(f"\n== Summary: {args.data}, test {u2a.headline(info.multilabel)} (%), {time.time() - t0:.0f} s, "
                  f"run folder {args.out} ==")
            report(runs, info, args, args.out, {split: len(ds) for split, ds in sets.items()})
        return by_layout(runs)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def main(argv=None):
    """Train (or resume, or evaluate) as the command line says. A mistake in what the user gave raises
    UserError (the script prints it as one line and exits with 2); anything else is a bug."""
    args, given = parse_args(argv)
    absolute(vars(args))
    threads = torch.get_num_threads()
    if threads_for(args):
        torch.set_num_threads(threads_for(args))
    proc = setup_distributed(args)
    try:
        if args.eval_only:
            return evaluate_only(args, given, proc)
        check_missing_settings(args, given)
        return train_and_report(args, proc)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (UserError, data.UnreadableFile) as err:  # the user's to fix: one line, as argparse reports a bad
        # flag; bugs keep a traceback
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
