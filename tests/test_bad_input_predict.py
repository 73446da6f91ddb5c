"""Bad input to `u2a.predict` and to the checkpoint loaders (issue 17 items 2-4, 17-19; issue 15 item 7): each
test feeds what a new user fed and checks the behaviour chosen (README, "Bad input"): a blank text is a missing
text, inputs of undocumented types or with NaN/Inf are refused by name, a checkpoint with NaN/Inf weights or
from another version of u2a is refused naming the tensor or field, a run folder is accepted where it holds one
checkpoint, and a photo is preprocessed at the size of the model's own image encoder."""
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import encoders
import u2a
from lora import LoRALinear

TOY = Path(__file__).resolve().parent.parent / "weights" / "toy"


def toy_model():
    """U2A on the toy 32-px ViT and the toy BERT (the default run's encoders), with LoRA factors that
    matter, so that every input changes the prediction."""
    torch.manual_seed(0)
    config = u2a.U2AConfig(encoders={"image": str(TOY / "vit"), "text": str(TOY / "bert")},
                           class_names=data.synthetic_class_names("synthetic-independent"))
    model = u2a.U2A(config)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def image():
    return data.make_dataset("synthetic", None, "test", limit=1)[0]["image"]  # (3, 32, 32), preprocessed


def probabilities(pairs):
    return dict(pairs)


# -----------------------------------------------------------------------------
# item 2: an empty or blank text is a missing text, in predict and in the datasets

# the last three hold only characters BERT's normalizer deletes (a byte-order mark, as a scraped page can
# leave, zero-width spaces, NUL): the tokenizer makes them [CLS][SEP], the placeholder itself
@pytest.mark.parametrize("blank", ["", "   ", "\n\t ", "\u3000", "\ufeff", "\u200b \u200c", "\x00\ufffd"])
def test_predict_reads_a_blank_text_as_a_missing_text(model, image, blank):
    assert probabilities(u2a.predict(model, image=image, text=blank)) == \
        probabilities(u2a.predict(model, image=image, text=None))
    with pytest.raises(ValueError, match="an image, a text or both"):  # nothing left to predict from
        u2a.predict(model, text=blank)


def test_a_batch_marks_a_blank_text_absent():
    info = data.dataset_info("synthetic")
    items = [{"image": torch.zeros(3, 32, 32), "text": text, "label": 0, "index": i}
             for i, text in enumerate(["a sunny scene", "", "  \n", None])]
    batch = data.collate(items, info)
    assert batch["present"].tolist() == [[True, True], [True, False], [True, False], [True, False]]
    assert batch["attention_mask"][1:].sum(1).tolist() == [2, 2, 2]  # the placeholder: [CLS][SEP]


def write_food101(root, titles):
    """A two-class UPMC Food-101 layout whose test split has one row per title."""
    for split in ("train", "test"):
        rows = [(f"{c}_{k}.jpg", title, c) for k, (title, c) in enumerate(zip(titles, ("apple_pie", "ramen")))]
        for file, _, c in rows:
            (root / "images" / split / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (120, 60, 30)).save(root / "images" / split / c / file)
        (root / "texts").mkdir(exist_ok=True)
        (root / "texts" / f"{split}_titles.csv").write_text("".join(f"{f},{t},{c}\n" for f, t, c in rows))
    return root


def test_a_dataset_marks_a_blank_title_missing_as_it_does_a_missing_text(tmp_path):
    root = write_food101(tmp_path / "food101", ["Apple pie, the best", "   "])
    with pytest.raises(FileNotFoundError, match="1 of 2 samples lack their text"):  # as MM-IMDb's "plot": []
        data.make_dataset("food101", root, "test")
    with pytest.warns(UserWarning, match="lack their text"):
        ds = data.make_dataset("food101", root, "test", on_error="skip")
    assert ds.present.tolist() == [[True, True], [True, False]]
    assert ds[1]["text"] is None


# -----------------------------------------------------------------------------
# items 3 and 17: documented inputs only, refused by type with what to pass instead; no NaN/Inf

@pytest.mark.parametrize("text, error, message", [
    (["a sunny scene", "the moon"], TypeError, r"one text .*list"),   # tokenised as a text pair before
    (("a sunny scene",), TypeError, r"one text .*tuple"),
    (b"\xff", TypeError, r"bytes.*decode"),                            # the tokenizer's TextEncodeInput error
    (42, TypeError, r"text must be a string.*int"),
    ("a sunny \ud800 scene", ValueError, r"not valid Unicode.*position 8"),  # a lone surrogate
])
def test_predict_refuses_a_text_that_is_not_one_string(model, image, text, error, message):
    with pytest.raises(error, match=message):
        u2a.predict(model, image=image, text=text)


