"""
Train and evaluate U2A (paper section 4) on one dataset, then report every missing-modality scenario of the
paper. Runs as a plain script, on one CPU, one GPU, or several through torchrun (DDP).

    python train.py                                  # offline default: 4 methods, toy encoders, 2-4 min on CPU
    python train.py --data food101 --gpu 0           # the paper's recipe (Table 5) on UPMC Food-101
    python train.py --data food101 --gpu 0 --seed 0 1 2 --method u2a naive   # 6 runs; summary.md: mean ± SD
    torchrun --nproc_per_node 2 train.py --data mmimdb
    python train.py --eval-only runs/food101-.../    # a run folder or checkpoint; settings come from it
    python train.py --resume --out runs/food101-.../ # continue a run as it was configured

Read top to bottom: defaults (one recipe row per dataset) -> the learning-rate schedule -> set-up (devices,
the checks made before anything is written, data, model) -> evaluation over the paper's scenarios -> the
summary over seeds -> one training step (eq. 7) -> train(), the loop with the epoch's end in it -> the command
line -> main.

Every random draw of a run is keyed by the run's seed through data.stream_seed (the missing tables, each
epoch's order, modality dropout and LoRA dropout per step, frames and crops per sample), so a run is the
same whether it is resumed, split across processes or read by any number of DataLoader workers: no RNG
state is saved.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

import data
import encoders
import u2a
from u2a import U2AConfig, modality_dropout, u2a_loss

# -----------------------------------------------------------------------------
# Defaults: the paper's Table 5 (supplementary section 2) and section 4.2, one recipe row per dataset

PAPER = dict(weight_decay=0.02, warmup_epochs=5,  # the model's own defaults are the paper's too:
             rank=U2AConfig.rank, alpha=U2AConfig.alpha, lora_dropout=U2AConfig.lora_dropout, lam=U2AConfig.lam)
ADAMW_EPS, WARMUP_FACTOR, POWER = 1e-8, 0.1, 0.9  # Table 5's values that no flag changes
# Where the paper is silent: the MT starts as the pretrained class token, as the CLS does; eq. 6 moves both
# tokens; the tokens learn at the run's learning rate. The encoders: u2a.ENCODER_FOLDERS["paper"].
AS_WRITTEN = dict(mt_init="cls", align_stop_grad=False, token_lr_scale=1.0, pretrained="paper")
IMAGE_TEXT = dict(lr=1e-3, epochs=10, batch_size=8, method=["u2a"], **AS_WRITTEN)
AUDIO_VIDEO = dict(lr=5e-5, epochs=100, batch_size=4, method=["u2a"], **AS_WRITTEN)
# Not the paper's: the toy default (the synthetic designs, generated in memory: no data root) trains the four
# methods side by side in 1.5-3.5 minutes on a CPU, on one thread (the toy encoders' matrices are
# tiny: on a busy 2-core machine a second thread ran the default several times slower). Its token settings
# are those under which the toy's MTs learned to estimate the other modality's CLS on most seeds (README, "The
# default run": not on seed 2); with the settings above, on the toy, the MTs stayed copies of their own CLS,
# above the constant-guess level, and the complete case fell to 89.2 (seeds 0-2).
TOY = dict(lr=2e-3, epochs=12, batch_size=32, warmup_epochs=1, lam=1.0, method=list(u2a.METHODS), mt_init="random",
           align_stop_grad=True, token_lr_scale=10.0, pretrained="toy", data_root=None, workers=0, threads=1)
RECIPES = {"food101": IMAGE_TEXT, "mmimdb": IMAGE_TEXT, "cremad": AUDIO_VIDEO, "ks": AUDIO_VIDEO, "ave": AUDIO_VIDEO,
           **dict.fromkeys(data.SYNTHETIC, TOY)}  # one row per dataset of data.DATASETS
DEFAULT_DATA = "synthetic"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
LOG_EVERY = 10  # steps between progress-bar/log updates: each one waits for the GPU (loss.item())


class UserError(Exception):
    """A mistake in what the user gave (a flag, a path, the data): `python train.py` prints its message as one
    `train.py: error: ...` line and exits with 2, as argparse does. Any other exception is a bug: a traceback."""


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss became NaN or infinite: bad inputs or too high a learning rate, the user's to fix."""


def native_bf16(gpu):
    """Whether the GPU this process will use (--gpu, or LOCAL_RANK under torchrun) computes bf16 natively:
    compute capability 8 (Ampere) or later. Older ones (T4, V100) have no bf16 tensor cores: PyTorch emulates
    bf16 there (torch.cuda.is_bf16_supported() says yes), so their default stays fp32."""
    if not torch.cuda.is_available() or (gpu is None and "RANK" not in os.environ):
        return False
    return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0)) if gpu is None else gpu)[0] >= 8


