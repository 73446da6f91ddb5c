"""U2A itself (paper section 3): token selection (eq. 4), loss (eq. 6-7), skipping missing encoders,
video frames, parameter counts, modality dropout, and that it learns."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import encoders
from encoders import AST, ASTConfig, BERT, BERTConfig, ViT, ViTConfig
from lora import LoRALinear
import u2a
from u2a import U2A, U2AConfig, U2AOutput, alignment_loss, modality_dropout, predict, u2a_loss
from weights import make_toy

D = 32
TINY = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_vit():
    return ViT(ViTConfig(image_size=32, patch_size=8, **TINY))


def tiny_bert():
    return BERT(BERTConfig(vocab_size=100, max_position_embeddings=32, cls_token_id=2, **TINY))


def in_memory(encoders, num_classes, **settings):
    """A U2A on encoders built in memory (no folder to load them from)."""
    config = U2AConfig(encoders={m: "in memory" for m in encoders}, class_names=[f"c{i}" for i in range(num_classes)],
                       **settings)
    return U2A(config, encoders)


def tiny_model(num_classes=5, method="u2a", dropout=0.0):
    torch.manual_seed(0)
    model = in_memory({"image": tiny_vit(), "text": tiny_bert()}, num_classes, method=method, lora_dropout=dropout)
    # A fresh adapter is the pretrained model; give the LoRA factors values so they matter in the tests.
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.1)
    return model.eval()


def mask_tokens_apart(model):
    """tiny_model's MTs start as copies of its CLS tokens (mt_init="cls"), and an MT, with no position of its own,
    then reads just what its CLS reads: its output equals the CLS output, and a CLS used in an MT's place would
    not show. Moves each MT off its CLS, as training does. Returns the model."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for branch in model.branches.values():
            branch.mt.add_(torch.randn(branch.mt.shape, generator=g))
    return model


def tiny_batch(B=6, L=7, seed=1, present=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (B, L), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0  # one padded text
    if present is None:
        present = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0], [0, 1]], dtype=torch.bool)[:B]
    return {
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "present": present,
        "label": torch.randint(0, 5, (B,), generator=g),
    }


# -----------------------------------------------------------------------------
# eq. 4: token selection

def test_token_selection_all_three_cases():
    model = tiny_model()
    B = 3
    cls = {"image": torch.randn(B, D), "text": torch.randn(B, D)}
    mt = {"image": torch.randn(B, D), "text": torch.randn(B, D)}
    present = torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    t1, t2 = model.select_tokens(cls, mt, present)
    # both present -> (CLS_1, CLS_2)
    assert torch.equal(t1[0], cls["image"][0]) and torch.equal(t2[0], cls["text"][0])
    # m1 (image) missing -> (MT_2, CLS_2)
    assert torch.equal(t1[1], mt["text"][1]) and torch.equal(t2[1], cls["text"][1])
    # m2 (text) missing -> (CLS_1, MT_1)
    assert torch.equal(t1[2], cls["image"][2]) and torch.equal(t2[2], mt["image"][2])
    # eq. 5: the logits are the head of the sum
    logits = model.classify(cls, mt, present)
    assert torch.allclose(logits, model.head(t1 + t2))


def test_forward_shapes_and_outputs():
    model = mask_tokens_apart(tiny_model())
    batch = tiny_batch()
    out = model(batch)
    assert isinstance(out, U2AOutput)
    assert out.logits.shape == (6, 5)
    for m in ("image", "text"):
        assert out.cls[m].shape == (6, D) and out.mt[m].shape == (6, D)
    # missing rows carry zeros, present rows do not
    assert (out.cls["image"][2] == 0).all() and (out.cls["text"][1] == 0).all()
    assert (out.cls["image"][0] != 0).any() and (out.mt["text"][2] != 0).any()
    # each present row holds its own branch's CLS and MT outputs, in its own row
    for i, m in enumerate(("image", "text")):
        rows = batch["present"][:, i].nonzero().squeeze(1)
        with torch.no_grad():
            cls, mt = model.branches[m]({k: batch[k][rows] for k in model.branches[m].input_keys})
        assert torch.allclose(out.cls[m][rows], cls, atol=1e-6) and torch.allclose(out.mt[m][rows], mt, atol=1e-6)
        assert not torch.allclose(cls, mt)  # so a CLS in an MT's place would show
        missing = ~batch["present"][:, i]
        assert (out.cls[m][missing] == 0).all() and (out.mt[m][missing] == 0).all()


