"""
Data for U2A: what a user has on disk -> batches of two modalities, some of them missing.

Paper: sections 4.1-4.2 (datasets, preprocessing), 4.4 and supplementary 3 (missing-modality
settings). The file has two parts. First what a reader of U2A needs, in the order the data flows:

  0. stream_seed            one seed for every random stream of a run
  1. registry               DatasetInfo of each dataset (modalities m1/m2, classes, metric), a keyword
                            table; EXPECTED_LAYOUT of each data root
  2. missing modalities     missing_table (exact counts, seeded), save/load, eval_scenarios, a run's
                            test_scenarios, check_missing_settings
  3. datasets               MultimodalDataset, make_dataset (the one entry point)
  4. batches                collate (encoders.batch_inputs, plus labels and skip mode's counts),
                            drop_modalities, make_loader, EpochSampler (each epoch's order, sharded across
                            DDP processes)
  5. synthetic data         the two synthetic designs, their exact Bayes ceiling, SyntheticDataset
  6. reading files          video frames (training's augmentation) and WAVs, into the preprocessing each
                            encoder was pretrained on: encoders.py's clip_image, fbank and load_tokenizer

Then three appendices: the plumbing of the public releases, and the paper's tables:
  A. readers                one per public release -> per-sample sources and labels; files checked at build
  B. preparation            `python data.py prepare {cremad,ks,ave}`: a video release -> frames + WAVs
  C. the paper's tables     its U2A numbers (PAPER_U2A); a run's scores printed and summarized in its rows

A batch is a dict: "image" (B,3,H,W) | "video" (B,3,3,H,W) | "audio" (B,1024,128) |
"input_ids"/"attention_mask" (B,L) long, "present" (B,2) bool (column i = modality m_i present),
"label" (B,) long or (B,C) float multi-hot, "index" (B,) long, "skipped" and "unreadable" () long (skip
mode's counts: samples dropped, files that failed to decode). A missing modality holds the paper's
placeholder (sec. 3: zeros for image/video/audio, the empty string -> [CLS][SEP] for text) and is
never read from disk. The inputs' keys and their placeholders are encoders.batch_inputs's, which
u2a.predict batches through too.

Expected layouts under --data-root (full trees in README.md):
  food101  images/{train,test}/<class>/*.jpg, texts/{train,test}_titles.csv  (UPMC Food-101)
  mmimdb   split.json, dataset/<id>.jpeg, dataset/<id>.json                  (MM-IMDb archive)
  cremad   train.csv, test.csv, AudioWAV/<clip>.wav, Image-01-FPS/<clip>/*.jpg (OGM-GE)
  ks       my_train.txt, my_test.txt, audio/<id>.wav, frames/<id>/*.jpg      (OGM-GE lists; a test clip's
           files may carry the Kinetics name <ytid>_<start:06d>_<end:06d>)
  ave      {train,val,test}Set.txt, audio/<id>.wav (whole video), Image-01-FPS-SE/<id>/*.jpg (event window)
  synthetic  generated in memory, no root.

Design choices (the paper leaves them open):
  - val: mmimdb ("dev"), ave and synthetic have one; for food101/cremad/ks a fixed VAL_SHARE of
    train is carved out with stream_seed(seed, "val_carve") (seed: the data's, default 0, independent of
    the run seed), never from test.
  - on_error="raise" stops at the first missing or unreadable file, naming it. on_error="skip" marks
    the modality absent instead: a file missing at construction with a warning and a count, a file
    that fails to decode (a WAV with NaN/Inf included) counted in its batch's "unreadable". A sample
    with no usable modality left is dropped: at construction with a warning and a count, or by
    collate, counted in the batch's "skipped".
  - training's random frames and crops come from each sample's own seed (set_epoch), so a resume
    or another number of DataLoader workers gives the same inputs.
  - WAVs at another sample rate are resampled to 16 kHz (band-limited windowed sinc, `encoders.resample`).
  - every WAV's, image's and video frame's header is checked when the dataset is built (a git-lfs pointer file is
    named as such): a file that is not an image, a WAV shorter than one 25 ms analysis window, an image of a mode
    we do not read or of an aspect ratio above encoders.MAX_ASPECT_RATIO are named then, not after training.
  - 16-bit and float grey images are read by their range (encoders.FULL_SCALE), not clipped at 255.
  - a split list's entries are plain names: one with a folder part ('../x', '/abs') is refused, naming the line.
  - Food-101's hidden folders (.ipynb_checkpoints) are not classes; an empty class folder is an error.
  - an MM-IMDb movie JSON without a genre list is refused (skip mode: the movie is dropped); one without a plot,
    too (skip mode: its text is marked absent, its image kept).
  - AVE's audio is cut to the event window of the split file, the window its frames come from; a WAV that ends
    before its event does (truncated, or already cut to the event as PMR's extractWav_SE does) is named at build.
  - Food-101's titles CSV is read one record per line, so its one unclosed quote damages only its own title.
  - text is padded to the longest sequence in the batch (not to max_len): same outputs, less work.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from tqdm import tqdm

from encoders import (FRAME_LENGTH, IMAGE_SIZE, NUM_FRAMES, SAMPLE_RATE, SPECIAL_TOKENS, batch_inputs, bert_template,
                      clip_image, fbank, image_problem, is_missing_text, resample_problem, upright_rgb,
                      wordpiece_tokenizer)

# -----------------------------------------------------------------------------
# 0. Seeds: every random stream of a run comes from the run's one seed, here

def stream_seed(seed, stream, *keys):
    """The seed of one random stream of a run: stream_seed(run seed, name, *keys) -> int in [0, 2^63).

    The streams of train.py, each independent of every other: "missing/<split>" (the missing tables),
    "sampler"/epoch (each epoch's order), "modality_dropout"/step, "sample"/epoch/index (random frames and
    crops of one sample: the same whichever DataLoader worker reads it), "lora_dropout"/rank (each DDP
    process draws its own masks), "init" (LoRA and head initialisation, the same on every process),
    "loader"/epoch and "eval_loader" (the DataLoaders' own seeds); and of the data itself (the data's seed,
    not the run's): "val_carve", and "synthetic"/<split or modality> (the synthetic samples of
    SyntheticDataset and the toy encoders' pre-training data of synthetic_unimodal).
    A hash, not `seed + offset`: with offsets, two streams of one run that both draw randperm(n) drew the
    same permutation (epoch 0's order was then sorted by the training missing table), and seed 1's first
    stream was seed 0's second."""
    key = "/".join(str(k) for k in (seed, stream, *keys))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


# -----------------------------------------------------------------------------
# 1. Registry: what each dataset is

IMAGE_TEXT, AUDIO_VIDEO = ("image", "text"), ("audio", "video")
TEXT_MAX_LEN = {"food101": 40, "mmimdb": 256, "synthetic": 16, "synthetic-independent": 16}  # sec. 4.2;
# synthetic: <= 12 words
VAL_SHARE = 0.1  # ~ missing_aware_prompts' 6,846 / 67,988 Food-101 val carve

# The 23 genres of the MM-IMDb paper (Arevalo et al. 2017), most frequent first; other genres are dropped
MMIMDB_GENRES = ["Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
                 "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
                 "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir"]
CREMAD_EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # OGM-GE / PMR label order
FOOD101_NUM_CLASSES = 101
# Kinetics-Sounds: OGM-GE's lists give label ints only. They are the alphabetical index of the 31 class names
# (inferred: 9 of 9 ids checked against Kinetics file names agree, e.g. 16 = playing piano; not published).
KS_CLASSES = ["blowing nose", "blowing out candles", "bowling", "chopping wood", "dribbling basketball",
              "laughing", "mowing lawn", "playing accordion", "playing bagpipes", "playing bass guitar",
              "playing clarinet", "playing drums", "playing guitar", "playing harmonica", "playing keyboard",
              "playing organ", "playing piano", "playing saxophone", "playing trombone", "playing trumpet",
              "playing violin", "playing xylophone", "ripping paper", "shoveling snow", "shuffling cards",
              "singing", "stomping grapes", "tap dancing", "tapping guitar", "tapping pen", "tickling"]
AVE_CLASSES = ["Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
               "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle",
               "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle", "Acoustic guitar",
               "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus", "Chainsaw", "Cat",
               "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin"]
# The synthetic designs' cues: a blob's quadrant and a keyword group (chapter 5 draws them)
SYNTHETIC = ("synthetic", "synthetic-independent")  # generated in memory, no data root
SYNTHETIC_IMAGE_SIZE = 32
QUADRANTS = ["top-left", "top-right", "bottom-left", "bottom-right"]
KEYWORDS = [["sun", "sunny", "bright"], ["moon", "night", "dark"], ["rain", "wet", "storm"],
            ["snow", "cold", "ice"]]
FLIP_CLASSES = ["A", "B"]


def synthetic_class_names(name):
    """The classes of a synthetic design: FLIP_CLASSES for "synthetic", quadrant + keyword (8) for
    "synthetic-independent"."""
    if name == "synthetic":
        return list(FLIP_CLASSES)
    return [f"{QUADRANTS[c // 2]}+{KEYWORDS[c % 4][0]}" for c in range(8)]


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    name: str
    modalities: tuple   # (m1, m2): the order of the columns of `present`
    num_classes: int
    class_names: list
    multilabel: bool    # True -> (C,) multi-hot targets, BCE loss
    metric: str         # "accuracy" or "f1" (F1-macro headline, F1-micro too)
    text_max_len: int | None
    has_val: bool       # False -> "val" is carved from train
    image_size: int = 224  # side of image/video frames (the synthetic toy ViT takes 32)

    @property
    def headline(self):
        """The paper's headline score of this dataset, a key of u2a.scores: F1-macro for MM-IMDb, else accuracy."""
        return "f1_macro" if self.multilabel else "accuracy"


# Every DatasetInfo field but name, num_classes (len(class_names)) and text_max_len (TEXT_MAX_LEN).
# Food-101's class names are its folder names under <root>/images/train: [] here, read by dataset_info.
REGISTRY = {
    "food101": dict(modalities=IMAGE_TEXT, class_names=[], multilabel=False, metric="accuracy", has_val=False),
    "mmimdb": dict(modalities=IMAGE_TEXT, class_names=MMIMDB_GENRES, multilabel=True, metric="f1", has_val=True),
    "cremad": dict(modalities=AUDIO_VIDEO, class_names=CREMAD_EMOTIONS, multilabel=False, metric="accuracy",
                   has_val=False),
    "ks": dict(modalities=AUDIO_VIDEO, class_names=KS_CLASSES, multilabel=False, metric="accuracy", has_val=False),
    "ave": dict(modalities=AUDIO_VIDEO, class_names=AVE_CLASSES, multilabel=False, metric="accuracy", has_val=True),
    "synthetic": dict(modalities=IMAGE_TEXT, class_names=synthetic_class_names("synthetic"), multilabel=False,
                      metric="accuracy", has_val=True, image_size=SYNTHETIC_IMAGE_SIZE),
    "synthetic-independent": dict(modalities=IMAGE_TEXT, class_names=synthetic_class_names("synthetic-independent"),
                                  multilabel=False, metric="accuracy", has_val=True, image_size=SYNTHETIC_IMAGE_SIZE),
}
DATASETS = tuple(REGISTRY)

# What each dataset's --data-root must hold: named by every error about a missing file
EXPECTED_LAYOUT = {
    "food101": "images/{train,test}/<class>/<file>.jpg and texts/{train,test}_titles.csv",
    "mmimdb": "split.json (train/dev/test id lists), dataset/<id>.jpeg and dataset/<id>.json",
    "cremad": "train.csv/test.csv (rows 'clip,EMOTION'), AudioWAV/<clip>.wav, Image-01-FPS/<clip>/*.jpg",
    "ks": "my_train.txt/my_test.txt (rows 'id,10,label'), audio/<id>.wav, frames/<id>/*.jpg (a my_test.txt id "
          "<ytid>_<start> may also be named <ytid>_<start:06d>_<end:06d>, as Kinetics names it)",
    "ave": "trainSet.txt/valSet.txt/testSet.txt (rows 'Category&id&Quality&Start&End'), audio/<id>.wav (the whole "
           "video's audio), Image-01-FPS-SE/<id>/*.jpg (frames of the event window)",
}
# The split lists and clip folders of the audio-video datasets: read by the readers, written by `prepare`
SPLIT_FILES = {"cremad": "{split}.csv", "ks": "my_{split}.txt", "ave": "{split}Set.txt"}
AV_DIRS = {"cremad": ("AudioWAV", "Image-01-FPS"), "ks": ("audio", "frames"), "ave": ("audio", "Image-01-FPS-SE")}


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def dataset_info(name, root=None):
    """The DatasetInfo of `name`. Food-101's class names are its folder names under
    <root>/images/train, alphabetical: without `root` they are unknown ([]) and num_classes is 101."""
    _check_name(name)
    fields = dict(REGISTRY[name])
    if name == "food101" and root is not None:
        fields["class_names"] = _food101_classes(Path(root))
    names = list(fields.pop("class_names"))
    return DatasetInfo(name=name, num_classes=len(names) or FOOD101_NUM_CLASSES, class_names=names,
                       text_max_len=TEXT_MAX_LEN.get(name), **fields)


def _food101_classes(root):
    folder = root / "images" / "train"
    if not folder.is_dir():
        raise FileNotFoundError(f"food101: no class folders at {folder}; expected {EXPECTED_LAYOUT['food101']}")
    # a hidden folder is a tool's (.ipynb_checkpoints, .git), not a class: as class 0 it would shift every label
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"food101: {folder} holds no class folders; expected {EXPECTED_LAYOUT['food101']}")
    empty = [name for name in names if all(f.name.startswith(".") for f in (folder / name).iterdir())]
    if empty:  # a class with no image is a stray folder or a failed copy: either way the class count is wrong
        raise ValueError(f"food101: class folder {folder / empty[0]} is empty ({len(empty)} empty in all): every "
                         f"folder in {folder} is a class; remove it, or copy its images into it")
    return names

# -----------------------------------------------------------------------------
# 2. Missing modalities (sec. 4.4, supp. 3): which samples have which modality

PAPER_MISSING_RATE = 0.7  # eta = 70% throughout the paper
FIGURE2_TEXT_PERCENTS = range(0, 101, 10)


def _round_half_up(x):
    return int(math.floor(round(x, 9) + 0.5))  # Python's round() would send 3.5 and 4.5 both to 4


def missing_table(n, rate, missing_type, seed, modalities):
    """(n, 2) bool present table, column i = modalities[i]. Exactly round(rate * n) samples miss a
    modality: all of them `missing_type`, or for "both" half m1 and half m2, never both (sec. 4.4.1).
    One seeded permutation decides who goes first, so for a fixed seed a smaller rate removes a
    subset of what a larger one removes."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate}")
    if missing_type not in (*modalities, "both"):
        raise ValueError(f"missing type {missing_type!r}: expected one of {modalities} or 'both'")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = _round_half_up(rate * n)
    present = torch.ones(n, 2, dtype=torch.bool)
    if missing_type == "both":
        k1 = _round_half_up(rate * n / 2)
        present[order[:k1], 0] = False
        present[order[k1:k], 1] = False
    else:
        present[order[:k], modalities.index(missing_type)] = False
    return present


def save_missing_table(path, table, **settings):
    """JSON with the settings (rate, type, seed, ...), the counts and one [m1, m2] 0/1 pair a sample."""
    counts = {"complete": int(table.all(1).sum()), "m1_only": int((table[:, 0] & ~table[:, 1]).sum()),
              "m2_only": int((~table[:, 0] & table[:, 1]).sum())}
    with open(path, "w") as f:
        json.dump({**settings, "n": len(table), "counts": counts, "present": table.int().tolist()}, f)


def save_test_tables(folder, scenarios, n, seed):
    """Each test scenario's table for n samples, as <folder>/missing_test/<scenario>.json."""
    (Path(folder) / "missing_test").mkdir(parents=True, exist_ok=True)
    for sc in scenarios:
        name = "".join(c if c.isalnum() else "_" for c in sc.name).strip("_")
        save_missing_table(Path(folder) / "missing_test" / f"{name}.json", sc.table(n, seed), scenario=sc.name,
                           seed=seed)


def load_missing_table(path):
    with open(path) as f:
        content = json.load(f)
    if "present" not in content:
        raise ValueError(f"{path}: expected a JSON object with a 'present' list of [m1, m2] pairs")
    return _check_present(torch.tensor(content["present"], dtype=torch.bool).view(-1, 2), None, path)


def _check_present(present, n, where):
    present = torch.as_tensor(present, dtype=torch.bool)
    if present.dim() != 2 or present.shape[1] != 2 or (n is not None and present.shape[0] != n):
        expected = f"({n if n is not None else 'n'}, 2)"
        raise ValueError(f"{where}: present table must be {expected}, got {tuple(present.shape)}")
    empty = (~present.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{where}: {len(empty)} samples have neither modality (first: {empty[0].item()})")
    return present


@dataclass(frozen=True)
class Scenario:
    """One test-time missing setting. `groups`: the paper's tables/figures it appears in."""
    name: str
    groups: tuple
    rate: float
    missing_type: str
    modalities: tuple
    seed: int = 0

    @property
    def group(self):
        return self.groups[0]

    @property
    def shares(self):
        return present_shares(self.modalities, self.rate, self.missing_type)

    def table(self, n, seed=None):
        """(n, 2) present table for a test set of n samples."""
        return missing_table(n, self.rate, self.missing_type, self.seed if seed is None else seed,
                             self.modalities)


def eval_scenarios(info, train_rate=0.0, train_type=None, seed=0):
    """The paper's test settings, each once, in this order: complete; Table 3 (the training ratio,
    when training had missing data); Table 6 (the three ratios at eta = train_rate, or 70%);
    Table 4 (one modality entirely missing); Figure 2 (m1 100% + m2 x%, x = 0, 10, ..., 100).
    A setting shared by several (e.g. text 30%) carries all their groups."""
    m1, m2 = info.modalities
    train_rate = train_rate or 0.0  # None: training was complete
    if train_rate > 0 and train_type not in (m1, m2, "both"):
        raise ValueError(f"train_type {train_type!r}: expected {m1!r}, {m2!r} or 'both' when train_rate > 0")
    eta = train_rate if train_rate > 0 else PAPER_MISSING_RATE
    wanted = [(0.0, m2, "complete")]
    if train_rate > 0:
        wanted.append((train_rate, train_type, "table3"))
    wanted += [(eta, t, "table6") for t in (m1, "both", m2)]
    wanted += [(1.0, m2, "table4"), (1.0, m1, "table4")]
    wanted += [(round(1 - x / 100, 6), m2, "figure2") for x in FIGURE2_TEXT_PERCENTS]
    scenarios = {}  # (rate, type) -> (name, groups)
    for rate, mtype, group in wanted:
        key = (round(rate, 6), m2 if rate == 0 else mtype)
        name, groups = scenarios.get(key, (_scenario_name(m1, m2, rate, mtype), ()))
        scenarios[key] = (name, groups if group in groups else groups + (group,))
    return [Scenario(name, groups, rate, mtype, info.modalities, seed)
            for (rate, mtype), (name, groups) in scenarios.items()]


def present_shares(modalities, rate, mtype):
    """{modality: % of samples that have it} of a missing setting: what the paper's tables call it by."""
    lost = {m: rate / 2 if mtype == "both" else (rate if mtype == m else 0.0) for m in modalities}
    return {m: round(100 * (1 - lost[m]), 1) for m in modalities}


def _scenario_name(m1, m2, rate, mtype):
    """'image 100% + text 30%', as the paper's tables."""
    return " + ".join(f"{m} {share:g}%" for m, share in present_shares((m1, m2), rate, mtype).items())


def test_setting(settings):
    """A train.py run's test missing setting (rate, type), settings: its config: the --test-missing-* flags,
    each left out taking the training one."""
    rate = settings["test_missing_rate"]
    return (settings["train_missing_rate"] if rate is None else rate,
            settings["test_missing_type"] or settings["train_missing_type"])


def test_scenarios(info, settings):
    """The test scenarios of a train.py run (settings: its config, "seed" included) and the seed their
    tables are drawn with: what its metrics.json scored."""
    seed = stream_seed(settings["seed"], "missing/test")
    return eval_scenarios(info, *test_setting(settings), seed=seed), seed


def check_missing_settings(settings, given=()):
    """A run's missing-modality settings together, before training: a rate needs a type, a type needs a rate,
    and each type is one of the dataset's modalities or 'both'. `given`: the settings the user gave now (a
    saved run's type without a rate is left alone). Raises ValueError naming every flag to fix."""
    modalities = dataset_info(settings["data"]).modalities
    types = f"{', '.join(modalities)} or 'both'"
    problems = [f"--{k.replace('_', '-')} {settings[k]!r}: expected {types} ({settings['data']}'s modalities)"
                for k in ("train_missing_type", "test_missing_type")
                if settings[k] is not None and settings[k] not in (*modalities, "both")]
    test_rate, test_type = test_setting(settings)
    rates = {"train": settings["train_missing_rate"], "test": test_rate}
    kinds = {"train": settings["train_missing_type"], "test": test_type}
    problems += [f"--{split}-missing-rate {rates[split]} needs --{split}-missing-type ({types})"
                 for split in rates if rates[split] and kinds[split] is None
                 and settings[f"{split}_missing_rate"] is not None]  # a test rate left out is train's: one problem
    problems += [f"--{split}-missing-type {settings[f'{split}_missing_type']} without a --{split}-missing-rate: "
                 f"give the rate too (the paper's is {PAPER_MISSING_RATE}), or leave the type out"
                 for split in rates if f"{split}_missing_type" in given and not rates[split]]
    if problems:
        raise ValueError("; ".join(problems))


# -----------------------------------------------------------------------------
# 3. Datasets: one class, filled by a release's reader (appendix A) or the synthetic generator (5)

def _check_on_error(on_error):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


class UnreadableFile(RuntimeError):
    """A file named by the dataset that does not decode, in on_error="raise" mode: the data's to fix (or to
    skip), not a bug; train.py reports it in one line."""


class MultimodalDataset(torch.utils.data.Dataset):
    """sources[m][i]: where sample i's modality m comes from (image path, text string, WAV path,
    frame folder; synthetic: the tensor itself). Item i is a dict: one entry per modality
    (None when absent: never read), "label" (int, or (C,) float multi-hot), "index", "unreadable"
    (how many of its files failed to decode: skip mode marks them absent). In skip mode an item with
    nothing readable left is None, which collate drops and counts."""

    def __init__(self, info, split, sources, labels, available=None, train=False, on_error="raise"):
        _check_on_error(on_error)
        self.info, self.split, self.train, self.on_error = info, split, train, on_error
        self.sources, self.labels = sources, labels  # labels: (n,) long or (n, C) float
        # available: files found at construction; present: available & the missing table (set_present)
        self.available = torch.ones(len(labels), 2, dtype=torch.bool) if available is None else available
        self.present = self.available.clone()
        self.seed, self.epoch = 0, 0  # the run's seed (not make_dataset's data seed): see set_epoch

    def set_epoch(self, epoch, seed):
        """Training's random frames and crops of sample i come from stream_seed(seed, "sample", epoch, i):
        the same whichever DataLoader worker reads it, with any number of workers, and after a resume.
        Call it before iterating a new loader: persistent workers keep the copy they started with."""
        self.epoch, self.seed = epoch, seed

    def set_present(self, present):
        """Apply an (n, 2) missing table (e.g. missing_table(len(ds), ...)); files found missing in
        skip mode stay absent. Returns the dataset: make_dataset(...).set_present(table)."""
        present = _check_present(present, len(self), f"{self.info.name}/{self.split}")
        self.present = present & self.available
        return self

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        # training's random frames and crops: this sample's own stream (set_epoch), not the worker's RNG
        g = torch.Generator().manual_seed(stream_seed(self.seed, "sample", self.epoch, i)) if self.train else None
        wanted = [m for col, m in enumerate(self.info.modalities) if self.present[i, col]]
        item = {m: self.read(m, self.sources[m][i], g) if m in wanted else None for m in self.info.modalities}
        if all(item[m] is None for m in self.info.modalities):  # skip mode only: raise mode raised in read
            return None
        label = self.labels[i]
        return {**item, "label": label if self.info.multilabel else int(label), "index": i,
                "unreadable": sum(item[m] is None for m in wanted)}

    def read(self, modality, source, generator=None):
        """One modality of one sample from disk -> its model input; None when it does not decode in
        skip mode. generator: training's random frames and crops."""
        try:
            if modality == "text":
                return source
            if modality == "image":
                with Image.open(source) as pil:
                    return clip_image(pil)
            if modality == "audio":
                return fbank(*read_audio(source))
            return read_frames(source, generator)
        except (OSError, RuntimeError, ValueError) as err:  # PIL, libsndfile, too-short or NaN audio
            if self.on_error == "raise":
                raise UnreadableFile(f"{self.info.name}: cannot read {modality} {source}: {err} "
                                     f"(on_error='skip' marks it absent instead)") from err
            return None  # counted in the batch's "unreadable"; on_error='raise' names the file

    def __repr__(self):
        m1, m2 = self.info.modalities
        p = self.present.float().mean(0) * 100 if len(self) else torch.zeros(2)
        return (f"{self.info.name}/{self.split}: {len(self)} samples, "
                f"{m1} {p[0]:.0f}% + {m2} {p[1]:.0f}% present")

def _carve_val(n, split, seed):
    """Sorted indices of train's `split` part: a seeded VAL_SHARE goes to val, the rest to train."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, "val_carve")))
    n_val = _round_half_up(VAL_SHARE * n)
    return sorted((order[:n_val] if split == "val" else order[n_val:]).tolist())


def make_dataset(name, root, split, train=False, limit=None, on_error="raise", seed=0):
    """The one entry point. split: train/val/test ("val" of a dataset without one is a seeded
    VAL_SHARE of train, and "train" then excludes it). train: random frames + frame augmentation.
    limit: the first `limit` samples. seed: the data's own seed (synthetic generation, val carve), not
    the run's. Every file found is present until a missing table says otherwise: .set_present(table)."""
    _check_name(name)
    _check_on_error(on_error)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if name in SYNTHETIC:
        return SyntheticDataset(name, split, limit=limit, seed=seed)
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"{name}: data root {root} is not a directory; expected {EXPECTED_LAYOUT[name]}")
    root, info = Path(root), dataset_info(name, root)
    if info.has_val or split == "test":
        sources, labels = READERS[name](root, split, info, on_error)
    else:
        sources, labels = READERS[name](root, "train", info, on_error)
        keep = _carve_val(len(labels), split, seed)
        sources, labels = {m: [s[i] for i in keep] for m, s in sources.items()}, [labels[i] for i in keep]
    if limit is not None:
        sources, labels = {m: s[:limit] for m, s in sources.items()}, labels[:limit]
    sources, labels, available = _check_files(info, split, sources, labels, on_error)
    if not labels:  # a carve too small for one validation sample, or every sample skipped: found before training
        raise ValueError(f"{name}/{split} has no samples (data root {root}, limit {limit}); expected "
                         f"{EXPECTED_LAYOUT[name]}")
    if info.multilabel:  # genre index lists -> (n, C) multi-hot
        targets = torch.zeros(len(labels), info.num_classes)
        for i, genres in enumerate(labels):
            targets[i, genres] = 1.0
        labels = targets
    else:
        labels = torch.tensor(labels, dtype=torch.long)
    return MultimodalDataset(info, split, sources, labels, available, train, on_error)


# -----------------------------------------------------------------------------
# 4. Batches: samples -> the batch dict of the header docstring

def _default_tokenizer(info):
    if "text" not in info.modalities:
        return None
    if info.name not in SYNTHETIC:
        raise ValueError(f"{info.name} has text: pass tokenizer=load_tokenizer(<bert folder>, {info.text_max_len})")
    return synthetic_tokenizer(info.text_max_len)


def collate(samples, info, tokenizer=None):
    """List of dataset items -> batch dict. The inputs go through encoders.batch_inputs: absent modalities
    become placeholders (zeros; "" for text, i.e. [CLS][SEP]; a blank text is absent, is_missing_text);
    "present" records which is which. Text is tokenised once per batch.
    The synthetic dataset brings its own tokenizer when none is given. Skip mode: None items (nothing
    readable) are dropped, so B can be smaller than len(samples), even 0; the batch counts them in
    "skipped" and the kept items' undecodable files in "unreadable" (0-dim long tensors)."""
    tokenizer = tokenizer or _default_tokenizer(info)
    kept = [s for s in samples if s is not None]
    inputs = batch_inputs({m: [s[m] for s in kept] for m in info.modalities}, tokenizer, info.image_size)
    labels = [s["label"] for s in kept]
    if info.multilabel:  # (B, C); torch.stack needs at least one tensor
        label = torch.stack(labels).float() if kept else torch.zeros(0, info.num_classes)
    else:
        label = torch.tensor(labels, dtype=torch.long)                                 # (B,)
    # skip mode's counts, () long: samples dropped, and the kept samples' files that failed to decode
    # (a hand-built item, such as a notebook's demo sample, has no "unreadable")
    return {"present": inputs.pop("present"), "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "label": label, "skipped": torch.tensor(len(samples) - len(kept)),
            "unreadable": torch.tensor(sum(s.get("unreadable", 0) for s in kept)), **inputs}


def drop_modalities(batch, present, info, tokenizer=None):
    """The batch as if only `present` (B, 2) were there (section 3's modality dropout): an input that is no
    longer present holds the paper's placeholder, exactly as collate gives a missing one, so a method that
    encodes placeholders sees a dropped modality as it sees a missing one."""
    gone = batch["present"] & ~present                                  # (B, 2)
    out = dict(batch, present=present)
    if not gone.any():
        return out
    # one sample missing every modality: each input's placeholder, batch size 1
    blank = batch_inputs({m: [None] for m in info.modalities}, tokenizer or _default_tokenizer(info), info.image_size)
    for i, m in enumerate(info.modalities):
        rows = gone[:, i]
        for key in ("input_ids", "attention_mask") if m == "text" else (m,):
            filler = blank[key][0].to(batch[key].device)
            if m == "text":  # [CLS][SEP], padded to the batch's length (padding changes no output)
                filler = torch.nn.functional.pad(filler, (0, batch[key].shape[1] - len(filler)))
            out[key] = batch[key].clone()
            out[key][rows] = filler
    return out


def seed_worker(worker_id):
    """DataLoader seeds torch in each worker from its generator; seed python and numpy from that, for
    any randomness besides the samples' own streams (a transform of your own, say)."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, batch_size, shuffle, tokenizer=None, num_workers=0, seed=0, sampler=None):
    """DataLoader yielding batch dicts (collate, with the dataset's info). Shuffling and the workers' RNGs follow
    `seed`; training's random frames and crops follow the dataset's set_epoch, whatever the workers. A short
    last batch is kept; memory is pinned when there is a GPU to copy to. The synthetic dataset brings its own
    tokenizer when none is given."""
    info = dataset.info
    tokenizer = tokenizer or _default_tokenizer(info)  # fail here, not inside a worker
    if num_workers > 0:  # each worker tokenises its own small batches: the Rust thread pool only contends
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
        collate_fn=functools.partial(collate, info=info, tokenizer=tokenizer), num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)


class EpochSampler(torch.utils.data.Sampler):
    """Epoch e visits a permutation drawn from stream_seed(seed, "sampler", e), cut into n // B global batches
    of B samples (the n % B left over wait for another epoch, a different few each time). Process r of w
    (shard (r, w)) takes every w-th sample of each global batch, so every process has the same n // B steps
    of B / w samples and w processes see exactly the batches of one. `skip` batches are left out at the
    start: a resumed run continues mid-epoch without reading what it already saw."""

    def __init__(self, n, batch_size, seed, epoch, shard=(0, 1), skip=0):
        (rank, world), steps = shard, n // batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, "sampler", epoch)))
        self.indices = order[:steps * batch_size].view(steps, batch_size)[skip:, rank::world].flatten().tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# -----------------------------------------------------------------------------
# 5. The synthetic data: two designs of one joint table of image cue, text cue and class

# Synthetic bimodal data. Every sample shows an image cue a (a blob in one of 4 QUADRANTS) and a text cue b
# (a keyword of one of 4 KEYWORDS groups, both in chapter 1), drawn with its class c from a joint table
# P[a, b, c]. Two designs of that table, each teaching one side of the lesson:
#
# - "synthetic" (the default): the cues are NOT independent given the class. Two classes, A and B; a0 alone
#   and b0 alone each point to A, but the picture a0 with the caption b0 means B (as in hateful memes, where a
#   harmless picture and a harmless caption mean something else together); the mirror holds for a1, b1.
#   Under sum fusion with one linear head, logits = W.CLS_img + W.stand_in + bias: the head must map
#   (a0, b0) to B, so W.CLS_img(a0) leans to B, and with the text missing the stand-in must pull a0 back to
#   A but a1 to B. A constant stand-in (a placeholder's CLS, whatever the training) cannot do both for both
#   modalities; one that reads the present modality (the MT) can. The best any model can do with one
#   modality is bayes_ceiling's 77.7%; the default run prints what each method reaches (README).
# - "synthetic-independent": 8 classes, c shows a = c // 2 and b = c % 4, each cue replaced by another
#   with probability 5%, and within each pair a modality narrows c to, one class 3x as common as the other.
#   The cues are independent given the class, so a constant stand-in plus the head's bias already represents
#   the Bayes rule of each modality alone: modality dropout is all a method needs there, and an MT cannot add.
FLIP_CELLS = {(0, 0, 1): "R", (0, 2, 0): "S", (2, 0, 0): "S",    # (a, b, class): a0 + b0 -> B; alone -> A
              (1, 1, 0): "R", (1, 3, 1): "S", (3, 1, 1): "S"}    # the mirror: a1 + b1 -> A; alone -> B
FLIP_WEIGHTS, FLIP_FLOOR = {"R": 0.1, "S": 0.18}, 0.02           # FLIP_FLOOR of the mass spread on every cell
INDEPENDENT_CLASS_WEIGHTS = (3, 1, 1, 3, 1, 3, 3, 1)  # pairs (2a, 2a+1) and (b, b+4): one common, one rare
INDEPENDENT_NOISE = 0.05                              # a cue shows another value of its kind


def synthetic_joint(name):
    """P[a, b, c]: the joint distribution of image cue, text cue and class of a synthetic design (4, 4, C)."""
    if name == "synthetic":
        joint = torch.zeros(len(QUADRANTS), len(KEYWORDS), 2, dtype=torch.float64)
        for (a, b, c), kind in FLIP_CELLS.items():
            joint[a, b, c] = FLIP_WEIGHTS[kind]
        return (1 - FLIP_FLOOR) * joint / joint.sum() + FLIP_FLOOR / joint.numel()
    if name == "synthetic-independent":
        prior = torch.tensor(INDEPENDENT_CLASS_WEIGHTS, dtype=torch.float64)
        prior = prior / prior.sum()                                                  # (8,)
        classes = torch.arange(len(prior))
        shown = lambda attr: torch.where(torch.arange(4)[:, None] == attr[None, :],  # (4, 8): P(cue | c)
                                         1 - INDEPENDENT_NOISE, INDEPENDENT_NOISE / 3)
        return shown(classes // 2)[:, None, :] * shown(classes % 4)[None, :, :] * prior  # (4, 4, 8)
    raise ValueError(f"{name!r} is not a synthetic dataset: expected one of {', '.join(SYNTHETIC)}")


def bayes_ceiling(name):
    """The best accuracy (%) any model can reach on a synthetic design, exactly, from its joint table:
    {"both": ..., m1: ..., m2: ...}, the key naming the modalities present. Each cue is read off its input
    without error by construction (a blob's quadrant, a keyword's group), so the Bayes rule sees (a, b)."""
    joint = synthetic_joint(name)                              # (4, 4, C) float64
    return {"both": 100 * joint.amax(2).sum().item(),          # argmax_c P(a, b, c) for every (a, b)
            "image": 100 * joint.sum(1).amax(1).sum().item(),  # the text missing: argmax_c P(a, c)
            "text": 100 * joint.sum(0).amax(1).sum().item()}   # the image missing: argmax_c P(b, c)


SYNTHETIC_SIZES = {"train": 2000, "val": 500, "test": 1000}
BLOB_SIGMA, BLOB_JITTER, PIXEL_NOISE = 3.0, 3.0, 0.5  # pixels, pixels, std of the normalised image
FILLERS = ["a", "the", "photo", "of", "this", "shows", "some", "very", "with", "and", "near", "look", "at",
           "my", "old", "new", "small", "big", "one", "scene"]
SYNTHETIC_WORDS = FILLERS + [w for group in KEYWORDS for w in group]
SENTENCE_WORDS = (6, 12)  # min, max words


def synthetic_vocab():
    """BERT vocab.txt order: the specials, then SYNTHETIC_WORDS."""
    return SPECIAL_TOKENS + SYNTHETIC_WORDS


@functools.lru_cache(maxsize=None)
def synthetic_tokenizer(max_len=TEXT_MAX_LEN["synthetic"]):
    """The toy BERT's tokenizer, built in memory (weights/toy/bert/vocab.txt holds the same vocab)."""
    vocab = {w: i for i, w in enumerate(synthetic_vocab())}
    return bert_template(wordpiece_tokenizer(vocab), max_len, source="synthetic_vocab()")


def _generator(seed, stream):
    """The synthetic data's generator: stream is a split ("train", "val", "test") or a modality's
    pre-training data ("image", "text"), each its own keyed stream of the data's seed."""
    return torch.Generator().manual_seed(stream_seed(seed, "synthetic", stream))


def _draw_blobs(quadrant, g):
    """(n,) quadrant ids -> (n, 3, 32, 32) images: a blob of random colour in that quadrant + noise."""
    n, size = len(quadrant), SYNTHETIC_IMAGE_SIZE
    centre = size / 4 + size / 2 * torch.stack([quadrant // 2, quadrant % 2], 1).float()  # (n, 2) row, col
    centre = centre + (torch.rand(n, 2, generator=g) * 2 - 1) * BLOB_JITTER
    grid = torch.arange(size, dtype=torch.float32)
    dy = grid[None, :, None] - centre[:, 0, None, None]                       # (n, 32, 1)
    dx = grid[None, None, :] - centre[:, 1, None, None]                       # (n, 1, 32)
    blob = torch.exp(-(dy ** 2 + dx ** 2) / (2 * BLOB_SIGMA ** 2))            # (n, 32, 32)
    colour = torch.rand(n, 3, generator=g) * 2 + 1                            # (n, 3) in [1, 3]
    noise = torch.randn(n, 3, size, size, generator=g) * PIXEL_NOISE
    return colour[:, :, None, None] * blob[:, None] + noise                   # (n, 3, 32, 32)


def _write_sentences(group, g):
    """(n,) keyword-group ids -> n strings of 6-12 words: filler words and one keyword of the group."""
    n, longest = len(group), SENTENCE_WORDS[1]
    lengths = torch.randint(SENTENCE_WORDS[0], longest + 1, (n,), generator=g)
    fillers = torch.randint(len(FILLERS), (n, longest), generator=g)
    where = (torch.rand(n, generator=g) * lengths).long()                     # keyword position
    which = torch.randint(len(KEYWORDS[0]), (n,), generator=g)
    sentences = []
    for row, length, at, grp, k in zip(fillers.tolist(), lengths.tolist(), where.tolist(), group.tolist(),
                                       which.tolist()):
        words = [FILLERS[j] for j in row[:length]]
        words[at] = KEYWORDS[grp][k]
        sentences.append(" ".join(words))
    return sentences


def synthetic_unimodal(modality, n, seed=0):
    """Unimodal pre-training data for the toy encoders, from its own seed stream: ("image", n) ->
    ((n,3,32,32) images, (n,) quadrant labels); ("text", n) -> (n strings, (n,) keyword-group labels)."""
    if modality not in ("image", "text"):
        raise ValueError(f"synthetic modalities are 'image' and 'text', got {modality!r}")
    g = _generator(seed, modality)
    labels = torch.randint(len(QUADRANTS), (n,), generator=g)
    return (_draw_blobs(labels, g) if modality == "image" else _write_sentences(labels, g)), labels


class SyntheticDataset(MultimodalDataset):
    """Image + text of a synthetic design, generated in memory from the data's `seed` (milliseconds, no
    download): each sample's (a, b, c) drawn from the design's joint table, then a blob and a sentence."""

    def __init__(self, name, split, n=None, limit=None, seed=0):
        n = SYNTHETIC_SIZES[split] if n is None else n
        g = _generator(seed, split)
        joint = synthetic_joint(name)                                          # (4, 4, C)
        cell = torch.multinomial(joint.flatten(), n, replacement=True, generator=g)  # (n,)
        C = joint.shape[2]
        quadrant, group, labels = cell // (len(KEYWORDS) * C), (cell // C) % len(KEYWORDS), cell % C
        images, texts = _draw_blobs(quadrant, g), _write_sentences(group, g)
        n = n if limit is None else min(limit, n)
        super().__init__(dataset_info(name), split, {"image": images[:n], "text": texts[:n]}, labels[:n])

    def read(self, modality, source, generator=None):
        return source  # already the model input


# -----------------------------------------------------------------------------
# 6. Reading files: video frames and WAVs, into the preprocessing each encoder was pretrained on (encoders.py:
#    clip_image, fbank)

# Training-time frame augmentation: the audio-video baselines the paper follows (sec. 4.2, OGM-GE)
# use torchvision's RandomResizedCrop(224) + RandomHorizontalFlip; the image-text setting uses none.
CROP_SCALE, CROP_RATIO, CROP_TRIES, FLIP_PROB = (0.08, 1.0), (3 / 4, 4 / 3), 10, 0.5


def augment_frame(pil, generator):
    """RandomResizedCrop + horizontal flip, every draw from `generator` (the sample's own stream)."""
    pil = upright_rgb(pil)  # drawn on the picture the test read sees (clip_image): upright, 8-bit RGB
    w, h = pil.size
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))  # aspect is log-uniform, as torchvision's
    for _ in range(CROP_TRIES):
        area = w * h * torch.empty(1).uniform_(*CROP_SCALE, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = torch.randint(0, w - cw + 1, (), generator=generator).item()
            top = torch.randint(0, h - ch + 1, (), generator=generator).item()
            break
    else:  # no crop fitted: the largest centred square
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    box = (left, top, left + cw, top + ch)
    pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=box)
    flip = torch.rand((), generator=generator).item() < FLIP_PROB
    return pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else pil


# Video: NUM_FRAMES (3) frames per clip (sec. 4.2), each through the image transform
FRAME_SUFFIXES = (".jpg", ".jpeg")


def frame_indices(num_available, generator=None):
    """NUM_FRAMES indices into a clip's sorted frames: split the clip into NUM_FRAMES equal segments
    and take a random frame of each in training (drawn from `generator`), the middle one in testing
    (generator None: uniform)."""
    offsets = (torch.full((NUM_FRAMES,), 0.5) if generator is None
               else torch.rand(NUM_FRAMES, generator=generator))                 # (NUM_FRAMES,) in [0, 1)
    idx = ((torch.arange(NUM_FRAMES) + offsets) * num_available / NUM_FRAMES).long()
    return idx.clamp(max=num_available - 1).tolist()  # short clips repeat frames


def frame_order(name):
    """Sort key of a frame file: its numbers compared as numbers, so 2.jpg comes before 10.jpg (text order would
    put frame_10 between frame_1 and frame_2 wherever the names are not zero-padded, as ffmpeg's %d writes them)."""
    parts = re.split(r"(\d+)", name)  # text, number, text, ...: the odd places hold the numbers
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name  # name: 01.jpg and 1.jpg, one order


def list_frames(folder):
    """A clip's extracted frames in time order (00001.jpg, frame_00001.jpg, 1.jpg, ...); [] if no folder. A hidden
    file is a tool's, not a frame: macOS writes ._00001.jpg (AppleDouble metadata) beside each file it copies."""
    if not os.path.isdir(folder):
        return []
    names = sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_SUFFIXES) and not f.startswith(".")),
                   key=frame_order)
    return [os.path.join(folder, f) for f in names]