def defaults(name, gpu=None):
    """Every option left out, in three parts: the run's settings (a resumed run keeps them, refuses others),
    its places and extra test setting (kept unless given again: data and encoders may move), this call's own."""
    run = {**PAPER, "data": name, "limit": None, "seeds": [0], "train_missing_rate": 0.0, "train_missing_type": None,
           "modality_dropout": "auto", "on_error": "raise", "threads": None,
           "precision": "bf16" if native_bf16(gpu) else "fp32"}
    places = {"data_root": f"data/{name}", "weights": WEIGHTS_DIR, "test_missing_rate": None,
              "test_missing_type": None}  # None: the training setting
    invocation = {"out": None, "eval_only": None, "resume": False, "gpu": gpu, "compile": False, "save_every": 0,
                  "workers": min(4, os.cpu_count() or 1)}
    recipe = RECIPES[name]
    for part in (places, invocation):  # a recipe row may set these too (the toy: no data root, no workers)
        part.update({k: recipe[k] for k in part if k in recipe})
    run.update({k: v for k, v in recipe.items() if k not in places and k not in invocation})
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


def vars_json(args):
    """The settings as config.json and every checkpoint save them: what settings() reads back."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


# -----------------------------------------------------------------------------
# Learning rate (Table 5): 0.1x during the warm-up epochs, then polynomial decay with power 0.9. Our choice
# where the paper is silent: after warm-up the factor starts at 1.0 and decays over the remaining steps.

def lr_factor(step, total_steps, warmup_steps):
    if step < warmup_steps:
        return WARMUP_FACTOR
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (1.0 - min(done, 1.0)) ** POWER


# -----------------------------------------------------------------------------
# Set-up: devices, DDP, precision; the inputs checked before anything is written (set_up); data, model config

@dataclass
class Context:
    """Where this process runs and on what: fixed at start, passed to every step that needs it."""
    rank: int
    world: int
    device: torch.device
    info: data.DatasetInfo = None
    tokenizer: object = None     # the text encoder's own WordPiece (its vocab.txt); None without text
    autocast: object = nullcontext()

    def progress(self, iterable, desc):
        """A progress bar on rank 0 only (TQDM_DISABLE=1 silences it: `disable` is left to tqdm there)."""
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **({"disable": True} if self.rank else {}))

    def all_sum(self, t):
        """Sum a tensor over the DDP processes (in place); the identity for one process."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


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
    """fp32: none; bf16/fp16: torch.autocast on the device (fp16 also needs train()'s grad scaler)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def seed_step(seed, rank, step):
    """Step `step` of process `rank` draws its LoRA dropout masks from its own stream: independent across
    processes, and the same after a resume."""
    torch.manual_seed(data.stream_seed(seed, "lora_dropout", rank, step))


def encoder_paths(args, modalities):
    """{modality: folder} of the run's pretrained encoders under --weights (u2a.ENCODER_FOLDERS)."""
    return {m: Path(args.weights) / u2a.ENCODER_FOLDERS[args.pretrained][m] for m in modalities}