# -----------------------------------------------------------------------------
# Missing modalities are never encoded

def test_missing_slot_content_does_not_matter():
    """The logits of every sample are the same whatever sits in the missing slots, even NaN."""
    model = tiny_model()
    batch = tiny_batch()
    ref = model(batch).logits
    poisoned = {k: v.clone() for k, v in batch.items()}
    no_image = ~batch["present"][:, 0]
    no_text = ~batch["present"][:, 1]
    poisoned["image"][no_image] = float("nan")
    poisoned["input_ids"][no_text] = 3
    poisoned["attention_mask"][no_text] = 0
    out = model(poisoned).logits
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_missing_encoder_is_skipped():
    """Each encoder sees only the rows that have its modality; a batch without it skips it entirely."""
    model = tiny_model()
    seen = {"image": [], "text": []}
    for m in seen:
        enc = model.branches[m].encoder
        original = enc.encode

        def spy(h, mask=None, _m=m, _orig=original, **kwargs):
            seen[_m].append(h.shape[0])
            return _orig(h, mask, **kwargs)
        enc.encode = spy
    batch = tiny_batch()
    model(batch)
    assert seen == {"image": [4], "text": [4]}
    text_only = tiny_batch(present=torch.tensor([[0, 1]] * 6, dtype=torch.bool))
    model(text_only)
    assert seen == {"image": [4], "text": [4, 6]}


def test_placeholder_baseline_encodes_everything():
    """The naive baseline runs the encoders on the placeholders and always uses the CLS tokens."""
    model = tiny_model(method="naive")
    batch = tiny_batch()
    out = model(batch)
    assert (out.cls["image"] != 0).any(1).all()  # every row encoded
    changed = {k: v.clone() for k, v in batch.items()}
    changed["image"][~batch["present"][:, 0]] = 0.0
    # a missing image's placeholder content now changes that sample's logits
    assert not torch.allclose(model(changed).logits[2], out.logits[2])


def test_sample_without_any_modality_is_an_error():
    model = tiny_model()
    batch = tiny_batch(present=torch.tensor([[1, 1], [0, 0]], dtype=torch.bool), B=2)
    with pytest.raises(ValueError, match="neither modality"):
        model(batch)


