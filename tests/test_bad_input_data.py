"""Bad input on the data side (issue 17): images beyond 8 bits, absurd aspect ratios, split entries that leave
the data root, stray Food-101 folders, MM-IMDb movies without a genre list, WAVs too short to analyse and files
that are not images. Each is found when the dataset is built, or refused where it is read, by name."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageOps

import data
import encoders
from test_data import (SR, assert_broken_first_wav_found_at_build, make_ave, make_cremad, make_food101, make_ks,
                       make_mmimdb, write_clip, write_wav)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- images (items 1, 15, 16)

def grey_gradient(w=96, h=64):
    """(h, w) uint8 with every value 0..255 present, so a wrong scale shows."""
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


def test_16_bit_and_float_images_are_read_by_their_range(tmp_path):
    grey = grey_gradient()
    expected = encoders.clip_image(Image.fromarray(grey))  # the 8-bit picture: CLIPImageProcessor's path
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit PNG: v * 257 is v / 255
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")  # float TIFF in [0, 1]
    for file, mode in [("deep.png", "I;16"), ("float.tif", "F")]:
        with Image.open(tmp_path / file) as pil:
            assert pil.mode == mode
            torch.testing.assert_close(encoders.clip_image(pil), expected, atol=0, rtol=0)
    # a float image outside [0, 1] and a 32-bit one beyond 16 bits have no range to read them by
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float255.tif")
    with Image.open(tmp_path / "float255.tif") as pil, pytest.raises(ValueError, match=r"mode 'F'.* \[0, 1\]"):
        encoders.clip_image(pil)
    with pytest.raises(ValueError, match=r"mode 'I'.* 0\.\.65535"):
        encoders.clip_image(Image.fromarray(grey.astype(np.int32) * 1000))
    with pytest.raises(ValueError, match=r"image mode 'La' is not supported"):
        encoders.clip_image(Image.new("La", (32, 32)))
    # the datasets read images through the same function
    root = make_food101(tmp_path / "food", per_class=(1, 1))
    shutil.copyfile(tmp_path / "deep.png", root / "images" / "test" / "baklava" / "baklava_0.jpg")
    torch.testing.assert_close(data.make_dataset("food101", root, "test")[1]["image"], expected, atol=0, rtol=0)


def test_absurd_aspect_ratios_are_refused_and_normal_ones_match_the_processor(tmp_path):
    # 1 x 500 would be resized to 224 x 112000 first (75 MB; 1 x 20000: 4.3 GB) to keep a 224 x 224 crop
    with pytest.raises(ValueError, match=r"1 x 500 pixels.*aspect ratio above 20:1"):
        encoders.clip_image(Image.new("RGB", (1, 500)))
    with pytest.raises(ValueError, match=r"500 x 1 pixels"):
        encoders.clip_image(Image.new("L", (500, 1)))
    root = make_food101(tmp_path / "food", per_class=(1, 1))
    Image.new("RGB", (2000, 10)).save(root / "images" / "test" / "ramen" / "ramen_0.jpg", format="PNG")
    with pytest.raises(ValueError, match=r"food101/test: 1 of 3 image files cannot be used \(e.g. .*ramen_0.jpg: "
                                         r"2000 x 10 pixels"):
        data.make_dataset("food101", root, "test")
    # up to the bound, CLIPImageProcessor's answer
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = transformers.CLIPImageProcessor
    rng = np.random.default_rng(1)
    for w, h in [(20, 400), (460, 23)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        torch.testing.assert_close(encoders.clip_image(img), Processor()(img, return_tensors="pt")["pixel_values"][0],
                                   atol=1e-2, rtol=0)


def pil_clip_processor():
    """CLIPImageProcessor's pillow backend: the one clip_image reproduces (torchvision resizes differently)."""
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = transformers.CLIPImageProcessor
    return Processor()


