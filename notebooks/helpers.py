"""
Plumbing shared by the notebooks: their set-up, pointers into the source, the toy model, train.py run folders,
demo inputs.

Nothing here computes a piece of U2A, and nothing here imports train.py (the command line): the model,
token selection, scoring and preprocessing all come from the library modules (u2a.py, data.py, encoders.py);
this file only finds files and builds the objects those modules expect, so that each notebook can say
`load_run(folder)` instead of repeating twenty lines of set-up.

Importing it is the notebooks' one set-up: Jupyter starts a notebook's kernel in the notebook's folder, and
this puts the repository root on sys.path, so that the line after it can `import data, encoders, u2a`.

Read top to bottom: set-up -> where the code does a step -> the toy model -> a train.py run folder (its
methods, model, stored test tokens, scenarios, log) -> the fused feature -> demo inputs for real datasets.
"""
import inspect
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402  the library modules, from the repository root
import encoders  # noqa: E402
import u2a  # noqa: E402

RUN_DIR = os.environ.get("U2A_RUN")  # a train.py run folder to read; None: the synthetic default
TOY_ENCODERS = {m: ROOT / "weights" / folder for m, folder in u2a.ENCODER_FOLDERS["toy"].items()}


# -----------------------------------------------------------------------------
# Where the code does a step: read from the live source, so the pointer follows the code when it changes

def where(obj, *needles):
    """Print `file:line  code` for the first line of `obj`'s source containing each needle."""
    obj = inspect.unwrap(obj)  # a decorated function (@torch.no_grad): its own source, not the decorator's
    lines, start = inspect.getsourcelines(obj)
    file = Path(inspect.getsourcefile(obj)).name
    for needle in needles:
        hits = [i for i, line in enumerate(lines) if needle in line]
        if not hits:
            raise LookupError(f"{needle!r} is no longer in {file}:{obj.__qualname__}: update the notebook's pointer")
        print(f"  {file}:{start + hits[0]:<4d} {lines[hits[0]].strip()}")


# -----------------------------------------------------------------------------
# The toy model: the tiny pretrained encoders of weights/toy/ and a fresh U2A for the synthetic classes

def toy_model(method="u2a"):
    """A fresh U2A (LoRA B = 0, CLS = MT = pretrained class token) on the toy ViT and BERT for the default
    synthetic classes, in eval mode."""
    config = u2a.U2AConfig(encoders={m: str(path) for m, path in TOY_ENCODERS.items()},
                           class_names=data.synthetic_class_names("synthetic"), method=method)
    return u2a.U2A(config).eval()


# -----------------------------------------------------------------------------
# Run folders written by train.py

def method_folders(run):
    """{method: folder} of the finished runs of one seed, U2A first. `train.py --out RUN` writes one method's
    files into RUN itself, or into RUN/<method> for each of several methods (u2a.run_folder's layout; of a
    run of several seeds, pass RUN/seed<k>)."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist (expected the --out folder of train.py)")
    folders = {}
    for folder in u2a.run_folders(run):
        if folder == run or (folder.parent == run and folder.name in u2a.METHODS):  # not another seed's
            if (folder / "metrics.json").is_file():
                folders.setdefault(json.loads((folder / "metrics.json").read_text())["method"], folder)
    if not folders:
        seeds = sorted(p.name for p in run.glob("seed*") if p.is_dir())
        raise FileNotFoundError(f"{run}: no metrics.json in it nor in a method's sub-folder ({', '.join(u2a.METHODS)}): "
                                "not a finished train.py run folder"
                                + (f"; it holds several seeds' runs: pass one of {', '.join(seeds)}" if seeds else ""))
    return dict(sorted(folders.items(), key=lambda kv: kv[0] != "u2a"))


def run_settings(folder):
    """The run's settings, as train.py stored them in its checkpoint (its command-line options)."""
    _, meta = u2a.open_checkpoint(Path(folder) / "best.safetensors")
    return meta["config"]


def run_tokenizer(model, info):
    """The tokenizer the run's text encoder was trained with: its folder's vocabulary, the dataset's length."""
    if "text" not in model.modalities:
        return None
    return encoders.load_tokenizer(model.config.encoders["text"], info.text_max_len)


