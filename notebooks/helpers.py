"""
Plumbing shared by the notebooks: pointers into the source, train.py run folders, demo inputs.

Nothing here computes a piece of U2A. The model, token selection, scoring and preprocessing all come from the
project's modules (u2a.py, train.py, data.py); this file only finds files and builds the objects that those
modules expect, so that each notebook can say `load_run(folder)` instead of repeating twenty lines of set-up.

Read top to bottom: where a step lives in the code -> which methods a run folder holds -> loading one method
(trained model, stored test tokens, metrics) -> generated demo inputs for runs on real datasets.
"""
import argparse
import dataclasses
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import data
import encoders
import train
import u2a

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {encoders.ViT: encoders.ViTConfig, encoders.BERT: encoders.BERTConfig, encoders.AST: encoders.ASTConfig}
METHOD_NAMES = {"mask_token": "u2a", "placeholder": "naive"}  # U2A(missing=...) -> train.py's --method


# -----------------------------------------------------------------------------
# Where the code does a step: read from the live source, so the pointer follows the code when it changes

def where(obj, *needles):
    """Print `file:line  code` for the first line of `obj`'s source containing each needle."""
    lines, start = inspect.getsourcelines(obj)
    file = Path(inspect.getsourcefile(obj)).name
    for needle in needles:
        hits = [i for i, line in enumerate(lines) if needle in line]
        if not hits:
            raise LookupError(f"{needle!r} is no longer in {file}:{obj.__qualname__}: update the notebook's pointer")
        print(f"  {file}:{start + hits[0]:<4d} {lines[hits[0]].strip()}")


# -----------------------------------------------------------------------------
# Run folders written by train.py

def method_folders(run):
    """{method: folder}. `train.py --out RUN` writes one method's files into RUN itself, or into RUN/u2a and
    RUN/naive when it also trains the naive baseline (the synthetic default, or --compare-naive)."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist (expected the --out folder of train.py)")
    folders = {}
    if (run / "metrics.json").is_file():
        folders[METHOD_NAMES[json.loads((run / "metrics.json").read_text())["method"]]] = run
    for method in ("u2a", "naive"):
        if (run / method / "metrics.json").is_file():
            folders[method] = run / method
    if not folders:
        raise FileNotFoundError(f"{run}: no metrics.json in it nor in {run / 'u2a'} or {run / 'naive'}: "
                                "not a finished train.py run folder")
    return dict(sorted(folders.items(), key=lambda kv: kv[0] != "u2a"))  # U2A first


def run_config(folder):
    """(meta, args) from the run's checkpoint, which records the method, the dataset and every option."""
    meta = train.checkpoint_meta(Path(folder) / "best.safetensors")
    args = argparse.Namespace(**meta["config"])
    args.weights = Path(args.weights)
    return meta, args


def run_info(meta, class_names=None, num_classes=None):
    """The run's DatasetInfo without its data on disk. Food-101's class names are only known from its
    folders: metrics.json carries them."""
    info = data.dataset_info(meta["data"])
    if class_names:
        info = dataclasses.replace(info, class_names=list(class_names), num_classes=len(class_names))
    if num_classes is not None and num_classes != info.num_classes:
        raise ValueError(f"{meta['data']}: the checkpoint's head has {num_classes} classes, "
                         f"the dataset {info.num_classes}")
    return info


def load_model(folder, class_names=None):
    """The trained model of a run: the frozen encoders train.py used (args.weights) + best.safetensors.
    Raises FileNotFoundError, naming the file and how to get it, when the encoders are not on disk."""
    meta, args = run_config(folder)
    info = run_info(meta, class_names)
    model = train.build_model(args, info, meta["method"])
    train.load_checkpoint(Path(folder) / "best.safetensors", model)
    return model.eval(), info, args


def load_head_only(folder, class_names=None):
    """The same U2A without its encoders: built on the meta device (no memory, no weights) with stand-in
    encoders of the right width, and only the head made real and loaded from the checkpoint. Enough for
    everything that starts from the stored test tokens: select_tokens, train.scenario_logits, train.evaluate."""
    meta, args = run_config(folder)
    with safe_open(str(Path(folder) / "best.safetensors"), framework="pt") as f:
        head = {"weight": f.get_tensor("model.head.weight"), "bias": f.get_tensor("model.head.bias")}
    num_classes, width = head["weight"].shape
    info = run_info(meta, class_names, num_classes)
    with torch.device("meta"):  # stand-ins: one tiny block of the right width, never run
        stand_ins = {}
        for m in info.modalities:
            encoder = u2a.MODALITY_ENCODER[m]
            config = CONFIGS[encoder](hidden_size=width, num_hidden_layers=1, num_attention_heads=1,
                                      intermediate_size=width)
            stand_ins[m] = encoder(config)
        model = u2a.U2A(stand_ins, num_classes, missing="mask_token" if meta["method"] == "u2a" else "placeholder")
    model.head.to_empty(device="cpu")
    model.head.load_state_dict(head)
    return model.eval(), info, args


def load_run(folder):
    """Everything the analyses need from one method's folder: metrics.json, the stored test tokens
    (cls.<m>, mt.<m> (n, D), labels, present), the trained model (or its head only, when the encoders
    are not on disk) and, for the naive baseline, its placeholder tokens (which need the encoders)."""
    folder = Path(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    tokens_file = folder / "test_tokens.safetensors"
    if not tokens_file.is_file():
        raise FileNotFoundError(f"{tokens_file} is missing: train.py stores the test tokens only when they are "
                                "under 50M numbers; re-run with --eval-only on a smaller --limit")
    feats = load_file(str(tokens_file))
    try:
        model, info, args = load_model(folder, metrics["class_names"])
        full = True
    except FileNotFoundError as err:
        print(f"{folder}: the encoders are not on disk ({err}).\n  Scoring from the stored test tokens "
              "with the trained head only.")
        model, info, args = load_head_only(folder, metrics["class_names"])
        full = False
    placeholders = None
    if model.missing == "placeholder" and full:
        tokenizer = train.text_tokenizer(args, info)
        placeholders = train.placeholder_tokens(model, info, tokenizer, torch.device("cpu"))
    key = train.headline(info)
    return SimpleNamespace(folder=folder, metrics=metrics, feats=feats, model=model, info=info, args=args,
                           placeholders=placeholders, full=full, key=key,
                           metric="F1-macro (%)" if info.multilabel else "accuracy (%)")


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
    """One sample's model input for a modality, made by data.py's own preprocessing."""
    if modality == "image":
        return data.clip_image(demo_image(i))                                      # (3, 224, 224)
    if modality == "video":
        return torch.stack([data.clip_image(demo_image(i + t)) for t in range(data.NUM_FRAMES)])
    if modality == "audio":
        t = torch.arange(2 * data.SAMPLE_RATE) / data.SAMPLE_RATE                  # 2 s
        return data.fbank(0.3 * torch.sin(2 * math.pi * 220 * (i + 1) * t), data.SAMPLE_RATE)  # (1024, 128)
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