def read_frames(folder, generator=None):
    """A clip's frame folder -> (NUM_FRAMES, 3, 224, 224). With a generator (training): random frames,
    each augmented; without: the middle frames as they are."""
    frame_paths = list_frames(folder)
    if not frame_paths:
        raise FileNotFoundError(f"no {'/'.join(FRAME_SUFFIXES)} frames in {folder}")
    frames = []
    for i in frame_indices(len(frame_paths), generator):
        try:
            with Image.open(frame_paths[i]) as pil:
                frames.append(clip_image(pil if generator is None else augment_frame(pil, generator)))
        except (OSError, ValueError) as err:  # e.g. a frame cut short: say which one, not only the clip's folder
            name = f"frame {os.path.basename(frame_paths[i])}: {err}"
            raise (OSError if isinstance(err, OSError) else ValueError)(name) from err
    return torch.stack(frames)


def read_wav(path):
    """WAV -> (1-D float32 waveform, sample rate); several channels are averaged to mono. A float WAV
    holding NaN or Inf is refused here: its features would be NaN and train the model to NaN."""
    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    if not np.isfinite(samples).all():
        raise ValueError(f"{path} has non-finite samples (NaN or Inf)")
    return torch.from_numpy(samples.mean(axis=1)), rate


class AudioWindow(NamedTuple):
    """The seconds [start, end) of a WAV. AVE's audio/<id>.wav holds the whole video's audio (what an ffmpeg
    extraction gives); its event window, from the split file, is cut here, as PMR's preprocessing does."""
    path: str
    start: float
    end: float


