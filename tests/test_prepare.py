"""python data.py prepare: real short videos, written here with PyAV in each release's container and naming
(CREMA-D .flv with MP3 sound, Kinetics and AVE .mp4 with H.264 + AAC), become the layout make_dataset reads,
and a training run works on it. Also: 1 frame a second from the right seconds, 16 kHz mono PCM, resuming,
corrupt videos, git-lfs pointers and clips with no video. Needs PyAV (requirements-dev.txt)."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import data

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parent.parent
FPS, WIDTH, HEIGHT = 10, 64, 48
SOURCE_RATE = 22_050  # not 16 kHz: preparation resamples
LFS_POINTER_TEXT = ("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def brightness(second):
    return 30 + 40 * second  # the background says which second a frame shows


def write_video(path, seconds, codecs=("libx264", "aac")):
    """A white bar moving across a background whose grey level says the second, and a 440 Hz tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream(codecs[0], rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = out.add_stream(codecs[1], rate=SOURCE_RATE)
        audio.layout = "mono"
        for i in range(seconds * FPS):
            pixels = np.full((HEIGHT, WIDTH, 3), brightness(i // FPS), np.uint8)
            pixels[:, (4 * i) % WIDTH:(4 * i) % WIDTH + 4] = 255
            out.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(video.encode())
        mux_tone(out, audio, seconds)
    return path


def mux_tone(out, audio, seconds):
    """`seconds` of a 440 Hz tone through the open container `out`'s mono audio stream."""
    t = np.arange(seconds * SOURCE_RATE) / SOURCE_RATE
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    for start in range(0, len(pcm), 1024):
        frame = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format="s16", layout="mono")
        frame.sample_rate, frame.pts = SOURCE_RATE, start
        out.mux(audio.encode(frame))
    out.mux(audio.encode())


def write_lines(path, lines, end="\r\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + end for line in lines))


# ----------------------------------------------------------------------------- the releases, as downloaded

CREMAD = {"train": ["1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_NEU_XX", "1003_ITS_SAD_XX", "1004_MTI_FEA_XX",
                    "1005_WSI_DIS_XX"], "test": ["1088_IOM_NEU_XX", "1089_DFA_ANG_XX"]}
CREMAD_SECONDS = 3


def make_cremad_release(raw):
    """The CheyneyComputerScience/CREMA-D clone (VideoFlash/*.flv, AudioWAV/*.wav) + OGM-GE's lists."""
    for clips in CREMAD.values():
        for clip in clips:
            write_video(raw / "VideoFlash" / f"{clip}.flv", CREMAD_SECONDS, ("flv", "libmp3lame"))
            t = np.arange(CREMAD_SECONDS * SOURCE_RATE) / SOURCE_RATE
            (raw / "AudioWAV").mkdir(exist_ok=True)
            sf.write(raw / "AudioWAV" / f"{clip}.wav", 0.3 * np.sin(2 * np.pi * 440 * t), SOURCE_RATE,
                     subtype="PCM_16")
    for split, clips in CREMAD.items():
        write_lines(raw / "OGM-GE" / "data" / "CREMAD" / f"{split}.csv", [f"{c},{c.split('_')[2]}" for c in clips])
    return raw


KS = {"train": [("--4-0ihtnBU_000058_000068", 4), ("a_b-cdefghi_000000_000010", 16), ("0123456789A_000005_000015", 4),
                ("zyxwvutsrqp_000001_000011", 23), ("Q-_q-_q-_q-_000003_000013", 16)],
      "test": [("-3Mwkq-7TV4_2", 23), ("-7aeB7vFtB4_37", 16)]}
KS_CLASS_FOLDERS = {4: "dribbling basketball", 16: "playing piano", 23: "shoveling snow"}


def make_ks_release(raw):
    """Kinetics clips in class folders under Kinetics' names + OGM-GE's lists (test ids <ytid>_<start>)."""
    for split, rows in KS.items():
        for clip, label in rows:
            file = data.ks_names(clip)[-1]  # the Kinetics name
            write_video(raw / "kinetics" / split / KS_CLASS_FOLDERS[label] / f"{file}.mp4", 2)
        write_lines(raw / "OGM-GE" / "data" / "KineticSound" / f"my_{split}.txt", [f"{c},10,{k}" for c, k in rows])
    return raw


AVE_SECONDS = 6
AVE = {"train": ["Church bell&vidAAAAAAAA&good&0&6", "Bark&vidBBBBBBBB&good&2&5", "Goat&vidBBBBBBBB&good&0&2",
                 "Horse&vidDDDDDDDD&good&0&3"],
       "val": ["Cat&vidCCCCCCCC&good&1&4"], "test": ["Banjo&vidDDDDDDDD&good&3&6"]}


def make_ave_release(raw):
    """AVE_Dataset/AVE/<id>.mp4 and the split files (vidBBBBBBBB twice in train, vidDDDDDDDD in train and test)."""
    for split, rows in AVE.items():
        for row in rows:
            write_video(raw / "AVE_Dataset" / "AVE" / f"{row.split('&')[1]}.mp4", AVE_SECONDS)
        write_lines(raw / "AVE_Dataset" / f"{split}Set.txt", rows, end="\n")
    return raw


RELEASES = {"cremad": make_cremad_release, "ks": make_ks_release, "ave": make_ave_release}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(f"{name}-raw")) for name, make in RELEASES.items()}


# ----------------------------------------------------------------------------- what preparation writes

def jpeg_tables(quality):
    """The quantisation tables libjpeg writes at `quality` (OpenCV's cv2.imwrite: 95 unless told)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as pil:
        return pil.quantization


def test_cremad_release_prepares_to_the_layout_and_trains(releases, tmp_path):
    out = tmp_path / "cremad"
    summary = data.main(["prepare", "cremad", "--source", str(releases["cremad"]), "--root", str(out),
                         "--workers", "2"])
    assert summary == {"done": 8, "skipped": 0, "failed": [], "no_video": []}
    assert (out / "train.csv").read_bytes() == (releases["cremad"] / "OGM-GE/data/CREMAD/train.csv").read_bytes()
    frames = sorted(p.name for p in (out / "Image-01-FPS" / "1001_DFA_ANG_XX").iterdir())
    assert frames == ["00000.jpg", "00001.jpg", "00002.jpg"]  # 1 a second, OGM-GE's names
    with Image.open(out / "Image-01-FPS" / "1001_DFA_ANG_XX" / "00001.jpg") as pil:
        assert pil.size == (WIDTH, HEIGHT) and pil.quantization == jpeg_tables(95)
        assert abs(np.median(np.asarray(pil)) - brightness(1)) < 8  # second 1's frame: its grey
    info = sf.info(out / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
    assert abs(info.duration - CREMAD_SECONDS) < 0.01
    wave, rate = sf.read(out / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    assert abs(np.abs(np.fft.rfft(wave)).argmax() * rate / len(wave) - 440) < 1  # the release's tone
    assert [len(data.make_dataset("cremad", out, s)) for s in ("train", "val", "test")] == [5, 1, 2]
    train = _import_train()
    metrics = train.main(["--data", "cremad", "--data-root", str(out), "--weights", str(_weights(tmp_path)),
                          "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
                          "--warmup-epochs", "0"])
    assert 0 <= metrics["u2a"]["scenarios"]["audio 100% + video 100%"]["accuracy"] <= 100


@pytest.mark.parametrize("name", ["ks", "ave"])
def test_ks_and_ave_releases_prepare_and_train(name, releases, tmp_path):
    out = tmp_path / name
    assert data.prepare(name, releases[name], out, workers=1)["done"] == {"ks": 7, "ave": 4}[name]
    train = _import_train()
    train.main(["--data", name, "--data-root", str(out), "--weights", str(_weights(tmp_path)),
                "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-epochs", "0"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["scenarios"]


def _import_train():
    pytest.importorskip("transformers")
    import train
    return train


def _weights(tmp_path):
    import checkpoints  # tests/checkpoints.py: small random encoders in the downloader's folders
    _import_train()  # transformers, or the test is skipped
    import u2a
    return checkpoints.save_run_encoders(tmp_path / "weights", u2a.ENCODER_FOLDERS["paper"], ["a"])


def test_ks_test_clips_are_found_under_their_kinetics_names(releases, tmp_path):
    out = tmp_path / "ks"
    summary = data.prepare("ks", releases["ks"], out, workers=1)
    assert summary["done"] == 7 and not summary["failed"] and not summary["no_video"]
    assert (out / "frames" / "-7aeB7vFtB4_37").is_dir() and (out / "audio" / "-7aeB7vFtB4_37.wav").is_file()
    test = data.make_dataset("ks", out, "test")  # written under the list's own ids
    assert [Path(v).name for v in test.sources["video"]] == ["-3Mwkq-7TV4_2", "-7aeB7vFtB4_37"]
    assert [test.info.class_names[k] for k in test.labels] == ["shoveling snow", "playing piano"]
    assert len(data.list_frames(test.sources["video"][0])) == 2


def test_ave_frames_come_from_the_event_window_and_the_audio_is_whole(releases, tmp_path):
    out = tmp_path / "ave"
    summary = data.prepare("ave", releases["ave"], out, workers=1)
    assert summary["done"] == 4  # 4 videos; vidBBBBBBBB and vidDDDDDDDD are listed twice
    for vid, (start, end) in {"vidBBBBBBBB": (2, 5), "vidCCCCCCCC": (1, 4), "vidDDDDDDDD": (3, 6)}.items():
        frames = data.list_frames(out / "Image-01-FPS-SE" / vid)
        assert len(frames) == end - start  # the window [start, end), 1 a second (vidDDDDDDDD: its test window)
        for k, frame in enumerate(frames):
            with Image.open(frame) as pil:
                assert abs(np.median(np.asarray(pil)) - brightness(start + k)) < 8, (vid, k)
        assert abs(sf.info(out / "audio" / f"{vid}.wav").duration - AVE_SECONDS) < 0.1  # the whole video's
    val = data.make_dataset("ave", out, "val")
    waveform, rate = data.read_audio(val.sources["audio"][0])  # the reader cuts the window: 1-4 s
    assert rate == 16_000 and len(waveform) == 3 * 16_000
    assert val[0]["audio"].shape == (1024, 128) and val[0]["video"].shape == (3, 3, 224, 224)


def test_preparation_resumes_and_counts_what_failed(releases, tmp_path, capsys):
    raw = tmp_path / "raw"
    make_cremad_release(raw)
    (raw / "VideoFlash" / "1002_TIE_NEU_XX.flv").write_bytes(b"FLV\x01" + bytes(range(256)) * 4)  # corrupt
    (raw / "VideoFlash" / "1003_ITS_SAD_XX.flv").write_text(LFS_POINTER_TEXT)
    (raw / "AudioWAV" / "1003_ITS_SAD_XX.wav").write_text(LFS_POINTER_TEXT)
    (raw / "VideoFlash" / "1004_MTI_FEA_XX.flv").unlink()
    out = raw / "prepared"  # inside the release: never searched for videos or lists
    summary = data.prepare("cremad", raw, out, workers=2)
    assert summary["done"] == 5 and summary["skipped"] == 0 and summary["no_video"] == ["1004_MTI_FEA_XX"]
    assert [e.split(":")[0] for e in summary["failed"]] == ["1002_TIE_NEU_XX", "1003_ITS_SAD_XX"]
    assert "git-lfs pointer" in summary["failed"][1] and "git lfs pull" in summary["failed"][1]
    printed = capsys.readouterr().out
    assert "done 5, skipped 0 (already prepared), failed 2, no video 1" in printed and "failed: 1002_TIE" in printed
    assert not list(out.rglob("*.part"))  # a failed clip leaves nothing behind
    # an interrupted clip: audio in place, frames still under their temporary name -> not finished, redone
    frames = out / "Image-01-FPS" / "1001_DFA_ANG_XX"
    frames.rename(frames.with_name(frames.name + data.PART))
    again = data.prepare("cremad", raw, out, workers=1)
    assert (again["done"], again["skipped"], len(again["failed"])) == (1, 4, 2)
    assert len(data.list_frames(frames)) == CREMAD_SECONDS and not list(out.rglob("*.part"))


def test_a_clip_with_frames_but_no_wav_is_redone(releases, tmp_path):
    """Seen: a rerun after the audio folder was removed (to extract the sound again) wrote every WAV, then reported
    every clip failed, "OSError: Directory not empty" (the .part frames could not replace the frames left there);
    the run after that called them all already prepared."""
    out = tmp_path / "cremad"
    data.prepare("cremad", releases["cremad"], out, workers=1)
    shutil.rmtree(out / "AudioWAV")
    assert data.prepare("cremad", releases["cremad"], out, workers=1) == {"done": 8, "skipped": 0, "failed": [],
                                                                         "no_video": []}
    assert len(data.list_frames(out / "Image-01-FPS" / "1001_DFA_ANG_XX")) == CREMAD_SECONDS
    assert (out / "AudioWAV" / "1001_DFA_ANG_XX.wav").is_file() and not list(out.rglob("*.part"))


def test_upper_case_suffixes_are_found(tmp_path):
    """Seen: X.FLV was reported as "no video", and for X.WAV the sound was taken from the video's MP3 track instead
    of the release's WAV, without a word (a copy made on a case-insensitive disk, a camera's .MP4)."""
    raw = make_cremad_release(tmp_path / "raw")
    flv = raw / "VideoFlash" / "1001_DFA_ANG_XX.flv"
    flv.rename(flv.with_suffix(".FLV"))
    (raw / "AudioWAV" / "1001_IEO_HAP_HI.wav").unlink()  # its WAV, as .WAV and with a tone of its own
    t = np.arange(CREMAD_SECONDS * SOURCE_RATE) / SOURCE_RATE
    sf.write(raw / "AudioWAV" / "1001_IEO_HAP_HI.WAV", 0.3 * np.sin(2 * np.pi * 880 * t), SOURCE_RATE, subtype="PCM_16")
    out = tmp_path / "cremad"
    assert data.prepare("cremad", raw, out, workers=1) == {"done": 8, "skipped": 0, "failed": [], "no_video": []}
    wave, rate = sf.read(out / "AudioWAV" / "1001_IEO_HAP_HI.wav")
    assert abs(np.abs(np.fft.rfft(wave)).argmax() * rate / len(wave) - 880) < 1  # the release's WAV, not the FLV's


def write_audio_only(path, seconds):
    """A file with a sound track and no picture (an audio-only download, a damaged release file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        audio = out.add_stream("aac", rate=SOURCE_RATE)
        audio.layout = "mono"
        mux_tone(out, audio, seconds)


def test_a_file_with_no_video_track_fails_its_clip_not_the_run(tmp_path):
    """Seen: an audio-only .mp4 stopped the whole run with IndexError (streams.video[0]) from inside write_frames."""
    raw = make_ks_release(tmp_path / "raw")
    silent_film = next(raw.rglob("--4-0ihtnBU_000058_000068.mp4"))
    write_audio_only(silent_film, 2)
    summary = data.prepare("ks", raw, tmp_path / "ks", workers=1)
    assert summary["done"] == 6
    assert summary["failed"] == [f"--4-0ihtnBU_000058_000068: ValueError: {silent_film} has no video track"]
    assert not list((tmp_path / "ks").rglob("*.part"))  # its audio, written first, is not left behind
    assert not (tmp_path / "ks" / "audio" / "--4-0ihtnBU_000058_000068.wav").exists()


def test_the_command_line_and_a_missing_pyav(releases, tmp_path, monkeypatch, capsys):
    run = subprocess.run([sys.executable, "data.py", "prepare", "ave", "--source", str(releases["ave"]),
                          "--root", str(tmp_path / "ave"), "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "prepare ave: 4 clips in the lists" in run.stdout and "done 4" in run.stdout
    with pytest.raises(SystemExit) as stopped:
        data.main(["prepare", "ks", "--source", str(tmp_path / "nowhere"), "--root", str(tmp_path / "ks")])
    assert stopped.value.code == 2 and "nowhere is not a directory" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ImportError, match=r"pip install av"):
        data.prepare("ave", releases["ave"], tmp_path / "none")


def test_a_release_without_its_split_lists_is_refused_and_leaves_no_root(tmp_path):
    raw = tmp_path / "raw"
    make_cremad_release(raw)
    for listed in raw.rglob("*.csv"):
        listed.unlink()
    with pytest.raises(FileNotFoundError, match="no split list test.csv under the source"):
        data.prepare("cremad", raw, tmp_path / "cremad", workers=1)
    assert not (tmp_path / "cremad").exists()  # a failed start writes nothing


def test_a_tilde_in_source_and_root_is_the_home_folder(releases, tmp_path, monkeypatch):
    """`--root=~/ave` reaches data.py unexpanded (bash expands `--root ~/ave` only): not a folder named "~"."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "AVE_Dataset").symlink_to(releases["ave"])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    summary = data.prepare("ave", "~/AVE_Dataset", "~/prepared-ave", workers=1)
    assert summary["done"] == 4 and (home / "prepared-ave" / "trainSet.txt").is_file()
    assert not (tmp_path / "~").exists()
