"""Bad input on the data side (issue 17): split entries that leave the data root, stray Food-101 folders,
MM-IMDb movies without a genre list. Each is found when the dataset is built, by name."""
import json
import shutil

import pytest

import data
from test_data import make_ave, make_cremad, make_food101, make_ks, make_mmimdb, write_clip


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


def test_mmimdb_movie_without_a_plot_names_its_file(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "dataset" / "0001.json").write_text(json.dumps({"genres": ["Drama"], "plot": []}))
    with pytest.raises(ValueError, match=r'mmimdb: .*0001.json: "plot" is \[\], not a list of summaries'):
        data.make_dataset("mmimdb", root, "train")
    with pytest.warns(UserWarning, match=r"1 of 3 movies have no plot \(e.g. .*0001.json\)"):
        ds = data.make_dataset("mmimdb", root, "train", on_error="skip")
    assert ds.present[0].tolist() == [True, False] and ds[0]["image"] is not None  # the image is still usable