def read_audio(source):
    """A WAV path, or an AudioWindow -> (1-D float32 waveform, sample rate) of that file or window."""
    if not isinstance(source, AudioWindow):
        return read_wav(source)
    waveform, rate = read_wav(source.path)
    return waveform[round(source.start * rate):round(source.end * rate)], rate


# =============================================================================
# Appendix A. The public releases: their readers and the checks of the files they name.
# Nothing above needs this to be read first: make_dataset calls READERS.
# -----------------------------------------------------------------------------
# A. Readers: one per public release, each -> (sources, labels); then the files they name are checked
#
# Every split list is read as "utf-8-sig": UTF-8 whose byte-order mark, if a Windows tool wrote one, would
# otherwise stick to the first row's first field. CRLF and LF endings both work. A list with no row is an
# error, not an empty split.
LIST_ENCODING = "utf-8-sig"


def _need_file(path, name):
    if not path.is_file():
        raise FileNotFoundError(f"{name}: split file {path} not found; expected {EXPECTED_LAYOUT[name]}")
    return path


def _list_lines(path, errors="strict"):
    """(line number, text without surrounding blanks) of each non-blank line of a split list."""
    with open(path, encoding=LIST_ENCODING, errors=errors) as f:
        return [(number, text.strip()) for number, text in enumerate(f, start=1) if text.strip()]