@contextmanager
def as_user_errors():
    """The libraries' errors while a run is set up are about what was given (a missing split file, a malformed
    row, a foreign checkpoint, a live run's folder): the user's to fix, so reported as a UserError."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise UserError(str(err)) from err


def check_inputs(args):
    """The data root and the pretrained weights, together: one start reports every fix. A resumed or evaluated
    run looks where its config says they were: if they moved, the fix is to say where they are now."""
    saved, problems = args.resume or args.eval_only is not None, []
    if args.data_root is not None and args.data not in data.EXPECTED_LAYOUT:  # no layout: the synthetic data
        problems.append(f"--data-root {args.data_root}: the {args.data} data is generated in memory and reads no "
                        f"files; leave --data-root out")
    elif args.data_root is not None and not Path(args.data_root).is_dir():
        problems.append(f"no dataset at --data-root {args.data_root}: " + (
            "the run's data was there; if it moved, pass --data-root NEWDIR" if saved else
            f"expected {data.EXPECTED_LAYOUT[args.data]} (README.md, 'Data', says where to get it)"))
    missing = {m: p / "model.safetensors" for m, p in encoder_paths(args, data.dataset_info(args.data).modalities)
               .items() if not (p / "model.safetensors").is_file()}
    if missing:
        folders = ", ".join(sorted({p.parent.relative_to(args.weights).as_posix() + "/" for p in missing.values()}))
        problems.append(f"no pretrained {' and '.join(missing)} encoder: {', '.join(map(str, missing.values()))} "
                        + (f"missing; the run's encoders were there: if they moved, pass --weights NEWDIR, the "
                           f"folder that now holds {folders}" if saved else
                           f"missing; get it with `{u2a.GET_ENCODERS[args.pretrained].format(weights=args.weights)}`"))
    if problems:
        raise UserError("cannot start:\n  - " + "\n  - ".join(problems))


def set_missing_tables(sets, args, info, out=None):
    """The train/val missing tables of the run's seed (section 4.4.1): each seed draws its own on the same data.
    With `out`, each is also written as out/missing_<split>.json, with the seed it was drawn with."""
    for split in [s for s in ("train", "val") if s in sets]:
        seed = data.stream_seed(args.seed, f"missing/{split}")
        if args.train_missing_rate:
            sets[split].set_present(data.missing_table(len(sets[split]), args.train_missing_rate,
                                                       args.train_missing_type, seed, info.modalities))
        if out is not None:
            data.save_missing_table(out / f"missing_{split}.json", sets[split].present, rate=args.train_missing_rate,
                                    type=args.train_missing_type, seed=seed)
    return sets


def build_splits(args, info, splits=("train", "val", "test")):
    """Every split, built and checked before the first step: a broken test split is found now, not after
    hours of training. The data is the same for every run seed (make_dataset's own data seed)."""
    sets = {split: data.make_dataset(args.data, args.data_root, split, train=split == "train", limit=args.limit,
                                     on_error=args.on_error) for split in splits}
    return set_missing_tables(sets, args, info)


def set_up(args, given, proc, splits, checkpoints=()):
    """Everything a run reads, checked before anything is written: the settings, the data root and the
    encoders, each split, the checkpoints it continues or evaluates (same classes, same encoders), and that
    the encoders fit the data. -> (Context, {split: dataset})"""
    with as_user_errors():
        data.check_missing_settings(vars(args), given)
        check_inputs(args)
        info = data.dataset_info(args.data, args.data_root)
        paths = encoder_paths(args, info.modalities)
        sets = build_splits(args, info, splits)
        tokenizer = encoders.load_tokenizer(paths["text"], info.text_max_len) if "text" in paths else None
        for ckpt in checkpoints:
            u2a.check_trained_on(ckpt, info.class_names, paths)
        u2a.check_encoders_fit(paths, info, tokenizer)
    return replace(proc, info=info, tokenizer=tokenizer, autocast=autocast_for(proc.device, args.precision)), sets


def model_config(args, info, method):
    return U2AConfig(encoders={m: str(p) for m, p in encoder_paths(args, info.modalities).items()},
                     class_names=list(info.class_names), multilabel=info.multilabel, method=method, rank=args.rank,
                     alpha=args.alpha, lora_dropout=args.lora_dropout, lam=args.lam, mt_init=args.mt_init,
                     align_stop_grad=args.align_stop_grad, text_max_len=info.text_max_len)


# -----------------------------------------------------------------------------
# Evaluation: a split is encoded once and every scenario scored from the stored tokens (u2a.py, "Scoring
# the paper's scenarios"). Under DDP each process encodes every world-th sample and the tokens are gathered:
# no process idles at a barrier through a long validation (NCCL's watchdog).

def encode_split(model, dataset, args, ctx, desc):
    """-> dict of CPU tensors, in sample order: cls/mt per modality (n, D), labels, present, index, and
    "unreadable" (an int): the files that failed to decode in on_error="skip" mode. Samples left with no
    modality are absent (their index is not in "index"); None when not one sample could be read."""
    shard = list(range(ctx.rank, len(dataset), ctx.world))
    loader = data.make_loader(dataset, max(1, args.batch_size // ctx.world) * 4, False, ctx.tokenizer,
                              args.workers, data.stream_seed(args.seed, "eval_loader"), sampler=shard)
    parts = u2a.encode_batches(model, ctx.progress(loader, desc), ctx.device, ctx.autocast)
    if ctx.world > 1:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, parts)
        parts = {k: [t for p in gathered for t in p.get(k, [])] for k in parts}
    unreadable = int(sum(t.sum() for t in parts.pop("unreadable")))
    if not parts["index"]:
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
    return u2a.scores(logits, feats["labels"], ctx.info.multilabel)[ctx.info.headline]


def evaluate_test(model, test_set, args, ctx, out, ckpt, train_seconds=0.0):
    """Test-set evaluation of a trained model over every scenario of the paper; rank 0 prints the paper's
    tables and writes metrics.json, the scenarios' missing tables and (small enough) the test tokens for the
    notebooks."""
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
    scenarios, seed = data.test_scenarios(info, vars(args))
    results, analysis = u2a.evaluate_scenarios(model, feats, scenarios, placeholders, len(test_set), seed)
    data.save_test_tables(out, scenarios, len(test_set), seed)
    metrics = {"method": model.config.method, "data": info.name, "checkpoint": str(ckpt),
               "train_seconds": round(train_seconds, 1), "class_names": info.class_names,
               "test_samples": len(test_set), "test_skipped": skipped, "test_unreadable": unreadable,
               "scenarios": results, **analysis}
    u2a.write_json(out / "metrics.json", metrics)
    data.print_tables(results, info, (args.train_missing_rate, args.train_missing_type),
                      f"{metrics['method']}, seed {args.seed}" + (f", {ckpt}" if args.eval_only else ""))
    if len(feats["labels"]) * model.head.in_features <= 50_000_000:
        save_file({k: v.contiguous() for k, v in feats.items()}, str(out / "test_tokens.safetensors"))
    return metrics


# -----------------------------------------------------------------------------
# The summary: each method's test score in every scenario over the seeds, beside the paper's U2A number where
# the paper reports one for that dataset and setting (data.py, appendix C: the paper's tables)

TABLE5_KEYS = ("lr", "epochs", "batch_size", "warmup_epochs", "weight_decay", "rank", "alpha", "lora_dropout", "lam")
# AS_WRITTEN's settings that the paper's text fixes: eq. 6 moves both tokens; one learning rate (MT init: silent)
AS_WRITTEN_KEYS = ("align_stop_grad", "token_lr_scale")


def report(runs, info, args, folder, counts):
    """The summary over seeds of runs {(seed, method): metrics} (data.summary_report), with the settings that
    differ from Table 5 (counts: {split: samples loaded}). -> the runs as the run folder holds them:
    {method: metrics} for one seed, {seed: {method: metrics}} for several."""
    runs = dict(sorted(runs.items(), key=lambda run: list(u2a.METHODS).index(run[0][1])))  # naive first, u2a last
    table5 = defaults(info.name)[0]
    # section 3: no modality dropout on a training set that misses modalities (--modality-dropout on changes only those)
    keys = TABLE5_KEYS + AS_WRITTEN_KEYS + (("modality_dropout",) if args.train_missing_rate else ())
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (paper: {table5[k]})" for k in keys
               if getattr(args, k) != table5[k]]
    summary, text = data.summary_report(runs, info, (args.train_missing_rate or 0.0, args.train_missing_type),
                                        data.setting_notes(info, counts, args.limit, changed))
    print("\n" + text + f"(written to {folder / 'summary.json'} and {folder / 'summary.md'})")
    u2a.write_json(folder / "summary.json", summary)
    u2a.write_text(folder / "summary.md", text)
    if len({seed for seed, _ in runs}) == 1:
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
    counts = ctx.all_sum(torch.stack([present.new_tensor(len(present), dtype=torch.float),
                                      present.all(1).sum().float()]))  # (2,) samples, complete samples
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
    """Train one method on seed args.seed and that seed's missing tables, keep the checkpoint of the best validation
    score (model selection on validation, never on test), then evaluate it on test. Continues from
    last.safetensors on --resume."""
    info, last = ctx.info, out / "last.safetensors"
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    set_missing_tables(sets, args, info, out if ctx.rank == 0 else None)  # this seed's tables, on every process
    torch.manual_seed(data.stream_seed(args.seed, "init"))  # the same initialisation on every process
    model = u2a.U2A(model_config(args, info, method)).to(ctx.device)
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, args.token_lr_scale, ADAMW_EPS)
    if ctx.rank == 0:
        print(f"{method}: {model.parameter_table()}")
    step, best, best_step, spent = 0, -math.inf, -1, 0.0  # spent: seconds of training before this process
    if args.resume and last.is_file():
        meta = u2a.load_trained(model, last, optimizer)
        step, best, best_step, spent = meta["step"], meta["best"], meta["best_step"], meta.get("train_seconds", 0)
        if ctx.rank == 0:
            print(f"resumed {last} at step {step}")
    wrapped = torch.compile(model) if args.compile else model
    if ctx.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)  # a dropped or absent modality leaves its branch without gradients
    learner = Learner(model, wrapped, optimizer, torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16"))
    meta = lambda: {"step": step, "best": best, "best_step": best_step, "train_seconds": spent + time.time() - t0,
                    "data": args.data, "config": vars_json(args)}
    # section 3: dropout on complete training data only, i.e. no missing rate (files marked absent in skip mode
    # are a few samples of a complete setting; dropout never takes a sample's only modality)
    complete = not args.train_missing_rate
    use_dropout = model.method.dropout and (args.modality_dropout == "on" or complete)
    if model.method.dropout and not use_dropout and ctx.rank == 0:  # else it would train as naive does, unsaid
        print(f"{method}: no modality dropout: the training set already misses modalities (section 3); "
              f"--modality-dropout on drops anyway")
    steps_per_epoch = len(sets["train"]) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, steps_per_epoch * args.warmup_epochs
    nonfinite = torch.zeros((), device=ctx.device)  # non-finite losses since the last check, counted on the device
    faults = torch.zeros(2, dtype=torch.long)       # skip mode, this process: samples skipped, files unreadable
    seen, loss, t0 = 0, math.nan, time.time()
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        model.train()
        sets["train"].set_epoch(epoch, args.seed)  # frames and crops of each sample: stream_seed(seed, "sample", epoch, i)
        sampler = data.EpochSampler(len(sets["train"]), args.batch_size, args.seed, epoch, (ctx.rank, ctx.world), skip)
        loader = data.make_loader(sets["train"], args.batch_size // ctx.world, False, ctx.tokenizer, args.workers,
                                  data.stream_seed(args.seed, "loader", epoch), sampler=sampler)
        bar = ctx.progress(loader, f"{method} epoch {epoch + 1}/{args.epochs}")
        for batch in bar:
            faults += torch.stack([batch["skipped"], batch["unreadable"]])
            batch = u2a.to_device(batch, ctx.device)
            if use_dropout:  # section 3, drawn from the step (the same on every process); a dropped input holds
                # the placeholder, as a missing one does (what the placeholder methods encode)
                g = torch.Generator().manual_seed(data.stream_seed(args.seed, "modality_dropout", step))
                batch = data.drop_modalities(batch, modality_dropout(batch["present"], g), info, ctx.tokenizer)
            seed_step(args.seed, ctx.rank, step)
            lr = args.lr * lr_factor(step, total, warmup)
            losses = train_step(learner, batch, lr, ctx, may_be_empty=args.on_error == "skip")
            nonfinite += ~torch.isfinite(losses).all()
            step, seen = step + 1, seen + len(batch["label"]) * ctx.world
            logging = step % LOG_EVERY == 0 or step % steps_per_epoch == 0
            saving = args.save_every and step % args.save_every == 0
            # the only places the loop waits for the GPU: a check before any checkpoint can hold NaN, and the log
            if (logging or saving) and ctx.all_sum(nonfinite.clone()).item() > 0:
                raise NonFiniteLoss(f"the loss became NaN or infinite by step {step}; stopped before writing "
                                    f"a checkpoint (the last good one, if any: {last}). Check the inputs (a "
                                    f"file with NaN/Inf values) or lower --lr")
            if logging:
                loss, task, align = ctx.all_sum(losses).tolist()  # each process holds its share of eq. 7
                if ctx.rank == 0:
                    sps = round(seen / (time.time() - t0), 1)
                    u2a.append_log(out, {"step": step, "epoch": epoch, "loss": loss, "task": task, "align": align,
                                         "lr": lr, "samples_per_s": sps})
                    bar.set_postfix(loss=f"{loss:.3f}", align=f"{align:.3f}", lr=f"{lr:.1e}", sps=f"{sps:.0f}")
            if saving and ctx.rank == 0:
                u2a.save_checkpoint(last, model, meta(), optimizer)
        # the epoch's end: validation, best.safetensors when it improved, last.safetensors always
        score = validate(model, sets["val"], args, ctx)
        skipped, unreadable = ctx.all_sum(faults.to(ctx.device)).tolist()
        if ctx.rank == 0:
            if score > best or best_step < 0:
                best, best_step = score, step
                u2a.save_checkpoint(out / "best.safetensors", model, meta())
            u2a.save_checkpoint(last, model, meta(), optimizer)
            u2a.append_log(out, {"step": step, "epoch": epoch, "val": score})
            print(f"{method} epoch {epoch + 1}/{args.epochs}: val {info.headline} {score:.2f} "
                  f"(best {best:.2f}), loss {loss:.3f}"
                  + (f"; skipped so far: {unreadable} unreadable files, {skipped} samples with none left"
                     if unreadable else ""))
        if ctx.world > 1:
            dist.barrier()  # best.safetensors is written before any process reads it
    # the validation-selected model, with the encoders where they are now (a resumed run may have moved them)
    model = u2a.from_checkpoint(out / "best.safetensors", encoder_paths(args, info.modalities)).to(ctx.device)
    return evaluate_test(model, sets["test"], args, ctx, out, out / "best.safetensors", spent + time.time() - t0)


# -----------------------------------------------------------------------------
# Command line. The options' defaults are defaults() and settings(): the parser keeps only what was given.

def user_path(text):
    """A path flag, `~` read as the home folder: bash expands `--out ~/x` but leaves `--out=~/x` alone."""
    return Path(text).expanduser()


def make_parser():
    rows = {"image-text": IMAGE_TEXT, "audio-video": AUDIO_VIDEO, "toy": TOY}
    epilog = "\n".join(["defaults per dataset (Table 5; toy: the synthetic data, offline):"] + [
        f"  {group:<12} lr {r['lr']:g}, epochs {r['epochs']}, batch {r['batch_size']}, warm-up epochs "
        f"{r.get('warmup_epochs', PAPER['warmup_epochs'])}, lambda {r.get('lam', PAPER['lam'])}, methods "
        f"{' '.join(r['method'])}; MT init {r['mt_init']}, alignment stop-gradient {r['align_stop_grad']}, "
        f"tokens at {r['token_lr_scale']:g}x lr" for group, r in rows.items()] + [
        f"  all          AdamW (eps {ADAMW_EPS:g}, weight decay {PAPER['weight_decay']}), warm-up at {WARMUP_FACTOR}x "
        f"lr, then polynomial decay (power {POWER}); LoRA rank {PAPER['rank']}, alpha {PAPER['alpha']:g}, dropout "
        f"{PAPER['lora_dropout']}; lambda {PAPER['lam']}"])
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a, per = p.add_argument, "(default: per dataset, below)"
    a("--data", choices=data.DATASETS, help=f"the dataset (default: {DEFAULT_DATA})")
    a("--data-root", type=user_path, help="dataset folder (default: data/<name>/)")
    a("--weights", type=user_path, help=f"folder of pretrained checkpoints (default: {WEIGHTS_DIR})")
    a("--out", type=user_path, help="run folder (default: runs/<data>-<time>/)")
    a("--gpu", type=int, help="CUDA device index (one process); without it the run uses the CPU")
    a("--precision", choices=("bf16", "fp16", "fp32"),
      help="autocast precision (default: bf16 on GPUs that support it natively, else fp32)")
    a("--epochs", type=int, help=per)
    a("--batch-size", type=int, help="global batch, split across DDP processes " + per)
    a("--lr", type=float, help=per)
    a("--warmup-epochs", type=int, help=per)
    a("--weight-decay", type=float, help=f"(default: {PAPER['weight_decay']})")
    a("--rank", type=int, help=f"LoRA rank (default: {PAPER['rank']})")
    a("--alpha", type=float, help=f"LoRA alpha (default: {PAPER['alpha']:g})")
    a("--lora-dropout", type=float, help=f"(default: {PAPER['lora_dropout']})")
    a("--lam", type=float, help=f"lambda of eq. 7 (default: {PAPER['lam']})")
    a("--seed", type=int, nargs="+", dest="seeds", metavar="SEED", help="one or more run seeds; every (seed, "
      "method) pair trains in its own folder, and summary.json gives the mean and SD over the seeds (default: 0)")
    a("--train-missing-rate", type=float, help="eta for the training set, e.g. 0.7 (default: 0)")
    a("--train-missing-type", help="which modality is missing in training: m1, m2 name or 'both'")
    a("--test-missing-rate", type=float, help="extra test setting (default: the training one)")
    a("--test-missing-type")
    a("--modality-dropout", choices=("auto", "on", "off"), help="auto (default): a method with dropout drops on a "
      "complete training set (section 3); on: also on an incomplete one; off: refused for such a method (naive is "
      "the method without)")
    a("--method", nargs="+", choices=list(u2a.METHODS), metavar="METHOD", help="one or more of " + ", ".join(
        f"{name} ({m.stand_in}, dropout {'on' if m.dropout else 'off'}, {'lambda' if m.align else 'lambda 0'})"
        for name, m in u2a.METHODS.items()) + " " + per)
    a("--mt-init", choices=("cls", "random"), help="how each MT starts " + per)
    a("--align-stop-grad", action=argparse.BooleanOptionalAction, help="eq. 6's CLS targets as constants " + per)
    a("--token-lr-scale", type=float, help="the CLS/MT tokens' learning rate over --lr " + per)
    a("--limit", type=int, help="use the first N samples of each split")
    a("--eval-only", type=user_path, metavar="RUN", help="evaluate a checkpoint or run folder, no training")
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
    for key, (ok, expected) in RANGES.items():
        if key in given and not ok(given[key]):
            p.error(f"--{key.replace('_', '-')} must be {expected}, got {given[key]}")
    if given.get("resume") and out is None:
        p.error("--resume needs --out: the run folder to continue")
    if out is not None and out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file: give a folder for the run")
    held = u2a.run_files(out) if out is not None else []  # the run files already in --out
    if held and not given.get("resume") and eval_only is None:
        p.error(f"--out {out} holds a run ({held[0]}): `--resume --out {out}` continues it; "
                f"to start a new run, choose another --out")
    if given.get("resume") and eval_only:
        p.error("--resume and --eval-only exclude each other")
    if eval_only is not None and not eval_only.exists():
        p.error(f"--eval-only {eval_only}: no such checkpoint or run folder")
    trained = [f for f in held if f.name != "metrics.json"]  # an evaluation writes metrics.json alone of these
    evaluated = eval_only if eval_only is None or eval_only.is_dir() else eval_only.parent
    if trained and evaluated is not None and out.resolve() != evaluated.resolve():
        p.error(f"--out {out} holds another run ({trained[0]}): --eval-only would write its results beside that "
                f"run's checkpoints; choose another --out, or leave it out (each checkpoint's folder)")
    if gpu is not None and "RANK" in os.environ:
        p.error("--gpu is for one process: under torchrun each process uses cuda:LOCAL_RANK (choose the "
                "GPUs with CUDA_VISIBLE_DEVICES)")
    if gpu is not None and not torch.cuda.is_available():
        p.error(f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__}); "
                f"drop --gpu to run on the CPU")
    if gpu is not None and gpu >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        indices = "index 0" if n == 1 else f"index 0 to {n - 1}"
        p.error(f"--gpu {gpu}: this machine has {n} CUDA device{'s' if n > 1 else ''} ({indices})")


