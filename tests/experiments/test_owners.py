"""`python -m experiments.owners --scale smoke`: real data of four owners who differ, real `recognizer
train` processes and real federations (an aggregator and an edge agent per owner over mutual TLS),
for two of the runs: alone from the warm-up model, and federated with warm-up and personalization with
the edges' own models (the other federations, the mini data's too, are runs like it with less). A
rerun repeats nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import cli as edge_cli
from experiments import owners
from experiments.owners import OWNERS, SCALES
from recognizer.lmdb_data import LmdbReader
from recognizer.shard import label_kind

REPO = Path(__file__).resolve().parents[2]
SMOKE = SCALES["smoke"]
RUNS = ("alone-warmup", "personal-own-warmup")


def _owners(tmp: Path, *runs: str, results: Path | None = None) -> subprocess.CompletedProcess:
    """The smoke scale's ``runs`` with their work under ``tmp`` (and results there, or in ``results``)."""
    cmd = [sys.executable, "-m", "experiments.owners", "--scale", "smoke", "--work", str(tmp / "work"),
           "--results", str(results or tmp / "results"), "--runs", ",".join(runs)]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("owners")
    proc = _owners(tmp, *RUNS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def _result(tmp: Path, run: str) -> dict:
    return json.loads((tmp / "results" / f"{run}.json").read_text())


@pytest.mark.timeout(600)
def test_each_owner_holds_its_own_kind_and_a_held_out_set_of_it(smoke: Path) -> None:
    data = smoke / "work" / "data"
    for owner in OWNERS:
        shard, test = LmdbReader(data / "shards" / owner.name), LmdbReader(data / "test" / owner.name)
        assert len(shard) == max(8, round(owner.words * SMOKE.size)) and len(test) == SMOKE.test_words
        val = LmdbReader(data / "val" / owner.name)  # the edge's --val: other images than the test set's
        assert len(val) == SMOKE.val_words and val.get_raw(0)[0] != test.get_raw(0)[0]
        styles = {shard.get_raw(i)[2] for i in range(len(shard))}
        assert styles <= {s for part in owner.parts for s in part.styles.split(",")}, owner.name
        if all(part.labels == "digits" for part in owner.parts):
            assert {label_kind(shard.get_label(i)) for i in range(len(shard))} == {"digits"}
    dirichlet = [LmdbReader(data / "mini" / "dirichlet" / f"shard{k}") for k in range(SMOKE.mini_edges)]
    assert sum(len(r) for r in dirichlet) == SMOKE.mini_words


def test_alone_runs_score_every_owner_on_its_own_held_out_set(smoke: Path) -> None:
    r = _result(smoke, "alone-warmup")
    assert set(r["own"]) == {o.name for o in OWNERS}
    assert all(s["samples"] == SMOKE.test_words and 0 <= s["accuracy"] <= 1 for s in r["own"].values())
    assert set(r["seconds"]) == {"warmup", *(o.name for o in OWNERS)}  # the warm-up model, then each owner


def test_a_personalized_federation_scores_both_models_and_the_aggregator_keeps_the_evaluations(smoke) -> None:
    r = _result(smoke, "personal-own-warmup")
    names = {o.name for o in OWNERS}
    assert set(r["generic"]) == set(r["own"]) == set(r["personal"]) == set(r["own_models"]) == names
    assert all(s["samples"] == SMOKE.test_words for s in [*r["personal"].values(), *r["own_models"].values()])
    assert r["bytes_per_edge"]["wire_up"] > 0 and r["bytes_per_edge"]["wire_down"] > 0
    assert [e["round"] for e in r["rounds"]] == list(range(1, SMOKE.rounds + 1))
    # It went on from the shared warm-up: its warm-up rounds are that federation's, with the same scores
    # (the restarted edges scored the warm-up's last model again, their personal model beside it).
    done = smoke / "work" / "runs" / owners.WARMUP / "done.json"
    warmup = owners._round_evaluations(json.loads(done.read_text())["rounds"])
    assert [e["round"] for e in warmup] == list(range(1, SMOKE.warmup_rounds + 1))
    went_on = r["rounds"][: len(warmup)]
    for e in went_on:
        e["edges"] = {name: {"generic": v["generic"]} for name, v in e["edges"].items()}
    assert went_on == warmup
    last = r["rounds"][-1]["edges"]
    assert set(last) == names and all({"generic", "personal"} <= set(v) for v in last.values())
    for owner in OWNERS:  # the personal models stay on the edges: each wrote its own file
        edge = smoke / "work" / "runs" / "personal-own-warmup" / "edges" / owner.name
        assert (edge / "personal.npz").is_file() and (edge / "own.npz").is_file()
        # Each edge scored on its validation set, not the test set, and chose its personal mix by it.
        journal = [json.loads(line) for line in (edge / "rounds.jsonl").read_text().splitlines()]
        scored = [x for x in journal if x["event"] in ("round", "finished") and x.get("personal_val")]
        assert scored and all(x["personal_val"]["samples"] == SMOKE.val_words for x in scored)
        assert all(x["personal_val"]["accuracy"] >= x["val"]["accuracy"] for x in scored)
        assert all(x["own_val"]["samples"] == SMOKE.val_words for x in scored)


def test_the_shared_warm_up_row_takes_the_warm_up_the_runs_went_on_from(smoke: Path, tmp_path: Path) -> None:
    """Asked for after a run that went on from it, the shared warm-up's row scores that warm-up as it is."""
    done = smoke / "work" / "runs" / owners.WARMUP / "done.json"
    before = done.stat().st_mtime_ns
    results = tmp_path / "results"
    proc = _owners(smoke, owners.WARMUP, results=results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done.stat().st_mtime_ns == before
    r = json.loads((results / f"{owners.WARMUP}.json").read_text())
    assert r["wall_s"] == json.loads(done.read_text())["wall_s"] and set(r["own"]) == {o.name for o in OWNERS}


def test_a_rerun_repeats_nothing_and_prints_the_table(smoke: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (smoke / "results").glob("*.json")}
    assert set(before) == {f"{run}.json" for run in RUNS}
    proc = _owners(smoke, *RUNS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (smoke / "results").glob("*.json")} == before
    assert "each owner alone, from the warm-up model" in proc.stdout
    assert "FedAvg, warm-up, personalization with own models" in proc.stdout
    assert "its personal models" in proc.stdout and "its edges' own models (Ditto)" in proc.stdout


def test_long_mini_runs_double_the_rounds_and_keep_the_cosine_at_the_same_share() -> None:
    scale = SCALES["owners"]
    runs = owners.RUNS_BY_NAME
    short, long = (
        owners._settings(runs[n], scale, "fedavgm-rehearsal")
        for n in ("mini-dirichlet", "mini-dirichlet-long")
    )
    assert (short.rounds, long.rounds) == (scale.mini_rounds, 2 * scale.mini_rounds)
    # cosine over the last 3 of 8 rounds, then over the last 6 of 16
    assert short.rounds - short.lr_cosine_from_round + 1 == 3
    assert long.rounds - long.lr_cosine_from_round + 1 == 6
    best = owners._settings(runs["mini-dirichlet-best-long"], scale, "fedavgm-rehearsal")
    assert (best.server_optimizer, best.rounds) == ("fedavgm", 2 * scale.mini_rounds)
    assert all(runs[n].extra for n in ("mini-iid-long", "mini-dirichlet-long", "mini-dirichlet-best-long"))


def test_the_scales_federations_with_warm_up_rehearse_and_a_run_may_set_its_own_mu() -> None:
    scale = SCALES["owners"]
    default = [r for r in owners.RUNS if not r.extra]
    warm = [r for r in default if r.kind == "federated" and r.warmup]
    assert {r.server_optimizer for r in warm} == {"fedavg", "fedavgm", "fedadam"}
    assert any(r.proximal for r in warm) and any(r.personalize for r in warm)
    for run in warm:
        settings = owners._settings(run, scale, owners.SERVER_OPTIMIZER_RUNS[0])
        assert settings.warmup_rounds == scale.warmup_rounds and settings.warmup_rehearsal == owners.REHEARSAL
    assert set(owners.SERVER_OPTIMIZER_RUNS) <= {r.name for r in warm}
    runs = owners.RUNS_BY_NAME
    assert owners._settings(runs["fedprox-rehearsal"], scale, "").proximal_mu == scale.proximal_mu
    assert owners._settings(runs["fedprox-mu0.01-rehearsal"], scale, "").proximal_mu == 0.01
    # The shared warm-up: the warm-up rounds alone, plain FedAvg, nothing personal.
    shared = owners._settings(runs[owners.WARMUP], scale, "fedavgm-rehearsal")
    assert (shared.rounds, shared.warmup_rounds) == (scale.warmup_rounds, scale.warmup_rounds)
    assert (shared.server_optimizer, shared.lr_cosine_from_round) == ("fedavg", 0)
    assert shared.proximal_mu == 0.0 and shared.extra_edge_args == ()
    assert owners._settings(runs["personal-tune8-rehearsal"], scale, "").proximal_mu == 0.0
    best = owners._settings(next(r for r in default if r.best_optimizer), scale, "fedadam-rehearsal")
    assert (best.server_optimizer, best.server_tau, best.warmup_rounds) == ("fedadam", 0.02, 0)


def test_a_run_may_set_the_personal_models_last_fine_tune_and_the_edge_reads_it() -> None:
    scale, runs = SCALES["owners"], owners.RUNS_BY_NAME
    earlier = owners._settings(runs["personal-rehearsal2-warmup"], scale, "")
    assert earlier.extra_edge_args == ("--personalize", "--personal-epochs", "4", "--personal-lr", "0.0002")
    args = owners._settings(runs["personal-tune8-rehearsal"], scale, "").extra_edge_args
    assert args == ("--personalize", "--personal-epochs", "8", "--personal-lr", "0.002")
    given = ["--shard", "s", "--server", "h:1", "--ca", "c", "--cert", "e", "--cert-key", "k", "--key", "f"]
    parsed = edge_cli._run_parser().parse_args([*given, *args])
    assert (parsed.personalize, parsed.personal_epochs, parsed.personal_lr) == (True, 8, 0.002)


def test_the_edges_own_models_are_scored_on_fresh_check_sets(smoke: Path, tmp_path: Path) -> None:
    """`personal_choice --edges` scores what the edges wrote (final.npz, personal.npz), or the owners'
    models alone, on images of each owner's kind from a seed no other set uses; a run without those
    files is named in the error."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "experiments.personal_choice", "--edges", "--runs", "personal-own-warmup",
           "--work", str(smoke / "work"), "--check-words", "8", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert [c["owner"] for c in cases] == [o.name for o in OWNERS]
    assert all(0 <= c[m]["accuracy"] <= 1 and c[m]["loss"] > 0 for c in cases for m in ("final", "personal"))
    check = smoke / "work" / "data" / "check"
    for owner in OWNERS:
        images = {LmdbReader(check / owner.name).get_raw(i)[0] for i in range(8)}
        assert not images & {LmdbReader(smoke / "work" / "data" / "test" / owner.name).get_raw(i)[0]
                             for i in range(SMOKE.test_words)}  # fmt: skip
    assert "| personal-own-warmup | receipts |" in proc.stdout
    cmd[cmd.index("personal-own-warmup")] = "alone-warmup"  # each owner's model alone, on the same sets
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads(out.read_text())["cases"]
    assert [sorted(c) for c in alone] == [["own", "owner", "run"]] * len(OWNERS)
    assert all(c["own"]["samples"] == 8 for c in alone) and "| alone-warmup | signs |" in proc.stdout
    cmd[cmd.index("alone-warmup")] = "fedavg"  # not run here
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "final.npz is missing" in proc.stderr