def _plain_name(entry, where):
    """A split list's entry names a file or folder in the data root: with a folder part ('../x', '/abs')
    it would read files outside it (an absolute path even replaces the root), so it is refused."""
    if entry in ("", ".", "..") or "/" in entry or "\\" in entry:
        raise ValueError(f"{where}: {entry!r} is not a plain name: a split list names files in the data root, "
                         f"without '/', '\\' or '..'")
    return entry


def _not_empty(rows, path, name):
    if not rows:
        raise ValueError(f"{name}: split file {path} has no rows; expected {EXPECTED_LAYOUT[name]}")
    return rows


def food101_row(text):
    """One line of a titles CSV -> (image file, title, class, quote_closed). The file has one record per line,
    so it is split at its first and last comma rather than by a CSV reader: the release's title of
    breakfast_burrito_730.jpg opens a quote it never closes, and a CSV reader then swallows the next ~16
    lines into that title. Here a broken quote damages only its own title (kept, its stray quote dropped)."""
    file, rest = text.split(",", 1)  # ValueError if a line has no comma
    title, cls = rest.rsplit(",", 1)
    if len(title) >= 2 and title[0] == title[-1] == '"':  # CSV quoting: "a, b" and "" for a quote inside
        return file, title[1:-1].replace('""', '"'), cls, True
    return file, title.removeprefix('"'), cls, not title.startswith('"')


