"""Toy pretrained encoders for the synthetic dataset: a tiny ViT and a tiny BERT with real learned weights.

    python weights/make_toy.py                  # rebuild weights/toy/ (~10 s on a 2-core CPU)
    python weights/make_toy.py --dest DIR       # somewhere else

Why: `python train.py` with no arguments trains U2A on the synthetic dataset (data.py) on a laptop CPU in a
few minutes. The paper's encoders (CLIP ViT-B/16, BERT-base: ~1 GB, weights/download.py) are far too big for
that, and random encoders would not be "pretrained": U2A freezes its encoders and adapts them with rank-1
LoRA only, so it relies on features that already say something about each modality. These toy encoders are
the same `ViT`/`BERT` classes, 2 layers of width 64, each pre-trained on its own modality alone:
  - ViT  (32x32 images, 8x8 patches): which quadrant holds the blob    (synthetic_unimodal("image"))
  - BERT (synthetic vocabulary):      which keyword group the sentence names (synthetic_unimodal("text"))
with a temporary linear head on the class-token output, which is thrown away afterwards. That mirrors the
real setting in miniature: unimodal pretraining, then U2A learns the multimodal task on top.
The pre-training data comes from synthetic_unimodal's own seed streams, never from the bimodal
train/val/test sets.

What gets written, in the published layouts that `ViT.from_pretrained` / `BERT.from_pretrained` read for
the real checkpoints (and transformers reads too):
    DIR/vit/   model.safetensors (vision_model.* keys, as CLIP's file), config.json (a CLIPVisionConfig)
    DIR/bert/  model.safetensors (BertModel keys, no prefix, as MiniLM), config.json (a BertConfig with
               cls_token_id), vocab.txt (synthetic_vocab(), one token a line)
    DIR/README.md   what these are and the unimodal accuracies reached
Seeded, deterministic and single-threaded: the same machine writes the same files every time.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python weights/make_toy.py` imports the project's modules from the repo root
    sys.path.insert(0, ROOT)

from data import (KEYWORDS, QUADRANTS, SYNTHETIC_IMAGE_SIZE, TEXT_MAX_LEN, synthetic_tokenizer, synthetic_unimodal,
                  synthetic_vocab)
from encoders import BERT, LAYOUTS, BERTConfig, ViT, ViTConfig

TOY_DIR = os.path.join(ROOT, "weights", "toy")
FILES = ("vit/model.safetensors", "vit/config.json", "bert/model.safetensors", "bert/config.json",
         "bert/vocab.txt")

# -----------------------------------------------------------------------------
# The two toy encoders: the paper's architectures, shrunk

WIDTH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def toy_vit_config():
    return ViTConfig(image_size=SYNTHETIC_IMAGE_SIZE, patch_size=8, **WIDTH)  # 16 patches + class token


def toy_bert_config():
    vocab = synthetic_vocab()
    # 2 x the synthetic text length: room to spare, and still a tiny table
    return BERTConfig(vocab_size=len(vocab), max_position_embeddings=2 * TEXT_MAX_LEN["synthetic"],
                      cls_token_id=vocab.index("[CLS]"), **WIDTH)


def vit_features(vit, images):
    """(B, 3, 32, 32) -> (B, D): the class-token output after post_layernorm, as CLIP pools it."""
    return vit.final_norm(vit.encode(vit.embed(images))[:, 0])


def bert_features(bert, input_ids, attention_mask):
    """(B, L) ids and mask -> (B, D): the [CLS] output."""
    return bert.encode(bert.embed(input_ids), attention_mask.bool())[:, 0]


def unimodal_data(modality, n, seed):
    """synthetic_unimodal as model inputs: (tuple of (n, ...) tensors, (n,) labels)."""
    x, labels = synthetic_unimodal(modality, n, seed)
    if modality == "image":
        return (x,), labels
    enc = synthetic_tokenizer().encode_batch(x)  # [CLS] ... [SEP], padded to the longest sentence
    ids = torch.tensor([e.ids for e in enc])                        # (n, L)
    mask = torch.tensor([e.attention_mask for e in enc])            # (n, L)
    return (ids, mask), labels


# -----------------------------------------------------------------------------
# Unimodal pre-training: encoder + a temporary linear head, cross-entropy, AdamW


@dataclass
class PretrainConfig:
    n_train: int = 4000      # fresh samples of synthetic_unimodal(seed=TRAIN_SEED)
    n_eval: int = 1000       # held out (seed=EVAL_SEED): the accuracy reported in the README
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0            # model init and batch order


TRAIN_SEED, EVAL_SEED = 0, 1  # seeds of synthetic_unimodal; the bimodal sets draw other streams (data._generator)


def pretrain(encoder, features, modality, num_classes, cfg):
    """Train `encoder` (all its parameters) with a throw-away linear head; returns held-out accuracy."""
    torch.manual_seed(cfg.seed)
    encoder.train().requires_grad_(True)  # built fresh from its config: every weight learns here
    head = nn.Linear(encoder.config.hidden_size, num_classes)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    inputs, labels = unimodal_data(modality, cfg.n_train, TRAIN_SEED)
    order = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(cfg.n_train, generator=order)
        for i in range(0, cfg.n_train, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits = head(features(encoder, *(x[idx] for x in inputs)))  # (B, classes)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"  {modality} epoch {epoch + 1}/{cfg.epochs}: last batch loss {loss.item():.3f}")
    encoder.eval().requires_grad_(False)
    inputs, labels = unimodal_data(modality, cfg.n_eval, EVAL_SEED)
    with torch.no_grad():
        accuracy = (head(features(encoder, *inputs)).argmax(1) == labels).float().mean().item()
    return accuracy


# -----------------------------------------------------------------------------
# Saving in the published layouts: our parameter names -> the hub's key names
#
# The renames of encoders.LAYOUTS (hub name -> ours) run backwards, each replacing the first occurrence, in
# reverse order. save() checks the result by reading the file back with from_pretrained.

READ_ONLY = (".gamma", ".beta")  # bert-base-uncased's TensorFlow LayerNorm spellings: read, never written


def to_hub_renames(model_cls):
    """encoders.LAYOUTS[model_cls]'s renames inverted: (our name piece, hub name piece), in reverse order."""
    return [(new, old) for old, new in reversed(LAYOUTS[model_cls]["renames"]) if old not in READ_ONLY]


