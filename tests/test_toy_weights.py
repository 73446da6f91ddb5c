"""The toy encoders shipped in weights/toy/ (built by weights/make_toy.py) for the synthetic default of train.py.

They must load exactly as the real checkpoints do, and they must be pretrained rather than random: on fresh
synthetic data, the class means of their frozen class-token features separate the unimodal attribute (blob
quadrant, keyword group) far better than those of a randomly initialised encoder of the same config.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads local folders only

import pytest
import torch
from safetensors import safe_open

from data import synthetic_tokenizer, synthetic_unimodal, synthetic_vocab
from encoders import BERT, ViT, load_tokenizer
from weights.make_toy import (FILES, TOY_DIR, PretrainConfig, bert_features, hub_state_dict, make_toy as build,
                              toy_bert_config, toy_vit_config, unimodal_data, vit_features)

VIT_DIR, BERT_DIR = os.path.join(TOY_DIR, "vit"), os.path.join(TOY_DIR, "bert")
PROBE_SEED = 2         # neither make_toy's training seed (0) nor its evaluation seed (1)
PROBE_N = 800          # half fits the probe, half scores it
PRETRAINED_MIN = 0.9   # make_toy reaches ~99-100% with its trained head; class means reach ~100% too
GAP_MIN = 0.3          # toy minus random-encoder probe accuracy (measured: ~0.75 image, ~0.5 text)
TINY = PretrainConfig(n_train=128, n_eval=64, epochs=1, batch_size=64)  # seconds: checks plumbing, not quality


@pytest.fixture(scope="module")
def toy():
    return {"image": ViT.from_pretrained(VIT_DIR), "text": BERT.from_pretrained(BERT_DIR)}


def test_shipped_files_are_there():
    missing = [f for f in FILES if not os.path.isfile(os.path.join(TOY_DIR, f))]
    assert not missing, f"weights/toy lacks {missing}: run python weights/make_toy.py"


def test_toy_weights_load_as_real_checkpoints(toy):
    vit, bert = toy["image"], toy["text"]
    assert vit.config == toy_vit_config()  # config.json beside the weights set the small sizes
    assert bert.config == toy_bert_config()
    assert bert.config.cls_token_id == synthetic_vocab().index("[CLS]")
    for model in (vit, bert):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 1 + 16, 64)


def test_vocab_is_the_synthetic_vocab():
    with open(os.path.join(BERT_DIR, "vocab.txt")) as f:
        assert f.read().splitlines() == synthetic_vocab()
    texts, _ = synthetic_unimodal("text", 8, PROBE_SEED)
    ours = [e.ids for e in load_tokenizer(BERT_DIR, 16).encode_batch(texts)]
    assert ours == [e.ids for e in synthetic_tokenizer(16).encode_batch(texts)]


def probe_accuracy(encoder, features, modality):
    """Nearest-class-mean probe on frozen class-token features: class means from one half, score the other.

    Not a least-squares linear probe: a random BERT's [CLS] output is close to a bag of random word embeddings,
    from which a linear map on 64 dimensions already reads the keyword group (~95%). Class means ask whether the
    classes form separate clusters, which is what pre-training adds (random encoders: ~20-50%)."""
    inputs, labels = unimodal_data(modality, PROBE_N, PROBE_SEED)
    with torch.no_grad():
        x = features(encoder, *inputs)                                    # (n, D)
    half = PROBE_N // 2
    means = torch.stack([x[:half][labels[:half] == k].mean(0) for k in range(int(labels.max()) + 1)])  # (classes, D)
    return (torch.cdist(x[half:], means).argmin(1) == labels[half:]).float().mean().item()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_features_are_pretrained_not_random(toy, modality):
    model_cls, config, features = {"image": (ViT, toy_vit_config(), vit_features),
                                   "text": (BERT, toy_bert_config(), bert_features)}[modality]
    pretrained = probe_accuracy(toy[modality], features, modality)
    torch.manual_seed(0)
    random = probe_accuracy(model_cls(config).eval(), features, modality)
    assert pretrained >= PRETRAINED_MIN, f"{modality}: probe on the toy encoder reaches only {pretrained:.1%}"
    assert pretrained - random >= GAP_MIN, f"{modality}: toy {pretrained:.1%} vs random encoder {random:.1%}"


def test_transformers_reads_the_same_folders(toy):
    """The files are in the published layouts: transformers finds every weight and computes the same outputs."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    clip, info = transformers.CLIPVisionModel.from_pretrained(VIT_DIR, output_loading_info=True,
                                                              attn_implementation="eager")
    assert not any(info.values())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(toy["image"](x), clip(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0)
    ref, info = transformers.BertModel.from_pretrained(BERT_DIR, output_loading_info=True, add_pooling_layer=False,
                                                       attn_implementation="eager")
    assert not any(info.values())
    enc = synthetic_tokenizer().encode_batch(["the sun shows", "a photo of snow near my old scene"])
    ids, mask = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        ours, theirs = toy["text"](ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)  # real tokens only


def test_make_toy_writes_loadable_folders_deterministically(tmp_path):
    build(str(tmp_path / "a"), TINY)
    build(str(tmp_path / "b"), TINY)
    for f in FILES:
        a, b = (tmp_path / d / f for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), f"{f} differs between two identical runs"
    assert "NOT the paper's" in (tmp_path / "a" / "README.md").read_text()
    ViT.from_pretrained(str(tmp_path / "a" / "vit"))
    BERT.from_pretrained(str(tmp_path / "a" / "bert"))


def test_a_tilde_in_dest_is_the_home_folder(tmp_path, monkeypatch):
    """`--dest=~/toy` reaches the script unexpanded (bash expands `--dest ~/toy` only): not a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    build("~/toy", TINY)
    assert (tmp_path / "home" / "toy" / "vit" / "model.safetensors").is_file() and not (tmp_path / "~").exists()


def test_make_toy_writes_the_shipped_key_names(toy):
    """make_toy's renames (encoders.LAYOUTS run backwards) give exactly the keys of the shipped files."""
    for model, folder, prefix in ((toy["image"], VIT_DIR, "vision_model."), (toy["text"], BERT_DIR, "")):
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
            assert set(hub_state_dict(model, prefix)) == set(f.keys())