def check_method_flags(p, args, given):
    """A setting that contradicts another, or every chosen method (u2a.METHODS says what each is), by name."""
    methods = {name: u2a.METHODS[name] for name in args.method}
    if args.warmup_epochs and args.epochs <= args.warmup_epochs:
        p.error(f"--epochs {args.epochs} <= --warmup-epochs {args.warmup_epochs}: the whole run would train at "
                f"{WARMUP_FACTOR}x the learning rate; give more epochs or --warmup-epochs 0")
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
    value = " ".join(map(str, value)) if isinstance(value, list) else value
    return f"--{'seed' if key == 'seeds' else key.replace('_', '-')} {value}"


def absolute(places):
    """--data-root and --weights are kept absolute (in config.json too): found again from any directory."""
    for key in ("data_root", "weights"):
        if places.get(key) is not None:
            places[key] = type(places[key])(Path(places[key]).resolve())
    return places


def parse_args(argv=None):
    """-> (args: every setting, given: {option: value} of those the user gave). A resumed run's settings come
    from its config.json; an evaluated checkpoint's from the checkpoint (evaluate_only)."""
    p = make_parser()
    given = vars(p.parse_args(argv))
    check_args(p, given)
    absolute(given)
    saved = None
    if given.get("resume"):
        try:
            saved = u2a.run_config(given["out"])
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"--resume: {err}") from None
    run = defaults(saved.get("data", DEFAULT_DATA))[0] if saved else {}
    clash = [k for k in run if k in given and str(given[k]) != str(saved.get(k))]
    if clash:
        raise UserError(f"--resume continues the run as it was configured; these settings differ from "
                        f"{given['out'] / 'config.json'}: "
                        + ", ".join(f"{as_flag(k, given[k])} (run: {as_flag(k, saved.get(k))})" for k in clash))
    args = settings(given, saved)
    check_method_flags(p, args, given)
    return args, given