def _read_food101(root, split, info, on_error):
    """images/<split>/<class>/<file> + texts/<split>_titles.csv rows (file, title, class)."""
    csv_path = _need_file(root / "texts" / f"{split}_titles.csv", "food101")
    image_dir = root / "images" / split
    folders = {p.name for p in image_dir.iterdir() if p.is_dir()} if image_dir.is_dir() else set()
    label_of = {c: k for k, c in enumerate(info.class_names)}
    sources, labels, notes, broken = {"image": [], "text": []}, [], [], []
    for line, text in _list_lines(csv_path, errors="replace"):  # web titles: stray bytes
        if line == 1 and not text.split(",", 1)[0].lower().endswith((".jpg", ".jpeg", ".png")):
            notes.append(f"header row {text[:40]!r} skipped")  # some copies carry "filename,text,label"
            continue
        try:
            file, title, cls, closed = food101_row(text)
        except ValueError:
            raise ValueError(f"{csv_path}:{line}: expected 'image file,title,class', got {text!r}") from None
        _plain_name(file, f"{csv_path}:{line}")  # the class is one of the folders: plain already
        if cls not in folders or cls not in label_of:  # classes are images/train's folders
            missing = image_dir / cls if cls not in folders else root / "images" / "train" / cls
            raise ValueError(f"{csv_path}:{line}: class {cls!r} has no folder {missing}")
        if not closed:
            broken.append(line)
        sources["image"].append(str(image_dir / cls / file))
        sources["text"].append(title)
        labels.append(label_of[cls])
    _not_empty(labels, csv_path, "food101")
    if broken:
        notes.append(f"{len(broken)} title(s) open a quote they never close (line {', '.join(map(str, broken[:3]))}"
                     f"{', ...' if len(broken) > 3 else ''}): kept, one record per line")
    print(f"food101: {csv_path.name}: {len(labels)} rows, {len(set(labels))} classes"
          + "".join(f"; {note}" for note in notes))
    return sources, labels