def test_predict_refuses_an_image_tensor_of_raw_pixels_or_with_nan(model, image):
    with pytest.raises(TypeError, match=r"torch.uint8.*PIL image"):  # not normalised: raw pixels
        u2a.predict(model, image=(image.clamp(0, 1) * 255).to(torch.uint8), text="a sunny scene")
    for bad in (float("nan"), float("inf")):
        broken = image.clone()
        broken[1, 3, 4] = bad
        with pytest.raises(ValueError, match="1 NaN/Inf value"):
            u2a.predict(model, image=broken, text="a sunny scene")
    with pytest.raises(TypeError, match=r"ndarray.*Image.fromarray"):
        u2a.predict(model, image=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match=r"image must be .*list"):
        u2a.predict(model, image=image.tolist())


def test_predict_refuses_an_image_tensor_of_raw_pixels_made_float(model):
    """A photo's 0..255 pixels made a float tensor (np.array(photo), permuted, .float()) passed every check: the
    encoder read values up to ~100x beyond any CLIP-preprocessed image, and predict answered about that picture."""
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    raw = torch.from_numpy(pixels).permute(2, 0, 1).float()                    # (3, 32, 32) in [0, 255]
    with pytest.raises(ValueError, match=r"values up to 255.*not preprocessed.*PIL image"):
        u2a.predict(model, image=raw, text="a sunny scene")
    u2a.predict(model, image=encoders.clip_image(Image.fromarray(pixels), 32), text="a sunny scene")  # preprocessed


def test_predict_refuses_an_empty_image_by_its_size(model):
    """A crop with no area (img.crop((10, 10, 10, 10)): 0 x 0) ended in a bare ZeroDivisionError inside clip_image
    (CLIPImageProcessor fails the same way); 0 x 5 was called "an aspect ratio above 20:1"."""
    for empty in (Image.new("RGB", (40, 30)).crop((10, 10, 10, 10)), Image.new("RGB", (0, 5))):
        with pytest.raises(ValueError, match=rf"{empty.width} x {empty.height} pixels: the image is empty"):
            u2a.predict(model, image=empty, text="a sunny scene")