# -----------------------------------------------------------------------------
# main: train every (seed, method) pair (or resume them, or evaluate checkpoints), then the summary

def evaluate_only(args, given, proc):
    """Every checkpoint of --eval-only (a file, or a run folder: its best.safetensors, else every run's;
    --method and --seed pick among them), each written where it lies or under --out in the same layout, then
    the summary over them. The model's settings come from its checkpoint; the data and test setting may not."""
    root, runs, model_keys = Path(args.eval_only), {}, {f.name for f in fields(U2AConfig)} - {"method"}
    found = [root] if root.is_file() else u2a.run_files(root, ["best.safetensors"])
    if not found:
        raise UserError(f"--eval-only {root}: no best.safetensors in it, nor in its sub-folders (<method>/, "
                        f"seed<k>/, seed<k>/<method>/; methods: {', '.join(u2a.METHODS)})")
    for ckpt in found[:1] if found[0].parent == root else found:
        with as_user_errors():  # not a checkpoint of this project
            meta = u2a.open_checkpoint(ckpt)[1]
        clash = [k for k in given if k in model_keys and str(given[k]) != str(meta["config"].get(k))]
        if clash:
            raise UserError(f"{ckpt} was trained with " + ", ".join(as_flag(k, meta["config"].get(k)) for k in clash)
                            + ": the model's settings come from the checkpoint; leave them out")
        ev = settings(given, meta["config"])  # ev.seed: the checkpoint's own run seed
        if ("method" in given and meta["model"]["method"] not in args.method) or \
                ("seeds" in given and ev.seed not in args.seeds):
            continue
        ev.out = args.out / ckpt.parent.relative_to(root) if "out" in given and root.is_dir() else \
            given.get("out", ckpt.parent)  # under --out, in the evaluated folder's layout
        ctx, sets = set_up(ev, given, proc, ("test",), [ckpt])
        with as_user_errors():  # a checkpoint that holds NaN: refused
            model = u2a.from_checkpoint(ckpt, encoder_paths(ev, ctx.info.modalities)).to(proc.device)
        runs[(ev.seed, meta["model"]["method"])] = evaluate_test(model, sets["test"], ev, ctx, ev.out, ckpt)
    if not runs:
        raise UserError(f"--eval-only {root}: none of its checkpoints ({', '.join(map(str, found))}) "
                        f"is of the --seed / --method given; leave them out to evaluate every one")
    if proc.rank > 0:
        return {}
    print(f"\n== Summary: {ev.data}, test {ctx.info.headline} (%), evaluated {root} ==")
    return report(runs, ctx.info, ev, args.out if "out" in given else root if root.is_dir() else root.parent,
                  {"test": len(sets["test"])})