def _is_list_of_str(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_mmimdb(root, split, info, on_error):
    """split.json {train, dev, test: [ids]}; dataset/<id>.json has 'plot' (list) and 'genres'. A movie whose
    JSON is missing, broken or has no genre list (its label) is dropped in skip mode; one without a plot
    keeps its image, its text marked absent. Raise mode names the file."""
    split_path = _need_file(root / "split.json", "mmimdb")
    key = {"train": "train", "val": "dev", "test": "test"}[split]
    expected = 'expected a JSON object whose "train", "dev" and "test" are lists of movie ids'
    try:
        with open(split_path, encoding=LIST_ENCODING) as f:
            ids = json.load(f)[key]
    except (ValueError, KeyError, TypeError) as err:  # not JSON, no such key, not an object
        raise ValueError(f"mmimdb: cannot read the {key!r} list of {split_path} ({type(err).__name__}: {err}); "
                         f"{expected}") from None
    if not isinstance(ids, list):  # a string would be read one character per movie
        raise ValueError(f"mmimdb: {split_path} holds {key!r} as a {type(ids).__name__}, not a list; {expected}")
    ids = _not_empty(ids, split_path, "mmimdb")
    sources, labels, dropped, no_plot = {"image": [], "text": []}, [], [], []
    for position, movie in enumerate(map(str, ids), start=1):
        _plain_name(movie, f'{split_path}: "{key}" entry {position}')
        meta_path = root / "dataset" / f"{movie}.json"
        try:
            with open(meta_path, encoding=LIST_ENCODING) as f:  # JSON is UTF-8, whatever the locale's encoding
                meta = json.load(f)
        except (OSError, ValueError) as err:  # the labels live in this file: no file, no sample
            if on_error == "raise":
                raise FileNotFoundError(f"mmimdb: cannot read {meta_path} ({err}); "
                                        f"expected {EXPECTED_LAYOUT['mmimdb']}")
            dropped.append(meta_path)
            continue
        genres = meta.get("genres") if isinstance(meta, dict) else None
        if not _is_list_of_str(genres):  # "Drama" or no key: an all-zero label would train "no genre"
            if on_error == "raise":
                raise ValueError(f'mmimdb: {meta_path}: "genres" is {genres!r}, not a list of genre names '
                                 f"(on_error='skip' drops the movie)")
            dropped.append(meta_path)
            continue
        plot = meta.get("plot")  # a list of summaries, of which MMBT keeps the longest; a string is one summary
        text = max(plot, key=len) if _is_list_of_str(plot) and plot else plot if isinstance(plot, str) else None
        if not text:
            if on_error == "raise":
                raise ValueError(f'mmimdb: {meta_path}: "plot" is {plot!r}, not a list of summaries '
                                 f"(on_error='skip' marks the movie's text absent)")
            no_plot.append(meta_path)
        sources["text"].append(text or None)  # None: no text
        sources["image"].append(str(root / "dataset" / f"{movie}.jpeg"))
        labels.append([MMIMDB_GENRES.index(g) for g in genres if g in MMIMDB_GENRES])
    if dropped:
        warnings.warn(f"mmimdb/{split}: dropped {len(dropped)} of {len(ids)} movies whose JSON is missing, broken "
                      f"or has no genre list (e.g. {dropped[0]})")
    if no_plot:
        warnings.warn(f"mmimdb/{split}: {len(no_plot)} of {len(ids)} movies have no plot (e.g. {no_plot[0]}): "
                      f"their text is marked absent")
    return sources, labels


class ListRow(NamedTuple):
    """One row of an audio-video split list: the clip's name, its label, and (AVE) the event's seconds."""
    clip: str
    label: int
    window: tuple | None = None  # (start, end)


def split_file(root, name, split):
    return _need_file(Path(root) / SPLIT_FILES[name].format(split=split), name)


def cremad_rows(path):
    """OGM-GE train.csv/test.csv rows 'clip,EMOTION' (no header, CRLF)."""
    rows = []
    for line, text in _list_lines(path):
        row = text.split(",")
        if len(row) != 2 or row[1] not in CREMAD_EMOTIONS:
            raise ValueError(f"{path}:{line}: expected 'clip,EMOTION' with EMOTION in {CREMAD_EMOTIONS}, got {row}")
        rows.append(ListRow(_plain_name(row[0], f"{path}:{line}"), CREMAD_EMOTIONS.index(row[1])))
    return _not_empty(rows, path, "cremad")


def ks_rows(path):
    """OGM-GE my_train.txt rows '<ytid>_<start6>_<end6>,10,<label>', my_test.txt rows '<ytid>_<start>,10,<label>'
    (CRLF)."""
    rows = []
    for line, text in _list_lines(path):
        row = text.split(",")
        if len(row) != 3 or not row[2].isdigit() or int(row[2]) >= len(KS_CLASSES):
            raise ValueError(f"{path}:{line}: expected 'id,10,label' with label in 0..{len(KS_CLASSES) - 1}, "
                             f"got {row}")
        rows.append(ListRow(_plain_name(row[0], f"{path}:{line}"), int(row[2])))
    return _not_empty(rows, path, "ks")


# my_test.txt names a clip <ytid>_<start seconds> (all 2,597 rows: an 11-character YouTube id and an integer);
# the Kinetics files a user has are named <ytid>_<start:06d>_<end:06d>, and a Kinetics clip is 10 s long.
KS_SHORT_ID = re.compile(r"([\w-]{11})_(\d+)")
KS_CLIP_SECONDS = 10


def ks_names(clip):
    """The names a KS clip's files may have: the list's id, then (for a <ytid>_<start> id) the Kinetics name."""
    short = KS_SHORT_ID.fullmatch(clip)
    if not short:
        return [clip]
    start = int(short[2])
    return [clip, f"{short[1]}_{start:06d}_{start + KS_CLIP_SECONDS:06d}"]


def ave_rows(path):
    """AVE {train,val,test}Set.txt rows 'Category&VideoID&Quality&StartTime&EndTime'. A video listed twice (27
    train ids, each with two different categories; one val id) keeps its first row, as PMR keeps one sample per
    id (OGM-GE keeps the last). Returns (rows, number of duplicate rows dropped)."""
    rows, seen, dropped = [], set(), 0
    for line, text in _list_lines(path):
        row = text.split("&")
        if row[0] == "Category":  # the header some copies carry
            continue
        if len(row) != 5 or row[0] not in AVE_CLASSES or not (row[3].isdigit() and row[4].isdigit()) \
                or int(row[3]) >= int(row[4]):
            raise ValueError(f"{path}:{line}: expected 'Category&VideoID&Quality&Start&End' with a known AVE "
                             f"category and whole seconds Start < End, got {row}")
        if row[1] in seen:
            dropped += 1
            continue
        seen.add(_plain_name(row[1], f"{path}:{line}"))
        rows.append(ListRow(row[1], AVE_CLASSES.index(row[0]), (int(row[3]), int(row[4]))))
    return _not_empty(rows, path, "ave"), dropped


def _audio_video(root, name, rows):
    """List rows -> (sources, labels): audio/<clip>.wav (cut to the row's window, if any) and frames/<clip>/."""
    audio_dir, frame_dir = (root / d for d in AV_DIRS[name])
    audio = [str(audio_dir / f"{r.clip}.wav") for r in rows]
    audio = [AudioWindow(a, *r.window) if r.window else a for a, r in zip(audio, rows)]
    return {"audio": audio, "video": [str(frame_dir / r.clip) for r in rows]}, [r.label for r in rows]


def _read_cremad(root, split, info, on_error):
    return _audio_video(root, "cremad", cremad_rows(split_file(root, "cremad", split)))


def _read_ks(root, split, info, on_error):
    """A clip's files go by the list's id or, for my_test.txt's <ytid>_<start> ids, by the Kinetics name."""
    audio_dir, frame_dir = (root / d for d in AV_DIRS["ks"])

    def on_disk(clip):  # the first name under which the clip has a file; the list's id if none
        return next((n for n in ks_names(clip) if (audio_dir / f"{n}.wav").is_file() or (frame_dir / n).is_dir()),
                    clip)
    rows = ks_rows(split_file(root, "ks", split))
    return _audio_video(root, "ks", [r._replace(clip=on_disk(r.clip)) for r in rows])


def _read_ave(root, split, info, on_error):
    """One sample per video (its first row); frames from the event window, audio cut to it (AudioWindow)."""
    path = split_file(root, "ave", split)
    rows, dropped = ave_rows(path)
    print(f"ave: {path.name}: {len(rows)} videos, {len(set(r.label for r in rows))} classes"
          + (f"; {dropped} later row(s) of a video listed twice skipped (each video keeps its first row)"
             if dropped else ""))
    return _audio_video(root, "ave", rows)


READERS = {"food101": _read_food101, "mmimdb": _read_mmimdb, "cremad": _read_cremad, "ks": _read_ks,
           "ave": _read_ave}


# Checked when a dataset is built, cheaply (a header, not the samples): a file that cannot be used is
# named then, not mid-training. Downloading CREMA-D's repository without git-lfs leaves ~130-byte text
# files starting with this line in place of every WAV and FLV: they exist, but hold no audio.
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
LFS_HINT = ("the release was downloaded without git-lfs, which leaves pointer files (~130 bytes of text) in place "
            "of the media: fetch the real files with `git lfs install && git lfs pull` inside the clone")


def is_lfs_pointer(path):
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER)) == LFS_POINTER


EVENT_END_SLACK = 1.0  # seconds a whole-video WAV may end before its event does (a 10 s video's audio: 9.98 s)


def samples_at_16k(frames, rate, source):
    """How many samples fbank gets from a WAV of `frames` samples at `rate`: after an AudioWindow's cut (as
    read_audio) and resampling to 16 kHz (as resample)."""
    if isinstance(source, AudioWindow):
        frames = max(0, min(frames, round(source.end * rate)) - round(source.start * rate))
    return math.ceil(frames * SAMPLE_RATE / rate)


def _image_file_problem(path):
    """Why an image file (or a video frame) cannot be used ("git-lfs pointer", "bad header: ...", "unusable: ..."),
    or None. Its header only: the pixels are decoded when the sample is read."""
    if is_lfs_pointer(path):
        return "git-lfs pointer"
    try:
        with Image.open(path) as pil:
            unusable = image_problem(pil)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError: an OSError
        return f"bad header: {err}"
    return f"unusable: {unusable}" if unusable else None


def _problem(modality, source):
    """Why a sample's `modality` cannot be used ("missing", "git-lfs pointer", "bad header: ...",
    "too short: ...", "unusable: ..."), or None. Headers only: nothing is decoded."""
    if modality == "text":
        return "missing" if is_missing_text(source) else None
    if modality == "video":  # every frame is an image: one that is not would stop the run when its clip is read
        frames = list_frames(source)
        return next(filter(None, map(_image_file_problem, frames)), None) if frames else "missing"
    path = source.path if isinstance(source, AudioWindow) else source
    if not os.path.isfile(path):
        return "missing"
    if modality == "image":
        return _image_file_problem(path)
    if is_lfs_pointer(path):
        return "git-lfs pointer"
    try:
        header = sf.info(path)
    except RuntimeError as err:  # soundfile.LibsndfileError
        return f"bad header: {getattr(err, 'error_string', err)}"
    unusable = resample_problem(header.samplerate)  # a rate whose resampling filter would take gigabytes
    if unusable:
        return f"unusable: {unusable}"
    # A clip shorter than one analysis window has no feature frame. Refused (skip mode: marked absent), not
    # padded: a few ms of sound is a failed extraction far more often than a sample, and padded with silence
    # it would pass for a present audio that holds nothing.
    n = samples_at_16k(header.frames, header.samplerate, source)
    if n < FRAME_LENGTH:
        return f"too short: {n} samples at 16 kHz"
    # AVE's window is cut from the whole video's audio. A WAV that ends well before its event does is a truncated
    # extraction, or one already cut to the event (PMR's extractWav_SE): cut again, it would give the wrong seconds.
    if isinstance(source, AudioWindow) and header.frames < (source.end - EVENT_END_SLACK) * header.samplerate:
        seconds = header.frames / header.samplerate
        return f"ends early: {seconds:.2f} s, the event is seconds {source.start}-{source.end}"
    return None