def test_padding_does_not_change_text_tokens():
    """CLS and MT always attend; padded keys never do, so more padding changes nothing."""
    model = tiny_model()
    batch = tiny_batch(present=torch.ones(6, 2, dtype=torch.bool))
    longer = dict(batch)
    longer["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(6, 4, dtype=torch.long)], 1)
    longer["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(6, 4, dtype=torch.long)], 1)
    a, b = model(batch), model(longer)
    assert torch.allclose(a.cls["text"], b.cls["text"], atol=1e-5)
    assert torch.allclose(a.mt["text"], b.mt["text"], atol=1e-5)


# -----------------------------------------------------------------------------
# eq. 6-7: the loss, by hand

def test_loss_matches_hand_computation():
    model = mask_tokens_apart(tiny_model())
    batch = tiny_batch()
    out = model(batch)
    labels = batch["label"]
    total, task, align = u2a_loss(out, labels, lam=0.2)
    # by hand: cross-entropy over all six samples; alignment over the complete ones (rows 0 and 3)
    logp = out.logits.log_softmax(1)
    ce = -sum(logp[i, labels[i]] for i in range(6)) / 6
    mse = 0.0
    for i in (0, 3):
        mse += ((out.mt["image"][i] - out.cls["text"][i]) ** 2).mean()
        mse += ((out.mt["text"][i] - out.cls["image"][i]) ** 2).mean()
    mse = mse / 2
    assert torch.allclose(task, ce, atol=1e-6)
    assert torch.allclose(align, mse, atol=1e-6)
    assert torch.allclose(total, ce + 0.2 * mse, atol=1e-6)


def test_multilabel_loss_is_bce_and_no_complete_sample_means_no_alignment():
    model = tiny_model()
    batch = tiny_batch(present=torch.tensor([[1, 0], [0, 1]] * 3, dtype=torch.bool))
    out = model(batch)
    targets = (torch.rand(6, 5) > 0.5).float()
    total, task, align = u2a_loss(out, targets, multilabel=True)
    assert torch.allclose(task, F.binary_cross_entropy_with_logits(out.logits, targets))
    assert align.item() == 0.0 and torch.allclose(total, task)
    assert alignment_loss(out).item() == 0.0


# -----------------------------------------------------------------------------
# Training: only adapters, tokens and head learn; and the loss goes down

def test_only_lora_tokens_and_head_are_trainable():
    model = tiny_model()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names, "nothing trainable"
    for n in names:
        assert "lora_" in n or n.startswith("head.") or n.endswith((".cls", ".mt")), n
    assert {"branches.image.cls", "branches.image.mt", "branches.text.cls", "branches.text.mt"} <= names


def test_a_few_steps_reduce_the_loss():
    model = tiny_model().train()
    batch = tiny_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(15):
        total, _, _ = u2a_loss(model(batch), batch["label"])
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_the_optimizer_decays_matrices_only_and_trains_the_tokens_at_their_own_rate():
    """README, "Weight decay": AdamW's decay on the matrices (LoRA factors, the head's weight), none on the
    biases and the CLS/MT tokens; the tokens at token_lr_scale x lr; frozen weights in no group."""
    model = tiny_model()
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.02, token_lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"], g["lr_scale"]) for g in opt.param_groups]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    tokens = sorted(f"branches.{m}.{t}" for m in ("image", "text") for t in ("cls", "mt"))
    matrices = sorted(n for n in trained if "lora_" in n or n == "head.weight")
    assert groups == [(matrices, 0.02, 1.0), (["head.bias"], 0.0, 1.0), (tokens, 0.0, 10.0)]
    assert len(matrices) == 2 * 2 * 4 * 2 + 1  # 2 encoders x 2 blocks x q/k/v/out x A, B; the head's weight


# -----------------------------------------------------------------------------
# Video: frames share one CLS and one MT, averaged over frames

def test_video_frames_are_encoded_separately_and_averaged():
    torch.manual_seed(0)
    vit_video, vit_image = tiny_vit(), tiny_vit()
    vit_image.load_state_dict(vit_video.state_dict())
    model = mask_tokens_apart(in_memory({"audio": AST(ASTConfig(max_length=64, num_mel_bins=32, **TINY)),
                                         "video": vit_video}, 4, lora_dropout=0.0)).eval()
    image_model = in_memory({"image": vit_image, "text": tiny_bert()}, 4, lora_dropout=0.0).eval()
    image_model.branches["image"].load_state_dict(model.branches["video"].state_dict())
    frames = torch.randn(2, 3, 3, 32, 32)  # (B, T, 3, H, W)
    batch = {"audio": torch.randn(2, 64, 32), "video": frames, "present": torch.ones(2, 2, dtype=torch.bool)}
    out = model(batch)
    assert out.logits.shape == (2, 4)
    # the clip's CLS is the mean of each frame's CLS through the image branch
    per_frame = [image_model.branches["image"]({"image": frames[:, t]}) for t in range(3)]  # (CLS, MT) each
    assert torch.allclose(out.cls["video"], torch.stack([c for c, _ in per_frame]).mean(0), atol=1e-5)
    # and the clip's MT the mean of each frame's MT
    assert torch.allclose(out.mt["video"], torch.stack([t for _, t in per_frame]).mean(0), atol=1e-5)
    assert not torch.allclose(out.mt["video"], out.cls["video"], atol=1e-3)
    # and so frame order does not matter
    shuffled = model(dict(batch, video=frames[:, [2, 0, 1]]))
    assert torch.allclose(shuffled.cls["video"], out.cls["video"], atol=1e-5)
    assert torch.allclose(shuffled.mt["video"], out.mt["video"], atol=1e-5)


# -----------------------------------------------------------------------------
# Modality dropout (section 3): per step, keep both or drop one; never drop a sample's only modality

def test_modality_dropout():
    present = torch.ones(8, 2, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(600):
        out = modality_dropout(present, g)
        assert out.any(1).all()
        key = tuple(out[0].tolist())
        assert (out == out[0]).all()  # one choice for the whole batch
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {(True, True), (False, True), (True, False)}
    assert all(150 < v < 250 for v in seen.values()), seen
    mixed = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    for _ in range(50):
        assert modality_dropout(mixed, g).any(1).all()


# -----------------------------------------------------------------------------
# The paper's configuration: trainable parameter count (no weights needed: built on the meta device)

@pytest.mark.parametrize("num_classes", [101, 31])
def test_trainable_parameters_of_the_paper_configuration(num_classes):
    with torch.device("meta"):
        model = in_memory({"image": ViT(), "text": BERT()}, num_classes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, blocks, projections = 768, 12, 4
    lora = 2 * blocks * projections * (d + d)          # rank 1: A (1 x d) + B (d x 1)
    tokens = 2 * 2 * d                                 # CLS + MT per modality
    head = d * num_classes + num_classes
    assert trainable == lora + tokens + head
    expected_millions = {101: 0.23, 31: 0.17}[num_classes]
    assert round(trainable / 1e6, 2) == expected_millions
    print(f"\n{num_classes} classes: {trainable:,} trainable parameters")


# -----------------------------------------------------------------------------
# Scoring the scenarios over stored tokens (section 4.4, Figure 4)

def stored_tokens(model, samples):
    """encode_batches' tokens of `samples` (synthetic items), concatenated as train.py does."""
    batch = data.collate(samples, data.dataset_info("synthetic"))
    return {k: torch.cat(v) for k, v in u2a.encode_batches(model, [batch], "cpu").items()}


@pytest.mark.parametrize("method", ["u2a", "naive"])
@pytest.mark.parametrize("present", [(True, True), (True, False), (False, True)])
def test_scenario_logits_equal_the_forward_pass_with_the_modality_removed(method, present):
    """Section 4.4's scores come from tokens encoded once: exactly the forward pass on the same samples with
    the scenario's modality removed (for naive: its placeholder, through the encoder)."""
    model = toy_model(method)
    samples = [data.make_dataset("synthetic", None, "test", limit=4)[i] for i in range(4)]
    tokens = stored_tokens(model, samples)
    placeholders = u2a.placeholder_tokens(model) if method == "naive" else None
    table = torch.tensor([present] * 4)
    removed = [{**s, **({} if present[0] else {"image": None}), **({} if present[1] else {"text": None})}
               for s in samples]
    with torch.no_grad():
        expected = model(data.collate(removed, data.dataset_info("synthetic"))).logits
    assert torch.allclose(u2a.scenario_logits(model, tokens, table, placeholders), expected, atol=1e-5)


def test_a_placeholder_method_scored_without_its_placeholders_is_refused():
    """A placeholder method's stored CLS is the real input's where the file was there: scoring a table that
    drops it without the placeholders' CLS would classify with the very input said to be missing (seen: the
    text-missing table scored exactly as the complete case)."""
    model = toy_model("naive")
    tokens = stored_tokens(model, [data.make_dataset("synthetic", None, "test", limit=4)[i] for i in range(4)])
    with pytest.raises(ValueError, match="placeholder_tokens"):
        u2a.scenario_logits(model, tokens, torch.tensor([[True, False]] * 4))
    u2a.scenario_logits(model, tokens, tokens["present"])  # nothing dropped: the stored CLS are the inputs'


def test_scores_by_hand():
    """MM-IMDb's F1 (README, "MM-IMDb's F1"): a genre predicted when its sigmoid exceeds 0.5; macro averages
    every genre's F1, one never predicted nor present counting 0; micro pools the counts (sklearn's f1_score
    with zero_division=0). Accuracy per class: the share of its samples classified right."""
    predicted = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    truth = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.float)
    got = u2a.scores(torch.where(predicted, 2.0, -2.0), truth, multilabel=True)
    # genre 0: tp 1, fp 1, fn 1 -> 2/4; genre 1: tp 2 -> 1; genre 2: nothing -> 0; pooled: tp 3, fp 1, fn 1 -> 6/8
    assert got["per_class"] == pytest.approx([50.0, 100.0, 0.0])
    assert got["f1_macro"] == pytest.approx(50.0) and got["f1_micro"] == pytest.approx(75.0)
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0], [0, 0, 2.0]])  # predicts 0, 1, 0, 2
    got = u2a.scores(logits, torch.tensor([0, 1, 1, 1]), multilabel=False)
    assert got["accuracy"] == pytest.approx(50.0) and got["per_class"] == pytest.approx([100.0, 100 / 3, 0.0])


