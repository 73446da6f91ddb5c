"""
Random-weight checkpoints in the published hub layouts, built by transformers (tests and benchmarks only).

No real CLIP or AST weights are reachable offline, so transformers builds each model from a config, every
parameter is perturbed (transformers initialises LayerNorms to 1/0 and AST's tokens to zeros, which would let
a swapped norm or token go unnoticed), and the model is saved exactly as the hub repositories store it:
  - save_clip: a whole CLIPModel (vision_model.*, text_model.*, visual_projection, text_projection,
    logit_scale, plus the old position_ids buffers), like openai/clip-vit-base-patch16;
  - save_bert: a BertForPreTraining file (bert.* with LayerNorm gamma/beta, cls.* heads), like bert-base-uncased;
  - save_ast: an ASTForAudioClassification file (audio_spectrogram_transformer.* + classifier.*), like
    MIT/ast-finetuned-audioset-10-10-0.4593. transformers 5 writes the hub's ViT-style names
    (encoder.layer.N.attention.attention.query, ...) even though its live modules are named differently.
Each writes model.safetensors + config.json into a directory and returns the directory.
`full=True` uses the real checkpoints' sizes; the default is a small model that runs in milliseconds.
save_run_encoders fills a --weights folder for train.py: all three, small, in the downloader's folders;
save_published_encoders does the same at the real sizes (tests/gpu_check.py).
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from a local config: never download

import torch
import transformers
from safetensors.torch import load_file, save_file

transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar for every checkpoint

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TOY_CLS_TOKEN_ID = 5  # the small BERT's [CLS] id: not 101, so a test sees that config.json sets it
PERTURB_STD = 0.02


def clip_config(full=False):
    vision = dict(image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    if full:  # openai/clip-vit-base-patch16; CLIPVisionConfig's own defaults are base-patch32's
        vision.update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        return transformers.CLIPConfig(vision_config=vision, projection_dim=512)  # text tower: CLIP's defaults
    vision.update(SMALL, image_size=64)
    text = dict(SMALL, vocab_size=128, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=32)


def bert_config(full=False):
    if full:  # bert-base-uncased: transformers' defaults
        return transformers.BertConfig()
    return transformers.BertConfig(**SMALL, vocab_size=128, max_position_embeddings=32)


def ast_config(full=False):
    sizes = {} if full else dict(SMALL, hidden_size=32, intermediate_size=64)  # full: transformers' defaults
    return transformers.ASTConfig(**sizes, num_labels=527 if full else 5)


def random_model(model_cls, config, seed):
    """transformers' own init, then every parameter perturbed; seeded, without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * PERTURB_STD)
    return model


def save_clip(directory, full=False, seed=0):
    model = random_model(transformers.CLIPModel, clip_config(full), seed)
    model.save_pretrained(directory)
    # Older CLIP files also store the constant position_ids buffers; loaders must skip them.
    file = os.path.join(directory, "model.safetensors")
    state = load_file(file)
    for tower in ("vision_model", "text_model"):
        n = state[f"{tower}.embeddings.position_embedding.weight"].shape[0]
        state[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]  # (1, n)
    save_file(state, file, metadata={"format": "pt"})
    return directory


def save_bert(directory, full=False, seed=0):
    model = random_model(transformers.BertForPreTraining, bert_config(full), seed)
    model.save_pretrained(directory)
    # transformers 5 writes LayerNorm.weight/bias; bert-base-uncased's file has the TensorFlow names.
    file = os.path.join(directory, "model.safetensors")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in load_file(file).items()}
    save_file(state, file, metadata={"format": "pt"})
    config_file = os.path.join(directory, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["cls_token_id"] = 101 if full else TOY_CLS_TOKEN_ID  # read by encoders.BERTConfig
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    return directory


def save_ast(directory, full=False, seed=0):
    random_model(transformers.ASTForAudioClassification, ast_config(full), seed).save_pretrained(directory)
    return directory


def save_run_encoders(weights, folders, words):
    """A --weights folder for train.py on a real dataset: `folders` is u2a.ENCODER_FOLDERS["paper"], `words` the
    vocabulary after bert-base-uncased's special tokens. Small random encoders, saved by transformers, with
    the real input sizes that data.py produces: a whole CLIP at 224 x 224 (patch 32 keeps it fast), a
    BertModel with its vocab.txt, and an AST on 1024 frames x 128 mel bins."""
    weights = os.fspath(weights)
    width = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text_tower = dict(width, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    clip = random_model(transformers.CLIPModel, transformers.CLIPConfig(
        vision_config=dict(width, image_size=224, patch_size=32), text_config=text_tower, projection_dim=16), 0)
    clip.save_pretrained(os.path.join(weights, folders["image"]))  # the whole CLIP: vision_model.*, text_model.*
    vocab = bert_base_vocab(words)
    bert = random_model(transformers.BertModel,
                        transformers.BertConfig(vocab_size=len(vocab), max_position_embeddings=300, **width), 1)
    folder = os.path.join(weights, folders["text"])
    bert.save_pretrained(folder)
    write_vocab(folder, vocab)
    save_ast(os.path.join(weights, folders["audio"]), seed=2)  # ast_config: 1024 x 128 input, as encoders.fbank
    return weights


def save_published_encoders(weights, folders, words):
    """save_run_encoders at the real sizes: CLIP ViT-B/16, bert-base-uncased and AST exactly as save_clip,
    save_bert and save_ast write them (the hub's files), bert's vocab.txt filled to its 30522 entries."""
    weights = os.fspath(weights)
    save_clip(os.path.join(weights, folders["image"]), full=True)
    folder = save_bert(os.path.join(weights, folders["text"]), full=True, seed=1)
    vocab = bert_base_vocab(words)
    size = bert_config(full=True).vocab_size
    write_vocab(folder, vocab + [f"[unused{i}]" for i in range(99, 99 + size - len(vocab))])
    save_ast(os.path.join(weights, folders["audio"]), full=True, seed=2)
    return weights


def bert_base_vocab(words):
    """bert-base-uncased's vocabulary layout: [PAD] 0, [unused] 1-99, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, then `words`."""
    return ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)


def write_vocab(folder, vocab):
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