def test_an_exif_rotated_photo_is_read_upright_as_clip_image_processor_reads_the_file(tmp_path):
    """A phone stores a portrait photo sideways, with an EXIF Orientation tag saying how to turn it. Given the file,
    CLIPImageProcessor opens it with transformers' load_image, which turns it upright (PIL.ImageOps.exif_transpose):
    clip_image read it sideways, a silently different picture for predict(path), the datasets and video frames."""
    pixels = np.random.default_rng(2).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored sideways, turn 90 degrees clockwise to view
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    reference = pil_clip_processor()(str(tmp_path / "photo.jpg"), return_tensors="pt")["pixel_values"][0]
    with Image.open(tmp_path / "photo.jpg") as pil:
        assert pil.size == (100, 60)  # as stored
        torch.testing.assert_close(encoders.clip_image(pil), reference, atol=1e-2, rtol=0)
    # training's random crop of a video frame is drawn on the upright frame too, and turned only once
    with Image.open(tmp_path / "photo.jpg") as pil:
        upright = ImageOps.exif_transpose(pil)
        for seed in range(3):
            crops = [encoders.clip_image(data.augment_frame(im, torch.Generator().manual_seed(seed)))
                     for im in (pil, upright)]
            torch.testing.assert_close(crops[0], crops[1], atol=0, rtol=0)


def test_training_crops_read_a_frame_as_the_test_read_does():
    """augment_frame (training's random crop of a video frame) converted with a bare convert("RGB"): a 16-bit frame
    turned white and transparent pixels black, where clip_image (the test read) reads the range and puts them on
    white. A frame file is any image under a .jpg name: it is read the same way in training and in testing."""
    grey = grey_gradient()
    alpha = np.where(grey > 128, 255, 0).astype(np.uint8)
    pairs = [(Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey)),  # I;16 and its 8 bits
             (Image.fromarray(np.dstack([grey] * 3 + [alpha]), "RGBA"),               # half transparent
              Image.fromarray(np.where(alpha[..., None] > 0, np.dstack([grey] * 3), 255).astype(np.uint8)))]
    for frame, as_read in pairs:
        crops = [encoders.clip_image(data.augment_frame(im, torch.Generator().manual_seed(0)))
                 for im in (frame, as_read)]
        torch.testing.assert_close(crops[0], crops[1], atol=0, rtol=0)


def test_a_file_that_is_not_an_image_is_found_when_the_dataset_is_built(tmp_path):
    root = make_food101(tmp_path / "food", per_class=(1, 1))
    write_wav(tmp_path / "sound.wav")
    shutil.copyfile(tmp_path / "sound.wav", root / "images" / "test" / "baklava" / "baklava_0.jpg")  # under a .jpg name
    with pytest.raises(ValueError, match=r"food101/test: 1 of 3 image files have no readable image header "
                                         r"\(e.g. .*baklava_0.jpg"):
        data.make_dataset("food101", root, "test")
    with pytest.warns(UserWarning, match="no readable image header"):
        ds = data.make_dataset("food101", root, "test", on_error="skip")
    assert ds.present.tolist() == [[True, True], [False, True], [True, True]]


def test_a_frame_that_is_not_an_image_is_found_when_the_dataset_is_built(tmp_path):
    """Seen: a zero-byte frame (an extraction stopped by a full disk) passed the build, which checked only that a
    clip's folder held *.jpg files, and stopped the run with UnidentifiedImageError when its clip was first read:
    mid-epoch, or in the test split after training. Frames are images: their headers are read at build too."""
    root = make_cremad(tmp_path / "cremad")
    (root / "Image-01-FPS" / "1088_IOM_NEU_XX" / "00003.jpg").write_bytes(b"")  # a frame the test read does not pick
    with pytest.raises(ValueError, match=r"cremad/test: 1 of 2 video files have no readable image header "
                                         r"\(e.g. .*1088_IOM_NEU_XX: .*00003.jpg"):
        data.make_dataset("cremad", root, "test")
    with pytest.warns(UserWarning, match="no readable image header"):
        ds = data.make_dataset("cremad", root, "test", on_error="skip")
    assert ds.present.tolist() == [[True, False], [True, True]]
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 12345\n"  # fetched without git-lfs
    (root / "Image-01-FPS" / "1088_IOM_NEU_XX" / "00003.jpg").write_text(pointer)
    with pytest.raises(ValueError, match=r"1 of 2 video files are git-lfs pointer files.*git lfs pull"):
        data.make_dataset("cremad", root, "test")