def test_mask_token_mse_is_over_the_samples_that_have_both_modalities():
    """Figure 4's MSE compares an MT with the CLS it estimates: a sample whose file is missing in the test
    split has no CLS to compare with (U2A stores zeros there), so it must not count."""
    model = mask_tokens_apart(tiny_model())
    batch = tiny_batch()  # rows 0 and 3 complete, 1 and 4 without text, 2 and 5 without image
    with torch.no_grad():
        cls, mt = model.encode(batch)
    tokens = {**{f"cls.{m}": cls[m] for m in cls}, **{f"mt.{m}": mt[m] for m in mt},
              "labels": torch.tensor([0, 1, 2, 0, 1, 2]), "present": batch["present"], "index": torch.arange(6)}
    _, analysis = u2a.evaluate_scenarios(model, tokens, [])
    complete = [0, 3]
    expected = ((mt["image"][complete] - cls["text"][complete]) ** 2).mean(1)  # (2,)
    assert analysis["mt_cls_mse"]["image->text"] == pytest.approx(expected.mean().item(), rel=1e-5)
    # per class: class 0 holds both complete samples; classes 1 and 2 none, so no MSE to show
    assert analysis["mt_cls_mse_per_class"]["image->text"][0] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert analysis["mt_cls_mse_per_class"]["image->text"][1:3] == [0.0, 0.0]