def run_pairs(args, sets, ctx):
    """Every (seed, method) pair, one after the other, each with its own seed's missing tables and streams.
    With --resume a pair whose metrics.json exists is finished: read back, not trained again; an unfinished
    one continues from its last.safetensors. -> {(seed, method): metrics} (None on ranks other than 0)."""
    pairs, runs = [(seed, method) for seed in args.seeds for method in args.method], {}
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
        runs[(seed, method)] = train(run_args, method, out, sets, ctx)
    return runs


def train_and_report(args, given, proc):
    """Everything checked before anything is written, then every pair trained in the locked run folder."""
    if args.batch_size % proc.world:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {proc.world} processes")
    ctx, sets = set_up(args, given, proc, ("train", "val", "test"),
                       u2a.run_files(args.out, ["last.safetensors"]) if args.resume else [])
    if len(sets["train"]) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                        f"({len(sets['train'])} samples)")
    if args.out is None:  # one folder for the run, named on rank 0 and shared with the other processes
        name = [Path("runs") / f"{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if proc.world > 1:
            dist.broadcast_object_list(name, src=0)
        args.out = name[0]
    lock = None
    if proc.rank == 0:  # only now, every check passed: a failed start leaves no empty run folder behind
        with as_user_errors():  # another live run's folder
            lock = u2a.open_run_folder(args.out, vars_json(args), args.resume)
        print(f"{args.data}: train {len(sets['train'])}, val {len(sets['val'])}, test {len(sets['test'])} "
              f"samples; {args.precision} on {proc.device}" + (f" x {proc.world} processes" if proc.world > 1 else ""))
        if args.pretrained == "toy":
            print("Offline default: synthetic image+text data and TOY encoders (tiny ViT/BERT pretrained on "
                  "synthetic shapes and words, weights/toy/). The paper's results need the real encoders "
                  "(python weights/download.py) and a real dataset: python train.py --data food101 --gpu 0")
    try:
        t0, runs = time.time(), run_pairs(args, sets, ctx)
        if proc.rank > 0:
            return None
        print(f"\n== Summary: {args.data}, test {ctx.info.headline} (%), {time.time() - t0:.0f} s, "
              f"run folder {args.out} ==")
        return report(runs, ctx.info, args, args.out, {split: len(ds) for split, ds in sets.items()})
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def main(argv=None):
    """Train (or resume, or evaluate) as the command line says. A mistake in what the user gave raises
    UserError (the script prints it as one line and exits with 2); anything else is a bug."""
    args, given = parse_args(argv)
    absolute(vars(args))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    proc = setup_distributed(args)
    try:
        return evaluate_only(args, given, proc) if args.eval_only else train_and_report(args, given, proc)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (UserError, data.UnreadableFile) as err:  # the user's to fix: one line, as argparse reports a bad
        print(f"train.py: error: {err}", file=sys.stderr)  # flag; bugs keep a traceback
        sys.exit(2)
