"""Experiments a researcher can cite: several seeds and methods in one command (one folder per pair), the
summary over seeds (mean, sample SD, n) beside the paper's numbers, resume and eval-only on such a folder,
and data that is the same for every run seed. Tiny runs on the synthetic data (seconds each)."""
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

import data
import test_data
import train
import u2a

TINY = ["--limit", "48", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--workers", "0",
        "--method", "u2a", "naive", "--seed", "0", "1"]
PAIRS = [(seed, method) for seed in (0, 1) for method in ("u2a", "naive")]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One 2-seed x 2-method run, shared by the tests that only read it (they copy it before changing it)."""
    out = tmp_path_factory.mktemp("grid") / "run"
    returned = train.main(TINY + ["--out", str(out)])
    return out, returned


def metrics_of(out, seed, method):
    return json.loads((out / f"seed{seed}" / method / "metrics.json").read_text())


def test_each_pair_trains_in_its_folder_and_the_summary_is_computed_from_their_metrics(grid):
    out, returned = grid
    assert {seed: set(by_method) for seed, by_method in returned.items()} == {0: {"u2a", "naive"}, 1: {"u2a", "naive"}}
    for seed, method in PAIRS:
        saved = metrics_of(out, seed, method)
        assert saved["method"] == method and saved["scenarios"] == returned[seed][method]["scenarios"]
        assert u2a.open_checkpoint(out / f"seed{seed}" / method / "best.safetensors")[1]["config"]["seed"] == seed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["naive", "u2a"]  # u2a.METHODS' order
    for method, by_scenario in summary.items():
        runs = [metrics_of(out, seed, method)["scenarios"] for seed in (0, 1)]
        assert list(by_scenario) == list(runs[0])  # every scenario name of metrics.json
        for name, cell in by_scenario.items():
            values = [r[name]["accuracy"] for r in runs]
            assert cell == {"mean": pytest.approx(statistics.mean(values)), "sd": pytest.approx(statistics.stdev(values)),
                            "n": 2, "paper": None}  # synthetic: the paper reports none
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| image 100% + text 0% |"))
    cell = summary["u2a"]["image 100% + text 0%"]
    assert f"{cell['mean']:.2f} ± {cell['sd']:.2f} (n=2)" in row
    assert row.endswith(f"| {data.bayes_ceiling('synthetic')['image']:.2f} |")  # the Bayes ceiling column
    assert "not one of its experiments" in md


def test_the_seed_drives_training_not_the_data(grid):
    out, _ = grid
    a, b = metrics_of(out, 0, "u2a"), metrics_of(out, 1, "u2a")
    assert a["test_samples"] == b["test_samples"] and a["scenarios"] != b["scenarios"]
    for seed in (0, 1):
        args, _ = train.parse_args(["--limit", "200", "--seed", str(seed), "--train-missing-rate", "0.7",
                                    "--train-missing-type", "both"])
        sets = train.build_splits(args, data.dataset_info(args.data, args.data_root))
        if seed == 0:
            first = sets
            continue
        for split in ("train", "val", "test"):  # the same samples and labels, whatever the run seed
            assert torch.equal(sets[split].labels, first[split].labels)
            for m in ("image", "text"):
                same = [torch.equal(x, y) if torch.is_tensor(x) else x == y
                        for x, y in zip(sets[split].sources[m], first[split].sources[m])]
                assert all(same), (split, m)
        assert not torch.equal(sets["train"].present, first["train"].present)  # the missing table is the seed's


def test_two_run_seeds_carve_the_same_validation_split_from_a_real_layout(tmp_path):
    root = test_data.make_food101(tmp_path / "food101")
    splits = []
    for seed in (0, 1):
        args, _ = train.parse_args(["--data", "food101", "--data-root", str(root), "--seed", str(seed)])
        sets = train.build_splits(args, data.dataset_info(args.data, args.data_root))
        splits.append({split: (ds.sources, ds.labels.tolist()) for split, ds in sets.items()})
    assert splits[0] == splits[1] and len(splits[0]["val"][1]) > 0


def test_resume_finishes_only_the_unfinished_pair(grid, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(grid[0], out)
    unfinished = out / "seed1" / "u2a"
    for name in ("metrics.json", "best.safetensors", "last.safetensors"):  # as if killed before its checkpoint
        (unfinished / name).unlink()
    kept = {pair: (out / f"seed{pair[0]}" / pair[1] / "metrics.json").stat().st_mtime_ns for pair in PAIRS
            if pair != (1, "u2a")}
    capsys.readouterr()
    resumed = train.main(["--resume", "--out", str(out)])  # every setting, seeds and methods too, from the folder
    printed = capsys.readouterr().out
    assert printed.count("finished, read back") == 3 and "run 3 of 4: u2a, seed 1" in printed
    assert printed.count("epoch 1/1: val") == 1  # only the unfinished pair trained
    for (seed, method), mtime in kept.items():
        assert (out / f"seed{seed}" / method / "metrics.json").stat().st_mtime_ns == mtime
    # retrained from scratch with its own seed, it gives the numbers of the uninterrupted run
    assert resumed[1]["u2a"]["scenarios"] == metrics_of(grid[0], 1, "u2a")["scenarios"]
    assert json.loads((out / "summary.json").read_text()) == json.loads((grid[0] / "summary.json").read_text())
    # the killed run's log lines after its (absent) checkpoint are dropped, not kept beside the new ones
    logged = lambda folder: [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                             for line in (folder / "seed1" / "u2a" / "log.jsonl").read_text().splitlines()]
    assert logged(out) == logged(grid[0])


def test_a_new_run_into_a_multi_run_folder_is_refused(grid, tmp_path):
    # a run's files in seed<k>/<method>/ make the folder a run's, even without its config.json: only --resume
    # may write into it
    out = tmp_path / "run"
    shutil.copytree(grid[0], out)
    (out / "config.json").unlink()
    assert u2a.run_files(out)[0].parent.parent.name == "seed0"
    with pytest.raises(SystemExit):
        train.main(TINY + ["--out", str(out)])


def test_resume_of_a_folder_written_with_one_seed_per_command_keeps_its_seed(tmp_path):
    out = tmp_path / "run"
    train.main(TINY[:-6] + ["--method", "u2a", "--seed", "5", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    del config["seeds"]  # as the previous version wrote it: "seed": 5 only
    (out / "config.json").write_text(json.dumps(config))
    for name in ("metrics.json", "best.safetensors", "last.safetensors"):
        (out / name).unlink()
    train.main(["--resume", "--out", str(out)])
    assert u2a.open_checkpoint(out / "best.safetensors")[1]["config"]["seed"] == 5


def test_eval_only_on_the_folder_evaluates_every_checkpoint(grid, tmp_path, capsys):
    out, returned = grid
    again = train.main(["--eval-only", str(out), "--out", str(tmp_path / "eval")])
    assert {seed: set(by_method) for seed, by_method in again.items()} == {0: {"u2a", "naive"}, 1: {"u2a", "naive"}}
    for seed, method in PAIRS:
        assert again[seed][method]["scenarios"] == returned[seed][method]["scenarios"]
        assert (tmp_path / "eval" / f"seed{seed}" / method / "metrics.json").is_file()  # the folder's layout
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == \
        json.loads((out / "summary.json").read_text())
    picked = train.main(["--eval-only", str(out), "--out", str(tmp_path / "one"), "--seed", "1", "--method", "naive"])
    assert set(picked) == {"naive"} and picked["naive"]["scenarios"] == returned[1]["naive"]["scenarios"]
    with pytest.raises(train.UserError, match="none of its checkpoints"):
        train.main(["--eval-only", str(out), "--out", str(tmp_path / "none"), "--seed", "7"])


def test_a_seed_named_twice_is_refused():
    with pytest.raises(SystemExit):
        train.parse_args(["--seed", "0", "1", "0"])


def test_the_paper_column_on_a_food101_layout(published_weights, tmp_path):
    root = test_data.make_food101(tmp_path / "food101")
    out = tmp_path / "run"
    train.main(["--data", "food101", "--data-root", str(root), "--weights", str(published_weights), "--out", str(out),
                "--epochs", "1", "--batch-size", "4", "--workers", "0", "--warmup-epochs", "0", "--method", "u2a",
                "--seed", "0", "1"])
    summary = json.loads((out / "summary.json").read_text())["u2a"]
    paper = {name: cell["paper"] for name, cell in summary.items() if cell["paper"] is not None}
    assert paper == {"image 100% + text 100%": 94.47, "image 100% + text 0%": 75.66, "image 0% + text 100%": 80.66}
    assert all(cell["n"] == 2 and cell["sd"] is not None for cell in summary.values())
    md = (out / "summary.md").read_text()
    assert "| 94.47 (Table 1) |" in md and "| 75.66 (Table 4) |" in md
    assert "carved from train" in md and "22,716" in md and "--epochs 1 (paper: 10)" in md


def test_tables_3_and_6_follow_the_training_setting():
    trained = lambda rate, kind: data.present_shares(("image", "text"), rate, kind)
    assert data.paper_result("mmimdb", trained(0.7, "text"), {"image": 100.0, "text": 30.0}) == (52.61, 0.12, 3)  # = Table 6's diagonal
    assert data.paper_result("mmimdb", trained(0.7, "text"), {"image": 30.0, "text": 100.0}) == (44.72, 0.46, 6)
    assert data.paper_result("mmimdb", trained(0.7, "text"), {"image": 100.0, "text": 0.0}) is None  # Table 4 is for complete training
    assert data.paper_result("mmimdb", trained(0.7, "both"), {"image": 65.0, "text": 65.0}) == (54.04, 0.23, 3)
    assert data.paper_result("mmimdb", trained(0.5, "both"), {"image": 75.0, "text": 75.0}) is None  # not the paper's eta


def test_the_summary_names_every_setting_that_makes_the_run_another_experiment(tmp_path):
    """The summary puts the paper's U2A number beside a run, and its notes say where the run differs. Seen: a
    Food-101 run with --align-stop-grad --token-lr-scale 10 (eq. 6 as written moves both tokens; Table 5 has one
    learning rate), and one with 70% of texts missing and --modality-dropout on (section 3: the paper does not drop
    there), showed the paper's numbers and named none of it: only Table 5's keys were compared."""
    info = data.dataset_info("food101")

    def summary(**given):
        args = train.settings({"data": "food101", **given})
        results = {sc.name: {"groups": list(sc.groups), "shares": sc.shares, "accuracy": 50.0}
                   for sc in data.eval_scenarios(info, args.train_missing_rate, args.train_missing_type)}
        train.report({(0, "u2a"): {"scenarios": results}}, info, args, tmp_path, {"train": 9, "val": 1, "test": 5})
        return (tmp_path / "summary.md").read_text()

    md = summary(align_stop_grad=True, mt_init="random", token_lr_scale=10.0)
    assert "| 94.47 (Table 1) |" in md
    assert "--align-stop-grad True (paper: False)" in md and "--token-lr-scale 10.0 (paper: 1.0)" in md
    assert "--mt-init" not in md  # the paper does not say how the MT starts (README, "Choices the paper leaves open")
    md = summary(train_missing_rate=0.7, train_missing_type="text", modality_dropout="on")
    assert "| 80.37 ± 0.18 (Table 3) |" in md and "--modality-dropout on (paper: auto)" in md
    assert "--modality-dropout" not in summary(modality_dropout="on")  # complete training: what auto does
    assert "settings other than" not in summary()


@pytest.mark.parametrize("rate, kind, training", [(0.0, None, "complete"), (0.7, "both", "both missing 70%")])
def test_a_runs_printed_tables_say_how_it_was_trained(rate, kind, training, capsys):
    """Seen: a run trained with both modalities 70% missing printed "Table 4 (trained on complete data, ...)"."""
    info = data.dataset_info("synthetic")
    results = {sc.name: {"groups": list(sc.groups), "shares": sc.shares, "accuracy": 50.0}
               for sc in data.eval_scenarios(info, rate, kind)}
    data.print_tables(results, info, (rate, kind), "u2a, seed 0")
    printed = capsys.readouterr().out
    assert f"Table 4 (training: {training}; one modality missing at test)" in printed
    assert f"Tables 3 and 6 (training: {training}; test:)" in printed and "complete data" not in printed


def test_the_library_finds_the_runs_of_a_multi_seed_folder(grid):
    """u2a.run_folders is the one description of the layout: train.py writes by it, u2a.checkpoint_file and
    the notebooks' helpers read by it."""
    grid, _ = grid
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
    import helpers
    with pytest.raises(ValueError, match=r"holds 4 checkpoints: seed0/naive/best.safetensors"):
        u2a.checkpoint_file(grid)
    assert u2a.checkpoint_file(grid / "seed1" / "u2a") == grid / "seed1" / "u2a" / "best.safetensors"
    assert helpers.method_folders(grid / "seed1") == {"u2a": grid / "seed1" / "u2a", "naive": grid / "seed1" / "naive"}
    with pytest.raises(FileNotFoundError, match="several seeds' runs: pass one of seed0, seed1"):
        helpers.method_folders(grid)