def test_a_sample_a_scenario_leaves_with_nothing_is_not_scored():
    """A sample whose image could not be read (present False in the stored tokens) keeps it missing in every
    scenario; where the scenario drops its text too it has nothing left and is not scored (else it would be
    classified from the head's bias alone)."""
    model = mask_tokens_apart(tiny_model())
    batch = tiny_batch()  # rows 2 and 5 without image
    with torch.no_grad():
        cls, mt = model.encode(batch)

    class TextDropped:  # data.eval_scenarios' interface: every sample's text missing
        name, groups, shares = "image 100% + text 0%", ("table4",), {"image": 100.0, "text": 0.0}

        def table(self, n, seed=None):
            return torch.tensor([[True, False]] * n)
    tokens = {**{f"cls.{m}": cls[m] for m in cls}, **{f"mt.{m}": mt[m] for m in mt},
              "present": batch["present"], "index": torch.arange(6)}
    scored = batch["present"] & TextDropped().table(6)
    assert scored.any(1).tolist() == [True, True, False, True, True, False]
    pred = u2a.scenario_logits(model, tokens, scored).argmax(1)
    keep = scored.any(1)
    # right on the samples scored; on the two others, wrong whatever they are classified from (their remaining
    # MT, or the head's bias alone were they scored with no input)
    bias_class = int(model.head.bias.argmax())
    wrong = torch.tensor([next(c for c in range(5) if c not in (int(p), bias_class)) for p in pred])
    labels = torch.where(keep, pred, wrong)
    results, _ = u2a.evaluate_scenarios(model, {**tokens, "labels": labels}, [TextDropped()])
    assert results["image 100% + text 0%"]["accuracy"] == 100.0


# -----------------------------------------------------------------------------
# predict: a user's own image and/or text, either missing, through the toy model

TOY = Path(__file__).resolve().parent.parent / "weights" / "toy"


def toy_model(method):
    torch.manual_seed(0)
    config = U2AConfig(encoders={"image": str(TOY / "vit"), "text": str(TOY / "bert")},
                       class_names=data.synthetic_class_names("synthetic-independent"), method=method)
    model = U2A(config)
    for mod in model.modules():  # trained-looking factors, so that every input matters
        if isinstance(mod, LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.1)
    return mask_tokens_apart(model).eval()  # and trained-looking MTs, whose outputs differ from the CLS outputs