def _check_files(info, split, sources, labels, on_error):
    """Every referenced file exists, and every WAV and image has a readable header (no decoding) that says it
    can be used (a WAV long enough, an image of a supported mode and shape). Unusable ones raise,
    or in skip mode mark the modality absent; a sample left with nothing is dropped. All announced with counts."""
    n = len(labels)
    problems = [[_problem(m, sources[m][i]) for m in info.modalities] for i in range(n)]
    available = torch.tensor([[p is None for p in row] for row in problems], dtype=torch.bool).view(n, 2)
    for col, m in enumerate(info.modalities):
        bad = (~available[:, col]).nonzero().flatten().tolist()
        kinds = {}  # "missing" / "git-lfs pointer" / "bad header" -> sample indices
        for i in bad:
            kinds.setdefault(problems[i][col].split(":")[0], []).append(i)
        for kind, idx in kinds.items():
            other = info.modalities[1 - col]  # a text has no file: its sample is named by the other modality's
            example = sources[m][idx[0]] if m != "text" else f"sample {idx[0]}, with {other} {sources[other][idx[0]]}"
            detail = problems[idx[0]][col].removeprefix(kind).removeprefix(": ")  # the example's own problem
            message = f"{info.name}/{split}: {len(idx)} of {n} "
            if kind == "missing":
                message += f"samples lack their {m} (e.g. {example}); expected {EXPECTED_LAYOUT[info.name]}"
            elif kind == "git-lfs pointer":
                message += f"{m} files are git-lfs pointer files, not {m} (e.g. {example}): {LFS_HINT}"
            elif kind == "too short":
                message += (f"{m} files are shorter than one {FRAME_LENGTH}-sample window (25 ms at 16 kHz), "
                            f"the least a feature frame needs (e.g. {example}: {detail})")
            elif kind == "ends early":
                message += (f"{m} files end before their event does (e.g. {example}: {detail}): audio/<id>.wav must "
                            f"hold the whole video's audio, which the event window is cut from; a WAV already cut to "
                            f"its event (PMR's extractWav_SE) would be cut twice. Extract each video's whole audio "
                            f"track (`python data.py prepare ave` does)")
            elif kind == "bad header":
                header = "WAV" if m == "audio" else "image"
                message += f"{m} files have no readable {header} header (e.g. {example}: {detail})"
            else:
                message += f"{m} files cannot be used (e.g. {example}: {detail})"
            if on_error == "raise":
                error = FileNotFoundError if kind == "missing" else ValueError
                raise error(message + " (on_error='skip' marks them absent)")
            warnings.warn(message + ": marked absent")
    keep = available.any(1)
    if not keep.all():
        warnings.warn(f"{info.name}/{split}: dropped {int((~keep).sum())} of {n} samples with no usable "
                      f"modality")
        idx = keep.nonzero().flatten().tolist()
        sources = {m: [s[i] for i in idx] for m, s in sources.items()}
        labels, available = [labels[i] for i in idx], available[keep]
    return sources, labels, available


# =============================================================================
# Appendix B. Preparation: a video release -> the layout above, in one command
#
#     python data.py prepare {cremad,ks,ave} --source RAW --root OUT [--workers N]
#
# CREMA-D, Kinetics-Sounds and AVE are published as videos. The peers' scripts (OGM-GE, PMR) extract frames at
# 1 fps with OpenCV (cv2.imwrite's default JPEG quality, 95; files {count:05d}.jpg from 00000) and audio with
# ffmpeg (-acodec pcm_s16le -ar 16000). We do the same with PyAV, whose wheels carry FFmpeg: an optional
# dependency of this step only. The steps, in the order the data flows: find each listed clip's files under
# RAW -> frames at 1 fps -> audio at 16 kHz -> rename into place -> summary.

PREPARE_DATASETS = ("cremad", "ks", "ave")
JPEG_QUALITY = 95
VIDEO_SUFFIXES = (".flv", ".mp4", ".mkv", ".webm", ".avi")
PART = ".part"        # the name a clip's audio and frames have until both are whole
TIME_EPS = 1e-3       # seconds: a frame stamped 0.9999 s starts second 1
LIST_SOURCES = {"cremad": "GeWu-Lab/OGM-GE data/CREMAD/", "ks": "GeWu-Lab/OGM-GE data/KineticSound/",
                "ave": "the AVE release (AVE_Dataset/)"}
SHOWN_ERRORS = 5


def import_av():
    try:
        import av
    except ImportError:
        raise ImportError("preparing videos needs PyAV, an optional dependency of this step only: "
                          "`pip install av` (its wheels carry FFmpeg; no system ffmpeg needed)") from None
    return av


@dataclass(frozen=True)
class Clip:
    """One clip to prepare: its name in OUT, the release's files it comes from, and the seconds [start, end)
    whose frames are kept (AVE: the event window; its audio is kept whole, the reader cuts it)."""
    name: str
    video: str
    audio: str        # CREMA-D: the release's own WAV; otherwise the video's audio track
    start: float = 0.0
    end: float = math.inf


def index_release(source, skip):
    """{file name: [paths]} of every file under `source`, recursively, sorted; `skip` (OUT) is not entered. The
    name's suffix is lower-cased (X.MP4 is found as X.mp4), its stem not: YouTube ids differ by case alone."""
    found = {}
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if Path(folder, d).resolve() != skip)
        for f in sorted(files):
            stem, suffix = os.path.splitext(f)
            found.setdefault(stem + suffix.lower(), []).append(Path(folder, f))
    return found


def find_split_lists(name, splits, files, root):
    """{list file name: its one path under RAW, or None when only OUT holds it (a rerun)}, every list found
    before anything is written."""
    found = {}
    for split in splits:
        file = SPLIT_FILES[name].format(split=split)
        paths = [p for p in files.get(file, []) if p.resolve() != root / file]  # OUT may lie in RAW, or be it
        if len(paths) > 1:
            raise ValueError(f"{name}: several {file} under the source ({', '.join(map(str, paths))}): keep one")
        if not paths and not (root / file).is_file():
            raise FileNotFoundError(f"{name}: no split list {file} under the source or in {root}: it comes from "
                                    f"{LIST_SOURCES[name]}; put it in the source folder")
        found[file] = paths[0] if paths else None
    return found


def find_clips(name, splits, files, root):
    """The clips of the split lists (in OUT), each once, with their release files; and the list ids with no video.
    AVE reads test, val, train in that order: a video also listed in train under another event keeps the test/val
    event's window, so every evaluation sample's frames and audio show its own event."""
    read_rows = {"cremad": cremad_rows, "ks": ks_rows, "ave": lambda path: ave_rows(path)[0]}[name]
    clips, no_video, seen = [], [], set()
    for split in splits:
        for row in read_rows(split_file(root, name, split)):
            if row.clip in seen:
                continue
            seen.add(row.clip)
            names = ks_names(row.clip) if name == "ks" else [row.clip]  # KS test clips: the Kinetics name
            videos = [files[n + s][0] for n in names for s in VIDEO_SUFFIXES if n + s in files]
            if not videos:
                no_video.append(row.clip)
                continue
            wav = files.get(f"{row.clip}.wav") if name == "cremad" else None
            clips.append(Clip(row.clip, str(videos[0]), str(wav[0] if wav else videos[0]), *(row.window or ())))
    return clips, no_video


def write_frames(video, folder, start=0.0, end=math.inf):
    """The first frame of each second in [start, end) -> folder/00000.jpg, 00001.jpg, ...; returns how many.
    Time counts from the stream's start (an FLV's first frame is stamped 50 ms, not 0)."""
    av = import_av()
    folder.mkdir(parents=True)
    count, next_second = 0, start
    with av.open(str(video)) as container:
        if not container.streams.video:  # an audio-only file: this clip fails, not the whole run (IndexError)
            raise ValueError(f"{video} has no video track")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first = stream.start_time or 0
        for frame in container.decode(stream):
            if frame.pts is None:  # no timestamp: no second to put it in
                continue
            t = float((frame.pts - first) * stream.time_base)
            if t >= end:
                break
            if t + TIME_EPS >= next_second:
                frame.to_image().save(folder / f"{count:05d}.jpg", quality=JPEG_QUALITY)
                count += 1
                next_second = math.floor(t + TIME_EPS) + 1
    if count == 0:
        raise ValueError(f"no video frame in seconds [{start}, {end}) of {video}")
    return count


def write_audio(source, path):
    """A file's first audio track -> 16 kHz mono 16-bit PCM WAV (libswresample: ffmpeg's -ar 16000 -ac 1)."""
    av = import_av()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    with av.open(str(source)) as container:
        if not container.streams.audio:
            raise ValueError(f"{source} has no audio track")
        for frame in container.decode(container.streams.audio[0]):
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]  # (1, n) int16 each
    chunks += [f.to_ndarray() for f in resampler.resample(None)]  # what the resampler still holds
    if not chunks:
        raise ValueError(f"the audio track of {source} is empty")
    sf.write(path, np.concatenate(chunks, axis=1)[0], SAMPLE_RATE, subtype="PCM_16", format="WAV")


def prepare_clip(clip, name, root):
    """One clip -> <audio dir>/<name>.wav and <frame dir>/<name>/. Both are written under PART names and renamed
    into place, the frames last: a clip whose WAV and frame folder both exist is whole, any other is redone.
    Returns "done", "skipped" (already prepared) or the error that stopped it."""
    av = import_av()
    audio_dir, frame_dir = (root / d for d in AV_DIRS[name])
    wav, frames = audio_dir / f"{clip.name}.wav", frame_dir / clip.name
    if frames.is_dir() and wav.is_file():
        return "skipped"
    part_wav, part_frames = wav.with_name(wav.name + PART), frames.with_name(frames.name + PART)
    shutil.rmtree(part_frames, ignore_errors=True)  # left by an interrupted run
    try:
        for file in dict.fromkeys((clip.video, clip.audio)):
            if is_lfs_pointer(file):
                raise ValueError(f"{file} is a git-lfs pointer file: {LFS_HINT}")
        audio_dir.mkdir(parents=True, exist_ok=True)
        write_audio(clip.audio, part_wav)
        write_frames(clip.video, part_frames, clip.start, clip.end)
        # frames left without their WAV (the audio folder removed, say) are no whole clip: removed first (os.replace
        # cannot put a folder over one that is not empty), so that an interruption never leaves half of them
        # beside a WAV, which a rerun would take for whole
        shutil.rmtree(frames, ignore_errors=True)
        os.replace(part_wav, wav)
        os.replace(part_frames, frames)
    except (av.FFmpegError, OSError, ValueError) as err:  # a corrupt or odd file fails this clip, not the run
        part_wav.unlink(missing_ok=True)
        shutil.rmtree(part_frames, ignore_errors=True)
        return f"{clip.name}: {type(err).__name__}: {err}"
    return "done"