def test_a_frame_that_does_not_decode_is_named_when_its_clip_is_read(tmp_path):
    """A frame cut short (a copy interrupted) has a good header, so the build passes it, and fails to decode when
    its clip is read. The error named the clip's folder only, "image file is truncated", not which of its frames."""
    root = make_cremad(tmp_path / "cremad")
    frame = root / "Image-01-FPS" / "1088_IOM_NEU_XX" / "00003.jpg"  # one of the 3 the test read picks of 4
    frame.write_bytes(frame.read_bytes()[:len(frame.read_bytes()) // 2])
    ds = data.make_dataset("cremad", root, "test")
    with pytest.raises(data.UnreadableFile, match=r"cannot read video .*1088_IOM_NEU_XX: frame .*00003.jpg: "
                                                  r"image file is truncated"):
        ds[0]

# ----------------------------------------------------------------------------- split files (item 6)

def add_line(path, line):
    with open(path, "a", newline="") as f:
        f.write(line)


ESCAPES = {  # dataset -> (split file, the line it gets, where the error points)
    "food101": ("texts/test_titles.csv", "../../../outside.jpg,A title,ramen\n", r"test_titles.csv:4"),
    "cremad": ("test.csv", "../outside,NEU\r\n", r"test.csv:3"),
    "ks": ("my_test.txt", "/tmp/outside,10,3\r\n", r"my_test.txt:3"),
    "ave": ("testSet.txt", "Bark&..&good&0&3\n", r"testSet.txt:4"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_split_entries_that_leave_the_data_root_are_refused_naming_the_line(name, tmp_path):
    root = {"food101": lambda p: make_food101(p, per_class=(1, 1)), "cremad": make_cremad, "ks": make_ks,
            "ave": make_ave}[name](tmp_path / name)
    file, line, where = ESCAPES[name]
    add_line(root / file, line)
    if name == "cremad":  # files where "../outside" leads: read as if they were in the release, until now
        write_clip(root, ".", ".", "outside")
    with pytest.raises(ValueError, match=rf"{where}: .* is not a plain name"):
        data.make_dataset(name, root, "test")


def test_mmimdb_ids_that_leave_the_data_root_are_refused_naming_the_entry(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    outside = tmp_path / "outside"  # a movie outside dataset/: read as if it were in the release
    shutil.copyfile(root / "dataset" / "0005.json", tmp_path / "outside.json")
    shutil.copyfile(root / "dataset" / "0005.jpeg", tmp_path / "outside.jpeg")
    for bad in ["../../outside", str(outside)]:
        (root / "split.json").write_text(json.dumps({"train": ["0001"], "dev": ["0004"], "test": ["0005", bad]}))
        with pytest.raises(ValueError, match=r'split.json: "test" entry 2: .* is not a plain name'):
            data.make_dataset("mmimdb", root, "test")


# ----------------------------------------------------------------------------- Food-101 class folders (item 7)

def test_food101_hidden_folders_are_not_classes_and_an_empty_class_is_an_error(tmp_path):
    root = make_food101(tmp_path / "food", per_class=(1, 1))
    (root / "images" / "train" / ".ipynb_checkpoints").mkdir()  # sorts first: it would be class 0
    (root / "images" / "train" / ".DS_Store").write_bytes(b"")
    assert data.dataset_info("food101", root).class_names == ["apple_pie", "baklava", "ramen"]
    assert data.make_dataset("food101", root, "test").labels.tolist() == [0, 1, 2]
    (root / "images" / "train" / "sushi").mkdir()
    (root / "images" / "train" / "sushi" / ".DS_Store").write_bytes(b"")  # hidden files are not images either
    with pytest.raises(ValueError, match=r"food101: class folder .*images/train/sushi is empty"):
        data.dataset_info("food101", root)


# ----------------------------------------------------------------------------- MM-IMDb movie files (item 9)

@pytest.mark.parametrize("meta", [{"plot": ["A plot."]}, {"plot": ["A plot."], "genres": "Drama"},
                                  {"plot": ["A plot."], "genres": ["Drama", 3]}])
def test_mmimdb_movie_without_a_genre_list_is_refused_or_skipped(meta, tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "dataset" / "0002.json").write_text(json.dumps(meta))  # train: 0001, 0002, 0003
    with pytest.raises(ValueError, match=r'mmimdb: .*0002.json: "genres" is .*, not a list of genre names'):
        data.make_dataset("mmimdb", root, "train")
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 movies .*0002.json"):
        ds = data.make_dataset("mmimdb", root, "train", on_error="skip")
    assert len(ds) == 2 and [s.rsplit("/", 1)[1] for s in ds.sources["image"]] == ["0001.jpeg", "0003.jpeg"]


@pytest.mark.parametrize("content", ['{"train": ["0001"], "test": ["0005"]}', "not json", '["0001", "0002"]',
                                     '{"train": ["0001"], "dev": "0004", "test": ["0005"]}'])
def test_a_split_json_that_is_not_the_releases_names_its_file(content, tmp_path):
    """Seen: a split.json without "dev" stopped the start with a bare KeyError: 'dev' (a traceback), one that is
    not JSON with "Expecting value: line 1 column 1 (char 0)", naming no file."""
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "split.json").write_text(content)
    with pytest.raises(ValueError, match=r'mmimdb: .*split.json.*expected a JSON object whose "train", "dev" and '
                                         r'"test" are lists of movie ids'):
        data.make_dataset("mmimdb", root, "val")


def test_mmimdb_movie_without_a_plot_names_its_file(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "dataset" / "0001.json").write_text(json.dumps({"genres": ["Drama"], "plot": []}))
    with pytest.raises(ValueError, match=r'mmimdb: .*0001.json: "plot" is \[\], not a list of summaries'):
        data.make_dataset("mmimdb", root, "train")
    with pytest.warns(UserWarning) as record:
        ds = data.make_dataset("mmimdb", root, "train", on_error="skip")
    messages = " | ".join(str(w.message) for w in record)
    assert re.search(r"1 of 3 movies have no plot \(e.g. .*0001.json\)", messages)
    assert re.search(r"1 of 3 samples lack their text \(e.g. sample 0, with image .*0001.jpeg\)", messages)
    assert ds.present[0].tolist() == [True, False] and ds[0]["image"] is not None  # the image is still usable


def test_mmimdb_movie_json_is_read_as_utf_8_whatever_the_locale(tmp_path):
    """JSON is UTF-8 (RFC 8259), but the movie files were opened in the locale's encoding. Seen under an ASCII
    locale (LC_ALL=C without UTF-8 coercion, as on some clusters): a plot with an accent refused the movie (skip mode
    dropped it); under Windows' cp1252 the plot would have been read as mojibake, without a word."""
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "dataset" / "0001.json").write_text(json.dumps({"genres": ["Drama"], "plot": ["Amélie à Montmartre."]},
                                                           ensure_ascii=False), encoding="utf-8")
    script = (f"import data; print(ascii(data.make_dataset('mmimdb', {str(root)!r}, 'train').sources['text'][0]))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1500:]
    assert run.stdout.strip() == ascii("Amélie à Montmartre.")


# ----------------------------------------------------------------------------- short WAVs (item 14)

@pytest.mark.parametrize("samples, rate", [(0, SR), (160, SR), (1000, 44_100)])  # 0, 10 ms; 363 at 16 kHz
def test_wavs_shorter_than_one_analysis_window_are_found_when_the_dataset_is_built(samples, rate, tmp_path):
    root = make_cremad(tmp_path / "cremad")
    sf.write(root / "AudioWAV" / "1088_IOM_NEU_XX.wav", np.zeros(samples, np.float32), rate, subtype="PCM_16")
    ds = assert_broken_first_wav_found_at_build(
        root, r"cremad/test: 1 of 2 audio files are shorter than one 400-sample window.*1088_IOM_NEU_XX.wav: \d+ "
              r"samples at 16 kHz", "shorter than one 400-sample window")
    assert ds[0]["audio"] is None and ds[1]["audio"].shape == (1024, 128)


def test_a_wav_at_a_rate_sharing_few_factors_with_16_khz_is_refused_by_name(tmp_path):
    """resample builds one filter per output phase, each as long as the input's phase cycle. 11127 Hz (an old
    Macintosh rate, found in old sound libraries) shares no factor with 16000: 16000 filters of ~11141 taps. Seen:
    5.8 GB and 14 s for one 10 s clip, at every read of it (22254 Hz: 3 GB, 10 s), where a run's DataLoader workers
    run out of memory. Found when the dataset is built instead, naming the conversion that fixes it."""
    root = make_cremad(tmp_path / "cremad")
    write_wav(root / "AudioWAV" / "1088_IOM_NEU_XX.wav", rate=11_127)
    assert_broken_first_wav_found_at_build(root, r"cremad/test: 1 of 2 audio files cannot be used \(e.g. "
                                                 r".*1088_IOM_NEU_XX.wav: sample rate 11127 Hz.*-ar 16000",
                                           "sample rate 11127 Hz")
    with pytest.raises(ValueError, match=r"sample rate 11127 Hz.*-ar 16000"):
        encoders.fbank(torch.zeros(11_127), 11_127)
    for rate in (8_000, 11_025, 22_050, 32_000, 44_100, 44_056, 47_952, 48_000, 96_000, 192_000):  # NTSC pull-downs too
        assert encoders.resample_problem(rate) is None


def test_an_ave_wav_already_cut_to_its_event_is_found_when_the_dataset_is_built(tmp_path):
    """audio/<id>.wav is the whole video's audio, the event window is cut from it. Seen: a WAV already cut to its
    event (PMR's extractWav_SE writes those), Bark at 3-7 s as a 4 s file, was cut again to seconds 3-4 of the
    event, 1 s of the wrong sound, without a word."""
    root = make_ave(tmp_path / "ave")
    write_wav(root / "audio" / "vid2.wav", seconds=4)  # train: Bark, vid2, seconds 3-7
    with pytest.raises(ValueError, match=r"ave/train: 1 of 4 audio files end before their event does .*vid2.wav.*"
                                         r"4.00 s, the event is seconds 3-7"):
        data.make_dataset("ave", root, "train")
    with pytest.warns(UserWarning, match="end before their event does"):
        ds = data.make_dataset("ave", root, "train", on_error="skip")
    assert ds.present[:, 0].tolist() == [True, False, True, True]
    write_wav(root / "audio" / "vid2.wav", seconds=6.5)  # an extraction a little short of the event's end is fine
    assert data.make_dataset("ave", root, "train").present.all()


def test_an_ave_event_window_past_the_end_of_its_wav_is_found_when_the_dataset_is_built(tmp_path):
    root = make_ave(tmp_path / "ave")
    write_wav(root / "audio" / "vid5.wav", seconds=3)  # test: Horse, vid5, seconds 4-10
    with pytest.raises(ValueError, match=r"ave/test: 1 of 2 audio files are shorter .*vid5.wav.*: 0 samples"):
        data.make_dataset("ave", root, "test")