@pytest.mark.parametrize("method", ["u2a", "naive"])
@pytest.mark.parametrize("present", [(True, True), (True, False), (False, True)])
def test_predict_equals_the_forward_pass_on_the_same_sample(method, present):
    model = toy_model(method)
    item = data.make_dataset("synthetic", None, "test", limit=1)[0]  # image (3, 32, 32), text, label
    image, text = (item["image"] if present[0] else None), (item["text"] if present[1] else None)
    got = predict(model, image=image, text=text)  # the default tokenizer: the toy BERT folder's vocab.txt
    batch = data.collate([{**item, "image": image, "text": text}], data.dataset_info("synthetic"))
    with torch.no_grad():
        expected = model(batch).logits[0].softmax(0)
    assert [name for name, _ in got] == [data.synthetic_class_names("synthetic-independent")[c] for c in expected.argsort(descending=True)]
    assert torch.allclose(torch.tensor([p for _, p in got]), expected.sort(descending=True).values, atol=1e-6)
    assert batch["present"].tolist() == [list(present)]


def test_predict_multilabel_gives_a_sigmoid_per_class_and_keeps_the_training_mode():
    model = toy_model("u2a").train()
    model.config.multilabel = True
    got = predict(model, text="the sun at the top left")
    assert len(got) == len(model.config.class_names) and sum(p for _, p in got) > 1.0  # independent per class
    assert [p for _, p in got] == sorted((p for _, p in got), reverse=True) and model.training
    # each probability is the sigmoid of its class's logit (a softmax's sum only rounds to about 1.0)
    batch = u2a.model_batch(model, {"image": [None], "text": ["the sun at the top left"]})
    with torch.no_grad():
        logits = model.eval()(batch).logits[0]
    assert dict(got) == pytest.approx({c: p for c, p in zip(model.config.class_names, logits.sigmoid().tolist())},
                                      abs=1e-6)


def test_predict_truncates_a_text_where_the_run_did(tmp_path):
    """A model trained on texts cut at the dataset's length (Food-101: 40 tokens) must read a user's text cut
    there too, not at BERT's 512 (seen: a 32-token text gave other probabilities than the test pipeline's 16)."""
    model = toy_model("u2a")
    model.config.text_max_len = data.dataset_info("synthetic").text_max_len  # 16; the toy BERT takes 32
    u2a.save_checkpoint(tmp_path / "c.safetensors", model)
    model = u2a.from_checkpoint(tmp_path / "c.safetensors")  # the length travels with the checkpoint
    item = data.make_dataset("synthetic", None, "test", limit=1)[0]
    text = " ".join([item["text"]] * 3)  # 16 tokens cut at 16, 32 at 32
    run_tokenizer = encoders.load_tokenizer(TOY / "bert", 16)
    assert predict(model, image=item["image"], text=text) == predict(model, image=item["image"], text=text,
                                                                       tokenizer=run_tokenizer)


def test_a_checkpoint_refuses_encoders_of_another_config(tmp_path):
    """A trained model rebuilt on encoders whose config differs from those it was trained on (here only
    layer_norm_eps: the same shapes, so every tensor would load) is refused by name, not silently rebuilt."""
    import json
    import shutil
    model = toy_model("u2a")
    u2a.save_checkpoint(tmp_path / "c.safetensors", model)
    other = shutil.copytree(TOY / "vit", tmp_path / "vit")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    with pytest.raises(ValueError, match=r"the image encoder at .*vit is not the one this model was trained on"):
        u2a.from_checkpoint(tmp_path / "c.safetensors", {"image": other, "text": TOY / "bert"})
    rebuilt = u2a.from_checkpoint(tmp_path / "c.safetensors", {"image": TOY / "vit", "text": TOY / "bert"})
    assert rebuilt.config.encoder_configs == model.config.encoder_configs  # the same encoders: rebuilt