def test_predict_names_the_image_file_it_cannot_read(model, tmp_path):
    """An image given by path that does not decode or fit was refused without its name: a JPEG cut short said
    only "image file is truncated (8 bytes not processed)", a 30:1 banner only its size."""
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[:len(photo.read_bytes()) // 2])  # an interrupted copy
    banner = tmp_path / "banner.png"
    Image.new("RGB", (300, 10)).save(banner)
    for path in (cut, banner):
        with pytest.raises((OSError, ValueError), match=re.escape(str(path))):
            u2a.predict(model, image=path, text="a sunny scene")
    u2a.predict(model, image=photo, text="a sunny scene")  # the whole file reads


def test_predict_takes_a_half_precision_image_tensor_as_floats(model, image):
    got = probabilities(u2a.predict(model, image=image.half(), text="a sunny scene"))
    expected = probabilities(u2a.predict(model, image=image.half().float(), text="a sunny scene"))
    assert got == pytest.approx(expected, abs=1e-6)


# -----------------------------------------------------------------------------
# issue 15 item 7: a photo is preprocessed at the size of the model's own image encoder

def test_predict_reads_a_photo_at_the_toy_encoders_size(tmp_path):
    model = toy_model()
    u2a.save_checkpoint(tmp_path / "best.safetensors", model)
    trained = u2a.from_checkpoint(tmp_path / "best.safetensors")  # the default run's checkpoint: a 32-px ViT
    photo = Image.new("RGB", (50, 40), (200, 30, 30))
    photo.paste((20, 20, 220), (5, 5, 20, 20))
    photo.save(tmp_path / "photo.png")
    by_path = u2a.predict(trained, image=tmp_path / "photo.png", text="a sunny scene")
    by_pil = u2a.predict(trained, image=photo, text="a sunny scene")
    by_tensor = u2a.predict(trained, image=encoders.clip_image(photo, 32), text="a sunny scene")
    assert probabilities(by_path) == probabilities(by_pil) == pytest.approx(probabilities(by_tensor), abs=1e-6)
    assert encoders.clip_image(photo).shape == (3, 224, 224)  # CLIP's own size stays the default


def test_clip_image_at_another_size_matches_clip_image_processor():
    transformers = pytest.importorskip("transformers")
    try:  # the pillow backend, as in test_data's parity test at 224
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = transformers.CLIPImageProcessor
    processor = Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    for w, h in [(50, 40), (31, 90), (32, 32)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = processor(img, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(encoders.clip_image(img, 32), ref, atol=1e-2, rtol=0)


# -----------------------------------------------------------------------------
# item 4: a checkpoint holding NaN/Inf weights is refused, naming the tensor and the file

@pytest.mark.parametrize("name, bad", [("head.weight", float("nan")), ("branches.text.mt", float("inf"))])
def test_load_trained_refuses_non_finite_weights(tmp_path, name, bad):
    model = toy_model()
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[3] = bad
    path = tmp_path / "diverged.safetensors"
    u2a.save_checkpoint(path, model)
    fresh = toy_model()
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match=rf"diverged.safetensors: model.{name} holds 1 NaN/Inf value"):
        u2a.load_trained(fresh, path)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # nothing half-copied
    with pytest.raises(ValueError, match=rf"model.{name} holds 1 NaN/Inf"):
        u2a.from_checkpoint(path)


# -----------------------------------------------------------------------------
# item 18: a run folder is a checkpoint where it holds one, and an error that lists them where it holds several

def test_from_checkpoint_takes_a_run_folder_with_one_checkpoint(tmp_path, image):
    model = toy_model()
    run = tmp_path / "run"
    run.mkdir()
    u2a.save_checkpoint(run / "best.safetensors", model)
    u2a.save_checkpoint(run / "last.safetensors", toy_model().train())
    expected = u2a.predict(model, image=image, text="a sunny scene")
    assert u2a.predict(u2a.from_checkpoint(run), image=image, text="a sunny scene") == expected  # best, not last
    nested = tmp_path / "nested"
    (nested / "u2a").mkdir(parents=True)
    u2a.save_checkpoint(nested / "u2a" / "best.safetensors", model)
    assert u2a.predict(u2a.from_checkpoint(nested), image=image, text="a sunny scene") == expected


def test_from_checkpoint_says_which_checkpoints_a_run_folder_holds(tmp_path):
    model = toy_model()
    run = tmp_path / "run"
    for method in ("u2a", "naive"):
        (run / method).mkdir(parents=True)
        u2a.save_checkpoint(run / method / "best.safetensors", model)
    with pytest.raises(ValueError, match=r"2 checkpoints: naive/best.safetensors, u2a/best.safetensors; "
                                         r"pass one of them"):
        u2a.from_checkpoint(run)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    u2a.save_checkpoint(unfinished / "last.safetensors", model)
    with pytest.raises(FileNotFoundError, match=r"no best.safetensors.*last.safetensors"):
        u2a.from_checkpoint(unfinished)
    with pytest.raises(FileNotFoundError, match=r"not found: expected a checkpoint file .* or a run folder"):
        u2a.from_checkpoint(tmp_path / "typo")


# -----------------------------------------------------------------------------
# item 19: a checkpoint from another version of u2a names the fields that do not fit

def write_checkpoint_with_config(path, model, config):
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={"u2a": json.dumps({"model": config})})


def test_a_checkpoint_from_another_version_names_the_fields_that_do_not_fit(tmp_path):
    model = toy_model()
    saved = asdict(model.config)
    write_checkpoint_with_config(tmp_path / "newer.safetensors", model, {**saved, "mt_lr_scale": 10.0})
    with pytest.raises(ValueError, match=r"newer.safetensors.*another version of u2a.*unknown here: mt_lr_scale"):
        u2a.from_checkpoint(tmp_path / "newer.safetensors")
    older = {k: v for k, v in saved.items() if k != "class_names"}
    write_checkpoint_with_config(tmp_path / "older.safetensors", model, older)
    with pytest.raises(ValueError, match=r"another version of u2a.*lacks: class_names"):
        u2a.from_checkpoint(tmp_path / "older.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"), metadata={"u2a": json.dumps({})})
    with pytest.raises(ValueError, match="no model config"):
        u2a.from_checkpoint(tmp_path / "foreign.safetensors")


def test_a_checkpoint_on_other_classes_says_which_differ(tmp_path):
    # seen: data with the checkpoint's classes but the last (a Food-101 download without its last class folder)
    # was refused with "first differences: []"
    model, path = toy_model(), tmp_path / "best.safetensors"
    u2a.save_checkpoint(path, model)
    names = model.config.class_names
    with pytest.raises(ValueError, match=f"not in the data given: {re.escape(names[-1])}$"):
        u2a.check_trained_on(path, names[:-1])
    with pytest.raises(ValueError, match="in the data given, not in the checkpoint: extra$"):
        u2a.check_trained_on(path, names + ["extra"])
    with pytest.raises(ValueError, match=re.escape(f"the same classes in another label order (first: label 0 is "
                                                   f"{names[0]} there, {names[-1]} here)")):
        u2a.check_trained_on(path, names[::-1])
