"""benchmarks/peers.py end to end on a few hundred images, every arm but the Ray job's: each arm
trains for its budget and is scored, and a second invocation resumes (skips what is done)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["lightly_dino", "lightly_dino_tuned", "lightly_loss_in_rayssl",
        "rayssl_none", "rayssl_center", "rayssl_prior", "rayssl_sinkhorn"]


def peers_cli(out: Path, fashion_mnist_dir: str) -> list[str]:
    return ["--dataset", "fashion-mnist", "--budget", "1s", "--seeds", "0", "--limit", "300", "--inline",
            "--loader-workers", "0", "--data-dir", fashion_mnist_dir, "--out", str(out), "--arms", *ARMS,
            "--tuned", "output_dim=256", "batch_norm=true"]


def in_process(monkeypatch, cli: list[str], run_one) -> None:
    """``peers.py CLI`` in this process, with ``run_one`` (one arm's training) replaced."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    monkeypatch.setattr(peers, "run_one", run_one)
    monkeypatch.setattr(sys, "argv", ["peers.py", *cli])
    peers.main()


@pytest.mark.slow  # benchmarks/peers.py in its own interpreter, 7 arms and their scoring: 20 s and more
def test_peers_runs_every_arm_and_resumes(tmp_path, fashion_mnist_dir, monkeypatch, capsys):
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/peers.py"), *peers_cli(out, fashion_mnist_dir)],
                          capture_output=True, text=True, timeout=300)  # 7 interpreters: minutes on a busy CPU
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["runs"]) == set(ARMS)
    for arm, seeds in results["runs"].items():
        row = seeds["0"]
        assert 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["linear"] <= 1.0, (arm, row)
        assert math.isfinite(row["knn"]) and row["steps"] > 0 and row["images_per_second"] > 0, (arm, row)
        assert 0.5 <= row["train_seconds"] <= 30, (arm, row["train_seconds"])  # the budget, not its schedule (minutes); a busy CPU makes a step seconds
        assert len(row["curve"]) >= 2 and row["curve"][-1][0] == row["train_seconds"], (arm, row["curve"])
    assert results["runs"]["lightly_dino_tuned"]["0"]["knobs"]["output_dim"] == 256
    assert "effective_clusters" in results["runs"]["rayssl_prior"]["0"]
    # the summary the README's table reads: one entry per arm, its seeds' k-NN and their mean
    assert [a["name"] for a in results["arms"]] == list(results["runs"]) and results["budget_s"] == 1
    for a in results["arms"]:
        assert set(a) >= {"name", "seeds", "knn", "knn_mean", "knn_sd", "linear_mean", "img_s", "wall_s", "peak_rss_mb"}
        assert a["seeds"] == [0] and a["knn"] == [results["runs"][a["name"]]["0"]["knn"]]
        assert a["knn_mean"] == round(a["knn"][0], 4) and a["knn_sd"] is None and a["peak_rss_mb"] > 0
    assert set(results["baselines"]) == {"raw_pixels", "random_init"}
    assert "| rayssl_prior | 1 |" in done.stdout and (tmp_path / "peers.png").stat().st_size > 0

    def run_one(args, arm, seed):
        raise AssertionError(f"{arm} seed {seed} ran again")

    in_process(monkeypatch, peers_cli(out, fashion_mnist_dir), run_one)  # the same command again
    assert capsys.readouterr().out.count("done, skipped") == len(ARMS)
    assert json.loads(out.read_text()) == results  # nothing re-ran