def test_predict_refuses_no_input_and_an_image_of_the_wrong_size():
    model = toy_model("u2a")
    with pytest.raises(ValueError, match="an image, a text or both"):
        predict(model)
    photo = encoders.clip_image(Image.new("RGB", (50, 40), (200, 30, 30)))  # preprocessed for CLIP: 224 x 224
    with pytest.raises(ValueError, match=r"takes \(3, 32, 32\) images, got \(3, 224, 224\)"):
        predict(model, image=photo, text="a sunny scene")  # a path or PIL image is read at 32 px instead


def test_placeholder_tokens_are_the_cls_of_what_a_training_batch_holds_for_a_missing_input():
    """The naive baseline's stand-ins, as train.py and the notebooks get them (u2a.placeholder_tokens), are
    the CLS outputs of exactly the placeholders data.collate puts in a training batch for a missing input."""
    model = toy_model("naive")
    info = data.dataset_info("synthetic")
    tokenizer = encoders.load_tokenizer(TOY / "bert", info.text_max_len)
    got = u2a.placeholder_tokens(model, tokenizer)
    blank = data.collate([{"image": None, "text": None, "label": 0, "index": 0}], info, tokenizer)
    with torch.no_grad():
        cls, _ = model.encode(blank)
    assert list(got) == ["image", "text"] and got["image"].shape == (1, model.head.in_features)
    assert all(torch.equal(got[m], cls[m].float()) for m in got)
    default = u2a.placeholder_tokens(model)  # the text encoder's own tokenizer: the same [CLS][SEP]
    assert all(torch.equal(got[m], default[m]) for m in got)


def test_placeholder_tokens_of_a_model_in_training_mode_are_its_eval_outputs():
    """Scoring stand-ins are inference: LoRA's dropout must not draw them at random, and the caller's
    training mode is kept (as predict keeps it)."""
    model = toy_model("naive")
    expected = u2a.placeholder_tokens(model)
    model.train()
    got = u2a.placeholder_tokens(model)
    assert all(torch.equal(got[m], expected[m]) for m in got) and model.training


def test_the_method_module_does_not_import_the_data_module():
    """u2a.py (the method) reads batches through encoders.py alone: importing it leaves data.py unloaded."""
    out = subprocess.run([sys.executable, "-c", "import u2a, sys; print('data' in sys.modules)"],
                         cwd=TOY.parent.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -----------------------------------------------------------------------------
# The four methods: one table says what each is; a model built directly carries its whole config

def test_the_method_table_says_what_each_method_is():
    M = u2a.METHODS
    assert list(M) == ["naive", "placeholder-dropout", "u2a-no-align", "u2a"]
    assert [(m.stand_in, m.dropout, m.align) for m in M.values()] == [
        ("placeholder", False, False), ("placeholder", True, False), ("mask_token", True, False),
        ("mask_token", True, True)]
    for name in M:
        model = tiny_model(method=name)
        assert model.config.method == name and model.method is M[name]
        assert model.config.encoder_configs["image"]["image_size"] == 32  # filled when built
        assert model.config.align_weight == (model.config.lam if M[name].align else 0.0)
    with pytest.raises(ValueError, match="method must be one of naive, placeholder-dropout"):
        U2AConfig(encoders={}, class_names=[], method="mask_token")


def test_a_placeholder_method_stands_in_the_placeholder_cls_and_a_mask_token_method_the_mt():
    batch = tiny_batch()
    for name in ("placeholder-dropout", "u2a-no-align"):
        model = mask_tokens_apart(tiny_model(method=name))
        out = model(batch)
        t1, t2 = model.select_tokens(out.cls, out.mt, out.present)
        text_missing = ~batch["present"][:, 1]
        expected = out.cls["text"] if name == "placeholder-dropout" else out.mt["image"]
        assert torch.equal(t2[text_missing], expected[text_missing])


def test_stop_gradient_keeps_the_alignment_from_moving_the_cls_outputs():
    """With align_stop_grad, eq. 6 pulls each MT output towards the other modality's CLS output and never
    the CLS output towards the MT (the CLS token still gets gradient through what the MT attends to)."""
    model = tiny_model().train()
    out = model(tiny_batch(present=torch.ones(6, 2, dtype=torch.bool)))
    for stop_grad in (False, True):
        loss = alignment_loss(out, stop_grad=stop_grad)
        d_cls, d_mt = torch.autograd.grad(loss, [out.cls["text"], out.mt["image"]], retain_graph=True,
                                          allow_unused=True)
        assert d_mt.abs().sum() > 0                       # MT_image imitates CLS_text either way
        assert (d_cls is None) == stop_grad               # CLS_text is a constant target with stop_grad


def test_a_random_mask_token_starts_apart_from_the_cls_at_its_norm():
    torch.manual_seed(0)
    model = in_memory({"image": tiny_vit(), "text": tiny_bert()}, 5, mt_init="random")
    for branch in model.branches.values():
        assert not torch.allclose(branch.mt, branch.cls)
        assert torch.allclose(branch.mt.norm(), branch.cls.norm())
    assert torch.equal(tiny_model().branches["text"].mt, tiny_model().branches["text"].cls)  # "cls": a copy


# -----------------------------------------------------------------------------
# check_encoders_fit: what would otherwise fail at the first batch, or never

def config_folder(folder, config):
    """A folder holding only the config.json of `config` (all check_encoders_fit reads of an encoder)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(asdict(config)))
    return folder


def text_folder(folder, vocab, **config):
    """A text encoder's config.json and its vocab.txt -> (folder, its tokenizer at food101's length)."""
    config_folder(folder, BERTConfig(**config))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder, encoders.load_tokenizer(folder, data.TEXT_MAX_LEN["food101"])


BERT_SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # 101 [CLS]


@pytest.mark.parametrize("field, value", [("max_length", 128), ("num_mel_bins", 64)])
def test_an_audio_encoder_of_another_input_size_is_refused(field, value, tmp_path):
    """encoders.fbank always gives 1024 frames x 128 mel bins. An AST made for others (AST's speech-commands
    checkpoint has max_length 128) passed the check and crashed at its first batch: 'The size of tensor a
    (1214) must match the size of tensor b (146)'."""
    info = data.dataset_info("cremad")
    folders = {"audio": config_folder(tmp_path / "ast", ASTConfig(**{field: value})),
               "video": config_folder(tmp_path / "vit", ViTConfig())}
    with pytest.raises(ValueError, match=rf"audio encoder at .*ast takes .*{value}.*fbank gives 1024 frames x 128"):
        u2a.check_encoders_fit(folders, info, None)