def prepare(name, source, root, workers=1):
    """Turn a video release (`source`: its folder as downloaded, with the split lists somewhere inside) into the
    layout make_dataset reads (`root`), over `workers` processes. Resumable: clips already whole are skipped.
    Returns the summary it prints: {"done", "skipped": counts, "failed": [errors], "no_video": [list ids]}."""
    if name not in PREPARE_DATASETS:
        raise ValueError(f"prepare: {name!r} is not a video release; expected one of {', '.join(PREPARE_DATASETS)}")
    import_av()  # before any work: the install hint, not a traceback per clip
    source, root = Path(source).expanduser().resolve(), Path(root).expanduser().resolve()  # bash leaves `--root=~/x`
    if not source.is_dir():
        raise FileNotFoundError(f"{name}: source {source} is not a directory (the release as downloaded)")
    splits = ("test", "val", "train") if dataset_info(name).has_val else ("test", "train")
    files = index_release(source, skip=root)
    lists = find_split_lists(name, splits, files, root)
    root.mkdir(parents=True, exist_ok=True)  # only now: a release without its lists leaves no OUT behind
    for file, path in lists.items():  # copied to OUT, where the readers look for them
        if path is not None:
            shutil.copyfile(path, root / file)
    clips, no_video = find_clips(name, splits, files, root)
    work = functools.partial(prepare_clip, name=name, root=root)
    results = []
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        done = pool.imap_unordered(work, clips, chunksize=4) if pool else map(work, clips)
        for result in tqdm(done, total=len(clips), desc=f"prepare {name}", unit="clip"):
            results.append(result)
    summary = {"done": results.count("done"), "skipped": results.count("skipped"),
               "failed": sorted(r for r in results if r not in ("done", "skipped")), "no_video": no_video}
    print(f"prepare {name}: {len(clips) + len(no_video)} clips in the lists -> {root}\n"
          f"  done {summary['done']}, skipped {summary['skipped']} (already prepared), "
          f"failed {len(summary['failed'])}, no video {len(no_video)}")
    for error in summary["failed"][:SHOWN_ERRORS]:
        print(f"  failed: {error}")
    if no_video:
        print(f"  no video under {source} for: {', '.join(no_video[:SHOWN_ERRORS])}"
              f"{', ...' if len(no_video) > SHOWN_ERRORS else ''}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python data.py", description="Dataset preparation for u2a.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="a video release -> 1 fps JPEG frames + 16 kHz WAVs (needs PyAV)")
    p.add_argument("name", choices=PREPARE_DATASETS)
    p.add_argument("--source", required=True, help="the release as downloaded, with its split lists inside")
    p.add_argument("--root", required=True, help="the folder to write: what --data-root then points at")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: one per core)")
    args = parser.parse_args(argv)
    try:
        return prepare(args.name, args.source, args.root, args.workers)
    except (ImportError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")


# -----------------------------------------------------------------------------
# Appendix C. The paper's tables: its U2A numbers, and a run's scores in the same rows (train.py prints them
# after each run; summary_report makes the summary over seeds, beside the paper's numbers)
# -----------------------------------------------------------------------------

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


def paper_result(name, trained, tested):
    """(value, SD, table) of the paper's U2A on dataset `name`, trained and tested with the present shares
    `trained` and `tested` ({modality: %}, present_shares), or None where the paper reports none."""
    modalities = dataset_info(name).modalities
    return PAPER_U2A.get((name, *(tuple(shares[m] for m in modalities) for shares in (trained, tested))))


def print_tables(results, info, train_setting, title):
    """One run's results (u2a.evaluate_scenarios) as the paper's tables: Table 4 (a whole modality missing),
    Tables 3 and 6 (missing ratios), Figure 2. train_setting: the training (rate, type)."""
    key, (m1, m2) = info.headline, info.modalities
    label = "F1-macro / F1-micro" if info.multilabel else "accuracy (%)"
    fmt = lambda r: f"{r['f1_macro']:6.2f} / {r['f1_micro']:6.2f}" if info.multilabel else f"{r['accuracy']:6.2f}"
    group = lambda g: [(name, r) for name, r in results.items() if g in r["groups"]]
    rate, kind = train_setting
    training = f"{kind} missing {100 * rate:g}%" if rate else "complete"
    print(f"\n== {title}: {info.name}, {label} ==\nTable 4 (training: {training}; one modality missing at test)")
    print(f"  {'available':<16}{'missing':<12}{label}")
    for _, r in group("complete") + group("table4"):
        avail = [m for m in (m1, m2) if r["shares"][m] > 0]
        print(f"  {' + '.join(avail):<16}{', '.join(m for m in (m1, m2) if m not in avail) or '-':<12}{fmt(r)}")
    print(f"Tables 3 and 6 (training: {training}; test:)")
    for name, r in group("table3") + [x for x in group("table6") if "table3" not in x[1]["groups"]]:
        print(f"  {name:<28}{fmt(r)}")
    sweep = sorted((r for _, r in group("figure2")), key=lambda r: r["shares"][m2])
    print(f"Figure 2 ({m1} 100% + {m2} x%):  " + "  ".join(f"{r['shares'][m2]:g}%:{r[key]:.1f}" for r in sweep))


def summarize(runs, info, trained):
    """{method: {scenario: {"mean", "sd", "n", "paper"}}} of the headline metric over the runs' seeds (runs:
    {(seed, method): metrics.json}, methods in the order they came; trained: the training's present shares).
    sd is the sample SD (n - 1), and None for one run: one run measures no spread."""
    key, summary = info.headline, {}
    for method in dict.fromkeys(method for _, method in runs):
        per_seed = [metrics["scenarios"] for (_, m), metrics in runs.items() if m == method]
        summary[method] = {}
        for name, result in per_seed[0].items():
            values = [scenarios[name][key] for scenarios in per_seed if name in scenarios]
            paper = paper_result(info.name, trained, result["shares"])
            summary[method][name] = {"mean": statistics.mean(values), "n": len(values), "paper": paper and paper[0],
                                     "sd": statistics.stdev(values) if len(values) > 1 else None}
    return summary


def lesson_table(summary, shares, info):
    """The lesson in one table: each method's mean test score with both modalities, then with each one alone
    (shares: {scenario: % of each modality present}), and a synthetic design's Bayes ceiling."""
    m1, m2 = info.modalities
    columns = {f"{m1} + {m2}": {m1: 100, m2: 100}, f"{m1} only": {m1: 100, m2: 0}, f"{m2} only": {m1: 0, m2: 100}}
    scenario = {column: next(name for name, s in shares.items() if s == want) for column, want in columns.items()}
    lines = [f"{'':22}" + "".join(f"{c:>16}" for c in columns)]
    for method, results in summary.items():
        lines.append(f"{method:22}" + "".join(f"{results[scenario[c]]['mean']:>16.1f}" for c in columns))
    if info.name in SYNTHETIC:
        ceiling = bayes_ceiling(info.name)
        lines.append(f"{'Bayes ceiling':22}" + "".join(f"{ceiling[k]:>16.1f}" for k in ("both", m1, m2)))
    return "\n".join(lines)


def setting_notes(info, counts, limit, changed):
    """What a reader must know before comparing a row with the paper. counts: {split: samples loaded};
    changed: the run's settings other than the paper's (Table 5, eq. 6, section 3), as flags."""
    if info.name in SYNTHETIC:
        return ["synthetic data and toy encoders: a demonstration of the paper's lesson, not one of its experiments "
                "(no paper number applies); the Bayes ceiling is the best any model can reach on this design "
                "(data.bayes_ceiling)"]
    notes = ["the paper column is the paper's U2A, to compare with the u2a column (the other methods are this "
             "code's ablations); the paper gives Tables 3 and 6 as mean ± SD of 3 seeds, Tables 1, 2 and 4 as single "
             "numbers, and does not say how its model was picked; ours is the best validation epoch, never test"]
    if info.multilabel:
        notes.append("the headline is F1-macro, as Tables 3 and 6; metrics.json also has F1-micro (Table 1: 69.23)")
    if not info.has_val:
        notes.append(f"validation is a fixed, seeded {VAL_SHARE:.0%} carved from train (the paper names no "
                     f"validation split for {info.name}): the model trains on {100 - 100 * VAL_SHARE:.0f}% of "
                     f"the paper's training set")
    loaded = " / ".join(f"{counts[s]:,}" if s in counts else "?" for s in ("train", "val", "test"))
    notes.append(f"samples loaded (train / val / test): {loaded}; the paper's: {PAPER_SAMPLES[info.name]}"
                 + (f" (--limit {limit})" if limit else ""))
    return notes + (["settings other than the paper's: " + ", ".join(changed)] if changed else [])


def summary_markdown(summary, shares, info, trained, seeds, notes):
    """summary.md: one row per test scenario (shares: {name: % of each modality present}), each method's
    mean ± SD (n) beside the paper's U2A number (and a synthetic design's Bayes ceiling), then `notes`:
    where this setting differs from the paper's."""
    m1, m2 = info.modalities
    ceiling = bayes_ceiling(info.name) if info.name in SYNTHETIC else None
    cell = lambda s: f"{s['mean']:.2f} ± {s['sd']:.2f} (n={s['n']})" if s["sd"] is not None else f"{s['mean']:.2f} (n=1)"
    lines = [f"# {info.name}: test {info.headline} (%), mean ± sample SD (n) over "
             f"seeds {' '.join(map(str, seeds))}", "",
             "Trained on " + " + ".join(f"{m} {share:g}%" for m, share in trained.items()) + "; each row a test "
             "scenario (the % of test samples that have each modality).", "",
             "| test scenario | " + " | ".join(summary) + " | paper: U2A |" + (" Bayes ceiling |" if ceiling else ""),
             "| --- |" + " ---: |" * (len(summary) + 1 + bool(ceiling))]
    for name, share in shares.items():
        paper = paper_result(info.name, trained, share)
        row = [name] + [cell(summary[m][name]) if name in summary[m] else "-" for m in summary]
        row.append("-" if paper is None else
                   f"{paper[0]:.2f}" + (f" ± {paper[1]:.2f}" if paper[1] else "") + f" (Table {paper[2]})")
        if ceiling:  # the scenario's samples are complete, m1 only or m2 only in its shares' proportions
            s1, s2 = share[m1] / 100, share[m2] / 100
            row.append(f"{(s1 + s2 - 1) * ceiling['both'] + (1 - s2) * ceiling[m1] + (1 - s1) * ceiling[m2]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + ["", "Where this setting differs from the paper's:"] + [f"- {n}" for n in notes]) + "\n"


def summary_report(runs, info, train_setting, notes):
    """The summary over seeds of runs {(seed, method): metrics.json}, with the lesson table printed first.
    train_setting: the training's (missing rate, type); notes: setting_notes. -> (summary: summarize's, for
    summary.json; summary_markdown's text, for summary.md)."""
    trained = present_shares(info.modalities, *train_setting)
    summary, seeds = summarize(runs, info, trained), sorted({seed for seed, _ in runs})
    shares = {name: r["shares"] for metrics in runs.values() for name, r in metrics["scenarios"].items()}
    print(lesson_table(summary, shares, info))
    return summary, summary_markdown(summary, shares, info, trained, seeds, notes)


if __name__ == "__main__":
    main()