def test_a_first_layout_json_reads_as_today_s_with_its_arms_renamed_and_summarised(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    run = {"knn": 0.8, "linear": 0.85, "steps": 10, "images_per_second": 100.0, "train_seconds": 60.0,
           "peak_rss_mb": 500.0, "loader_peak_rss_mb": 100.0}
    old = {"dataset": "fashion-mnist", "split": "val", "budget": "1m", "limit": None, "cpu": {},
           "baselines": None, "arms": {"lightly_dino_example": {"0": run, "1": {**run, "knn": 0.9}}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    results = peers.read(path)
    assert list(results["runs"]) == ["lightly_dino"] and results["budget_s"] == 60
    (arm,) = results["arms"]
    assert arm["name"] == "lightly_dino" and arm["knn"] == [0.8, 0.9] and arm["seeds"] == [0, 1]
    assert arm["knn_mean"] == 0.85 and abs(arm["knn_sd"] - 0.0707) < 1e-4 and arm["peak_rss_mb"] == 600.0


def test_the_modes_table_gives_each_mode_s_information_and_clusters_over_its_seeds(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    run = {"knn": 0.8, "linear": 0.85, "steps": 10, "images_per_second": 100.0, "train_seconds": 60.0,
           "peak_rss_mb": 500.0, "I(X;K)": 2.0, "effective_clusters": 100.0}
    results = {"dataset": "scenes", "split": "val", "budget": "6m", "cpu": {"model": "x", "avx512_bf16": True},
               "runs": {"lightly_dino": {"0": run}, "rayssl_prior": {"0": run, "1": {**run, "I(X;K)": 3.0}},
                        "rayssl_none": {"0": {**run, "knn": 0.5, "I(X;K)": 0.1, "effective_clusters": 2.4}}},
               "arms": []}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(results))
    rows = [line for line in peers.modes_table(peers.read(path)).splitlines() if line.startswith("| rayssl_")]
    assert rows == ["| rayssl_none | 1 | 50.0 | 85.0 | 0.10 | 2 |",     # MODES' order, not the runs'
                    "| rayssl_prior | 2 | 80.0 ± 0.0 | 85.0 | 2.50 | 100 |"]
    assert peers.modes_table({**results, "arms": [peers.summary("lightly_dino", {"0": run})]}) == ""


def test_a_steps_plot_draws_each_seed_s_pair_and_the_pairs_get_their_sd_and_interval():
    """``--steps`` results (the control, compared seed by seed): one line per arm and seed, at the
    steps train_loop scores, one colour per seed and one style per arm; budget results: one line per
    arm, the mean over its seeds, over seconds. The pairs' line gives sd and the t interval."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    def run(knn: float, *curve: float) -> dict:
        return {"knn": knn, "curve": [[100.0 * i, y] for i, y in enumerate(curve, 1)]}

    runs = {"rayssl_center": {"2": run(0.39, 0.27, 0.30, 0.32, 0.39), "0": run(0.56, 0.41, 0.48, 0.52, 0.56)},
            "lightly_loss_in_rayssl": {"0": run(0.55, 0.40, 0.49, 0.52, 0.55), "2": run(0.36, 0.28, 0.27, 0.28, 0.36),
                                       "3": run(0.56, 0.40, 0.49, 0.52, 0.56)}}
    got = peers.lines({"steps": 1300, "runs": runs})
    assert [line["label"] for line in got] == ["rayssl_center seed 0", "rayssl_center seed 2", "lightly_loss_in_rayssl seed 0",
                                               "lightly_loss_in_rayssl seed 2", "lightly_loss_in_rayssl seed 3"]
    assert all(line["x"] == [325, 650, 975, 1300] for line in got)
    assert [line["y"] for line in got][1] == [27.0, 30.0, 32.0, 39.0]
    assert [line["color"] for line in got] == ["C0", "C2", "C0", "C2", "C3"]
    assert {line["style"] for line in got[:2]} == {"-"} and {line["style"] for line in got[2:]} == {"--"}
    (center, lightly) = peers.lines({"runs": runs})  # a budget's results: the mean over seconds
    assert center["label"] == "rayssl_center (seeds 0, 2)" and center["x"] == [100.0, 200.0, 300.0, 400.0]
    assert [round(y, 2) for y in center["y"]] == [34.0, 39.0, 42.0, 47.5] and lightly["label"].endswith("(seeds 0, 2, 3)")
    (_, said) = peers.paired({"runs": runs}, "rayssl_center", "lightly_loss_in_rayssl")
    # differences +1 and +3: mean 2, sd sqrt 2, standard error 1, t(0.975, 1 df) = 12.706
    assert said.endswith("+1.0 (seed 0), +3.0 (seed 2); mean +2.00 (sd 1.41 over 2 pairs; 95 % interval -10.71 to +14.71)")
    (_, one) = peers.paired({"runs": {**runs, "rayssl_center": {"0": runs["rayssl_center"]["0"]}}},
                            "rayssl_center", "lightly_loss_in_rayssl")
    assert one.endswith("+1.0 (seed 0); mean +1.00"), one


def test_two_invocations_with_one_out_add_to_it_side_by_side(tmp_path, monkeypatch, capsys):
    """Arms run side by side (one process each, ``--threads 1``) share one ``--out``: a run the other
    invocation wrote while this one trained is kept when this one saves, and both are summarised."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    out = tmp_path / "pair.json"
    cli = ["--dataset", "fashion-mnist", "--steps", "5", "--seeds", "1", "--inline", "--out", str(out), "--arms"]
    run = {"knn": 0.5, "linear": 0.6, "steps": 5, "images_per_second": 9.0, "curve": [[1.0, 0.4], [2.0, 0.5]]}

    def baselines_then(arm_run):
        return lambda args, arm, seed: {"raw_pixels": {"knn": 0.3, "linear": 0.2}} if arm == "baselines" else arm_run(arm, seed)

    def center_while_lightly_ends(arm, seed):  # the other invocation saves its arm while this one trains
        other = peers.load_results(argparse.Namespace(out=str(out), dataset="fashion-mnist", split="val", budget="6m",
                                                      steps=5, precision="auto", limit=None, set=[]))
        other["runs"]["lightly_loss_in_rayssl"] = {str(seed): {**run, "knn": 0.45}}
        peers.save(other, str(out))
        return run

    in_process(monkeypatch, [*cli, "rayssl_center"], baselines_then(center_while_lightly_ends))
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"rayssl_center", "lightly_loss_in_rayssl"}, results["runs"]
    assert [a["knn"] for a in results["arms"]] == [[0.5], [0.45]] and results["baselines"]["raw_pixels"]["knn"] == 0.3
    assert "rayssl_center - lightly_loss_in_rayssl, k-NN points, same seed: +5.0 (seed 1)" in capsys.readouterr().out


def test_an_invocation_with_other_settings_stops_at_save_and_the_json_is_kept(tmp_path, monkeypatch):
    """Two invocations that created one ``--out`` at once with other settings (here fp64 and auto
    precision) would mix incomparable runs in one arm: the second save stops, naming the file and
    the key; the JSON keeps what the first wrote, and the second's runs go to a file beside it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    out = tmp_path / "pair.json"
    run = {"knn": 0.5, "linear": 0.6, "steps": 5, "images_per_second": 9.0, "curve": [[1.0, 0.5]]}

    def fresh(precision):
        return peers.load_results(argparse.Namespace(out=str(out), dataset="scenes", split="val", budget="6m",
                                                     steps=5, precision=precision, limit=None, set=[]))
    fp64, auto = fresh("fp64"), fresh("auto")  # both before either saved
    fp64["runs"]["rayssl_center"] = {"1": run}
    peers.save(fp64, str(out))
    auto["runs"]["rayssl_center"] = {"2": {**run, "knn": 0.4}}
    with pytest.raises(SystemExit, match=r"pair\.json: precision is 'fp64', not 'auto'") as stop:
        peers.save(auto, str(out))
    assert json.loads(out.read_text())["runs"] == {"rayssl_center": {"1": run}}
    kept = tmp_path / f"pair-{os.getpid()}.json"  # the second invocation's run is not lost either
    assert str(kept) in str(stop.value) and json.loads(kept.read_text())["runs"]["rayssl_center"]["2"]["knn"] == 0.4
    with pytest.raises(SystemExit, match=r"pair\.json: precision is 'fp64', not 'auto'; use another --out$"):
        fresh("auto")  # a later invocation is stopped before it trains


def test_tune_walks_every_step_keeps_only_what_beats_the_best_and_resumes(tmp_path, monkeypatch, capsys):
    """The greedy walk, with each probe's k-NN given: a step is kept when it beats the best so far,
    and the next step starts from the knobs kept; a second run re-runs nothing. (The probes'
    training itself is the lightly_dino_tuned arm of the test above.)"""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    knn = {"the example": 0.70, "channels-last": 0.72, "adamw, weight decay 0.04": 0.71, "lr 0.002": 0.75}
    ran = []

    def run_one(args, arm, seed):
        knobs = {**peers.TUNED, **peers.tuned_knobs(args.tuned)}
        label = [("the example", {}), *peers.TUNE_STEPS][len(ran)][0]  # the walk's order
        ran.append((label, knobs))
        return {"knn": knn[label], "linear": knn[label], "steps": 3, "images_per_second": 9.0}

    cli = ["--dataset", "fashion-mnist", "--budget", "1s", "--inline", "--out", str(tmp_path / "peers.json"),
           "--tune", "--tune-steps", "3"]
    in_process(monkeypatch, cli, run_one)
    log = json.loads((tmp_path / "peers-fashion-mnist-tuning.json").read_text())
    assert [p["name"] for p in log["probes"]] == list(knn) == [label for label, _ in ran]
    assert [p.get("kept") for p in log["probes"]] == [None, True, False, True]
    assert ran[2][1]["channels_last"] is True and ran[2][1]["optimizer"] == "adamw"  # on top of the kept step
    assert ran[3][1]["optimizer"] == "adam" and ran[3][1]["lr"] == 0.002  # the dropped one is not carried
    assert log["best"] == {**peers.TUNED, "channels_last": True, "lr": 0.002} and log["best_knn"] == 0.75
    assert "tuned: lr=0.002 channels_last=true (k-NN 75.0 %, val)" in capsys.readouterr().out
    in_process(monkeypatch, cli, run_one)
    assert len(ran) == 4 and "tuning:" not in capsys.readouterr().out  # every probe was done: none re-ran


def test_tune_resumes_a_log_written_before_a_knob_was_added(tmp_path, monkeypatch):
    """Probes logged without a knob added since (here ``bf16``) are the same probes at its default:
    none re-runs, and the walk goes on from the best of them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    old = {k: v for k, v in peers.TUNED.items() if k != "bf16"}
    done = [("the example", {}, 0.70), ("channels-last", {"channels_last": True}, 0.72),
            ("adamw, weight decay 0.04", {"optimizer": "adamw", "weight_decay": 0.04, "channels_last": True}, 0.71)]
    log = {"dataset": "fashion-mnist", "split": "val", "budget": "1s", "seed": 0,
           "probes": [{"name": n, "knobs": {**old, **k}, "knn": knn, "linear": knn, "steps": 1, "img_s": 1.0}
                      for n, k, knn in done]}
    (tmp_path / "peers-fashion-mnist-tuning.json").write_text(json.dumps(log))
    launched = []

    def launch(args, arm, seed):
        launched.append(dict(item.split("=", 1) for item in args.tuned))
        return {"knn": 0.6, "linear": 0.6, "steps": 1, "images_per_second": 1.0}

    monkeypatch.setattr(peers, "launch", launch)
    args = argparse.Namespace(out=str(tmp_path / "peers.json"), dataset="fashion-mnist", split="val", budget="1s",
                              tune_steps=3)
    result = peers.tune(args)
    assert len(launched) == 1 and launched[0]["channels_last"] == "true" and launched[0]["lr"] == "0.002"
    assert [p["name"] for p in result["probes"]] == ["the example", "channels-last", "adamw, weight decay 0.04",
                                                     "lr 0.002"]
    assert result["best"]["channels_last"] is True and result["best_knn"] == 0.72


def test_steps_trains_the_harness_arms_exactly_that_many_steps_and_pairs_center_with_lightly_s_loss(
        tmp_path, fashion_mnist_dir, monkeypatch, capsys):
    """``--steps``: the objective's control. Same seed, same steps: ``rayssl_center`` and lightly's
    ``DINOLoss`` in the harness (the same equation) end with the same k-NN, and the modes table
    pairs them seed by seed. A non-harness arm is refused (it has no fixed step count, nor --precision)."""
    out = tmp_path / "steps.json"
    cli = ["--dataset", "fashion-mnist", "--steps", "6", "--seeds", "0", "--limit", "300", "--inline", "--threads", "2",
           "--data-dir", fashion_mnist_dir, "--out", str(out), "--arms", "rayssl_center", "lightly_loss_in_rayssl"]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    monkeypatch.setattr(sys, "argv", ["peers.py", *cli])
    peers.main()
    results = json.loads(out.read_text())
    center, lightly = (results["runs"][arm]["0"] for arm in ("rayssl_center", "lightly_loss_in_rayssl"))
    assert results["steps"] == 6 and center["steps"] == lightly["steps"] == 6 and center["budget_fixed_by"] == "steps"
    assert center["threads"] == lightly["threads"] == 2
    assert center["curve"][-1][1] == lightly["curve"][-1][1] and center["knn"] == lightly["knn"], (center, lightly)
    said = capsys.readouterr().out
    assert "fashion-mnist, val split, 6 steps per arm" in said and "[peers] rayssl_center seed 0: 6 steps\n" in said, said
    assert "rayssl_center - lightly_loss_in_rayssl, k-NN points, same seed: +0.0 (seed 0); mean +0.00" in said, said
    monkeypatch.setattr(sys, "argv", ["peers.py", *cli[:-2], "lightly_dino"])
    with pytest.raises(SystemExit) as stop:
        peers.main()
    assert stop.value.code == 2
    assert "--steps: only the harness arms" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["peers.py", "--dataset", "fashion-mnist", "--budget", "1s", "--limit", "300", "--inline",
                                      "--data-dir", fashion_mnist_dir, "--out", str(tmp_path / "precision.json"),
                                      "--arms", "lightly_dino", "--precision", "fp64"])
    with pytest.raises(SystemExit) as stop:
        peers.main()
    assert stop.value.code == 2
    assert "--precision: only the harness arms" in capsys.readouterr().err


def test_set_changes_a_knob_in_every_harness_arm_and_its_json_keeps_only_runs_with_that_knob(
        tmp_path, fashion_mnist_dir, monkeypatch, capsys):
    """``--set``: the same harness with a knob changed, for both arms of the pair. The override reaches
    each arm's config (64 clusters: at most 64 effective ones), the JSON and the table name it, and an
    invocation without it stops before it trains into that JSON. Overrides the other flags own, keys
    rayssl's config lacks, and the arms that do not read rayssl's config are refused, naming why."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    out = tmp_path / "k64.json"
    cli = ["--dataset", "fashion-mnist", "--steps", "3", "--seeds", "0", "--limit", "300", "--inline", "--threads", "2",
           "--data-dir", fashion_mnist_dir, "--out", str(out), "--arms", "rayssl_center", "lightly_loss_in_rayssl"]
    monkeypatch.setattr(sys, "argv", ["peers.py", *cli, "--set", "objective.num_clusters=64"])
    peers.main()
    results = json.loads(out.read_text())
    assert results["set"] == ["objective.num_clusters=64"]
    for arm in ("rayssl_center", "lightly_loss_in_rayssl"):
        assert 1 <= results["runs"][arm]["0"]["effective_clusters"] <= 64, results["runs"][arm]
    said = capsys.readouterr().out
    assert "[peers] rayssl_center seed 0: 3 steps (objective.num_clusters=64)\n" in said, said
    assert "fashion-mnist, val split, 3 steps per arm (objective.num_clusters=64)" in said, said
    monkeypatch.setattr(sys, "argv", ["peers.py", *cli])
    with pytest.raises(SystemExit, match=r"k64\.json: set is \['objective\.num_clusters=64'\], not \[\]; use another --out"):
        peers.main()
    lightly = ["--dataset", "fashion-mnist", "--budget", "1s", "--inline", "--out", str(tmp_path / "l.json"), "--arms", "lightly_dino"]
    for bad, why in (([*cli, "--set", "objective.mode=prior"], "--set: objective.mode is set by --arms, --seeds or --precision"),
                     ([*cli, "--set", "objective.num_cluster=64"], "--set: objective.num_cluster"),
                     ([*lightly, "--set", "optim.lr=0.001"], "--set: only the harness arms")):
        monkeypatch.setattr(sys, "argv", ["peers.py", *bad])
        with pytest.raises(SystemExit) as stop:
            peers.main()
        err = capsys.readouterr().err
        assert stop.value.code == 2 and why in err and len(err.strip().splitlines()[-1]) < 300, err