def load_run(folder):
    """Everything the analyses need from one method's folder: metrics.json, the stored test tokens
    (cls.<m>, mt.<m> (n, D), labels, present, index), the trained model rebuilt from best.safetensors,
    a placeholder method's placeholder tokens (naive, placeholder-dropout), the test scenarios and the
    training log."""
    folder = Path(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    tokens_file = folder / "test_tokens.safetensors"
    if not tokens_file.is_file():
        raise FileNotFoundError(f"{tokens_file} is missing: train.py stores the test tokens only when test samples "
                                "x width D is at most 50M; re-run with --eval-only on a smaller --limit")
    settings = run_settings(folder)
    model = u2a.from_checkpoint(folder / "best.safetensors")  # its encoders where training found them
    info = data.dataset_info(settings["data"])  # no data root: Food-101's class names come from the model
    placeholders = None
    if model.method.stand_in == "placeholder":
        placeholders = u2a.placeholder_tokens(model, run_tokenizer(model, info))
    scenarios, seed = data.test_scenarios(info, settings)  # as train.py drew them for metrics.json
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return SimpleNamespace(folder=folder, metrics=metrics, tokens=load_file(str(tokens_file)), model=model,
                           info=info, settings=settings, placeholders=placeholders, scenarios=scenarios, seed=seed,
                           log=log)


def find_scenario(r, rate, missing=None):
    """The run's test scenario (a data.Scenario) in which a share `rate` of the test samples lacks the
    modality `missing` (rate 0: the complete test set)."""
    for sc in r.scenarios:
        if sc.rate == rate and (rate == 0 or sc.missing_type == missing):
            return sc
    raise KeyError(f"{r.folder}: no test scenario with {100 * rate:g}% of the samples missing {missing}")


def result(r, rate, missing=None):
    """metrics.json's result (headline score, per-class scores, groups) for that scenario."""
    return r.metrics["scenarios"][find_scenario(r, rate, missing).name]


# -----------------------------------------------------------------------------
# The fused feature T1 + T2: what the head sees (eq. 5)

def fused_features(model, tokens, present, placeholders=None):
    """T1 + T2 (n, D) under a present table (n, 2): the head's input, recorded while u2a.scenario_logits
    runs, so it is the forward pass's own token selection (a placeholder method's placeholders included)."""
    seen = []
    hook = model.head.register_forward_pre_hook(lambda head, args: seen.append(args[0]))
    try:
        u2a.scenario_logits(model, tokens, present, placeholders)
    finally:
        hook.remove()
    return seen[0].float().cpu()


# -----------------------------------------------------------------------------
# Demo inputs for runs on real datasets: generated, but through the dataset's real preprocessing

DEMO_TEXTS = ["a bowl of ramen with a soft boiled egg", "chocolate cake with fresh strawberries",
              "a detective hunts a killer through the rainy city", "two old friends on a road trip"]


def demo_image(i, size=(320, 240)):
    """A colourful PIL image (w, h) = size: a gradient and a disc whose place depends on i."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w * (0.3 + 0.4 * (i % 2)), h * (0.3 + 0.4 * (i // 2 % 2))
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (min(w, h) / 5) ** 2
    rgb = np.stack([xx / w, yy / h, 0.5 + 0.5 * disc], -1) * 255
    return Image.fromarray(rgb.astype(np.uint8))


def demo_input(modality, i):
    """One sample's model input for a modality, made by the encoders' own preprocessing (encoders.py)."""
    if modality == "image":
        return encoders.clip_image(demo_image(i))                                  # (3, 224, 224)
    if modality == "video":
        return torch.stack([encoders.clip_image(demo_image(i + t)) for t in range(encoders.NUM_FRAMES)])
    if modality == "audio":
        t = torch.arange(2 * encoders.SAMPLE_RATE) / encoders.SAMPLE_RATE          # 2 s
        return encoders.fbank(0.3 * torch.sin(2 * math.pi * 220 * (i + 1) * t), encoders.SAMPLE_RATE)  # (1024, 128)
    if modality == "text":
        return DEMO_TEXTS[i % len(DEMO_TEXTS)]
    raise ValueError(f"unknown modality {modality!r}")


def demo_batch(info, tokenizer, present):
    """A batch dict (data.py's contract) of generated samples; present (B, 2) decides who is missing."""
    samples = []
    for i, row in enumerate(present.tolist()):
        sample = {m: demo_input(m, i) if has else None for m, has in zip(info.modalities, row)}
        label = torch.zeros(info.num_classes) if info.multilabel else 0
        samples.append({**sample, "label": label, "index": i})
    return data.collate(samples, info, tokenizer)