# transformers' model_type and class, so that its from_pretrained reads the folders as well
HUB_CONFIG = {ViT: ("clip_vision_model", "CLIPVisionModel"), BERT: ("bert", "BertModel")}


def hub_state_dict(model, prefix=""):
    renames = to_hub_renames(type(model))
    state = {}
    for name, p in model.named_parameters():
        for old, new in renames:
            name = name.replace(old, new, 1)
        state[prefix + name] = p.detach().float().contiguous()
    return state


def save(model, folder, prefix="", extra_config=None):
    os.makedirs(folder, exist_ok=True)
    model_type, architecture = HUB_CONFIG[type(model)]
    config = {"model_type": model_type, "architectures": [architecture], **asdict(model.config),
              **(extra_config or {})}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    file = os.path.join(folder, "model.safetensors")
    save_file(hub_state_dict(model, prefix), file + ".part", metadata={"format": "pt"})
    os.replace(file + ".part", file)  # an interrupted run never leaves a half-written model.safetensors
    reloaded = type(model).from_pretrained(folder)  # the real loader: every key placed, every shape right
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), f"{file}: {name} did not survive the round trip through from_pretrained"


# -----------------------------------------------------------------------------
# Build everything


README = """# Toy encoders (NOT the paper's)

Tiny `ViT` and `BERT` ({layers} layers, width {width}) pre-trained on synthetic unimodal data by
`weights/make_toy.py`, for the synthetic default of `python train.py` on a CPU. Held-out unimodal accuracy:
ViT {vit:.1%} (blob quadrant, {quadrants} classes), BERT {bert:.1%} (keyword group, {groups} classes).
Rebuilt by `{command}` (~10 s on a 2-core CPU).
They are NOT CLIP ViT-B/16 and BERT-base: the paper's results need those (`python weights/download.py`).
"""


def make_toy(dest=TOY_DIR, cfg=None):
    """Pre-train both toy encoders and write them under `dest` (`~`: the home folder, as the shell would have
    read it); returns {"vit": acc, "bert": acc}."""
    dest, cfg = os.path.expanduser(dest), cfg or PretrainConfig()
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)  # cheap on CPU: same files every run
    # One thread: these matrices are tiny, so more threads only add synchronisation (2 threads took 2-10x
    # longer on a busy 2-core machine), and the sums no longer depend on the machine's core count.
    torch.set_num_threads(1)
    try:
        return _make_toy(dest, cfg)
    finally:  # a caller in the same process (the tests) gets its settings back
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _make_toy(dest, cfg):
    start = time.time()
    accuracy = {}

    print("pre-training the toy ViT on synthetic images (blob quadrant)")
    torch.manual_seed(cfg.seed)
    vit = ViT(toy_vit_config())
    accuracy["vit"] = pretrain(vit, vit_features, "image", len(QUADRANTS), cfg)
    save(vit, os.path.join(dest, "vit"), prefix="vision_model.")  # as in a full CLIP file

    print("pre-training the toy BERT on synthetic sentences (keyword group)")
    torch.manual_seed(cfg.seed)
    bert = BERT(toy_bert_config())
    accuracy["bert"] = pretrain(bert, bert_features, "text", len(KEYWORDS), cfg)
    save(bert, os.path.join(dest, "bert"), extra_config={"pad_token_id": synthetic_vocab().index("[PAD]")})
    with open(os.path.join(dest, "bert", "vocab.txt"), "w") as f:  # what encoders.load_tokenizer reads
        f.write("\n".join(synthetic_vocab()) + "\n")

    seconds = time.time() - start
    command = "python weights/make_toy.py" + ("" if os.path.abspath(dest) == TOY_DIR else f" --dest {dest}")
    with open(os.path.join(dest, "README.md"), "w") as f:
        f.write(README.format(**accuracy, command=command, layers=WIDTH["num_hidden_layers"],
                              width=WIDTH["hidden_size"], quadrants=len(QUADRANTS), groups=len(KEYWORDS)))
    print(f"wrote {dest}: unimodal accuracy ViT {accuracy['vit']:.1%}, BERT {accuracy['bert']:.1%} ({seconds:.0f} s)")
    return accuracy


def main():
    parser = argparse.ArgumentParser(description="Pre-train the toy ViT and BERT of the synthetic default.")
    parser.add_argument("--dest", default=TOY_DIR, help="output folder (default: weights/toy next to this file)")
    make_toy(parser.parse_args().dest)


if __name__ == "__main__":
    main()