def test_a_text_encoder_shorter_than_the_datasets_texts_is_refused(tmp_path):
    """MM-IMDb's texts run to 256 tokens: a BERT of 128 positions crashed only at the first batch holding a text
    longer than 128 tokens ('256 tokens, but BERT has 128 positions'), possibly epochs in."""
    info = data.dataset_info("mmimdb")
    folder, tokenizer = text_folder(tmp_path / "bert", BERT_SPECIALS + ["plot"], max_position_embeddings=128)
    with pytest.raises(ValueError, match=r"text encoder at .*bert has 128 positions .*mmimdb's texts run to 256"):
        u2a.check_encoders_fit({"text": folder}, info, tokenizer)


def test_a_tokenizer_whose_cls_is_not_the_encoders_class_token_is_refused(tmp_path):
    """BERT's class token (CLS's starting value, eq. 2) is the embedding of config.cls_token_id, 101 unless
    config.json says otherwise (hub configs never do). A vocabulary with [CLS] elsewhere (SciBERT's is 102)
    started CLS from another token's embedding, silently."""
    folder, tokenizer = text_folder(tmp_path / "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["w"] * 200)
    assert tokenizer.token_to_id("[CLS]") == 2 and encoders.BERTConfig().cls_token_id == 101
    with pytest.raises(ValueError, match=r"\[CLS\] is token 2 .*cls_token_id 101 .*config\.json"):
        u2a.check_encoders_fit({"text": folder}, data.dataset_info("food101"), tokenizer)
    fits = tmp_path / "fits"  # [CLS] 101, as the config's default: passes, weights file included
    make_toy.save(BERT(BERTConfig(vocab_size=200, **TINY)), fits)
    (fits / "vocab.txt").write_text("\n".join(BERT_SPECIALS + ["w"]) + "\n")
    u2a.check_encoders_fit({"text": fits}, data.dataset_info("food101"), encoders.load_tokenizer(fits, 40))
