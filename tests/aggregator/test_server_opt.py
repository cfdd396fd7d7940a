"""Server optimizers (FedAvgM, FedAdam, FedYogi): their step, their slots surviving kill -9; FedProx's mu."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fedclient import Client

from aggregator import cli, messages, server_opt
from aggregator.config import AggregatorConfig, ConfigError
from aggregator.rounds import TrainingPlan
from fedocr import harness
from fedocr.v1 import federation_pb2 as pb

LENGTHS = [5_000, 40]  # parameters, then running statistics (exact)


def run(kind: str, deltas: list[np.ndarray], exact: np.ndarray, **kw) -> np.ndarray:
    state, slots = np.zeros(deltas[0].size, np.float32), {}
    for delta in deltas:
        slots = server_opt.step(kind, state, delta, slots, exact, **kw)
    return state


def test_each_server_optimizer_moves_the_state_as_its_paper_says() -> None:
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 1e-2, 100).astype(np.float32) for _ in range(3)]
    exact = np.zeros(100, bool)
    exact[-10:] = True
    hyper = {"lr": 1.0, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    plain = run("fedavg", deltas, exact, **hyper)
    np.testing.assert_allclose(plain, sum(deltas), rtol=1e-6)
    # FedAvgM without momentum is FedAvg; with it, the first round's mean counts 1 + 0.9 + 0.81 times.
    np.testing.assert_allclose(run("fedavgm", deltas, exact, **{**hyper, "beta1": 0.0}), plain, rtol=1e-6)
    momentum = run("fedavgm", deltas, exact, **hyper)
    expected = deltas[0] * 2.71 + deltas[1] * 1.9 + deltas[2]
    np.testing.assert_allclose(momentum[:-10], expected[:-10], rtol=1e-5)
    # FedAdam's first step: m = 0.1 mean, v = 0.01 mean^2, so lr x 0.1 mean / (0.1 |mean| + tau).
    adam = run("fedadam", deltas[:1], exact, **{**hyper, "lr": 0.01})
    d = deltas[0][:-10].astype(np.float64)
    np.testing.assert_allclose(adam[:-10], 0.01 * 0.1 * d / (0.1 * np.abs(d) + 1e-3), rtol=1e-4)
    yogi = run("fedyogi", deltas, exact, **{**hyper, "lr": 0.01})
    assert np.isfinite(yogi).all() and not np.allclose(yogi, run("fedadam", deltas, exact, **hyper))
    # The running statistics always take the plain mean.
    for state, rounds in ((momentum, 3), (adam, 1), (yogi, 3)):
        np.testing.assert_allclose(state[-10:], sum(deltas[:rounds])[-10:], rtol=1e-6)


def test_bad_server_optimizer_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown server_optimizer 'sgd'; choose from fedavg, fedavgm"):
        AggregatorConfig(server_optimizer="sgd")
    with pytest.raises(ConfigError, match="server_beta1 and server_beta2 within"):
        AggregatorConfig(server_optimizer="fedadam", server_beta2=1.0)
    assert AggregatorConfig(server_optimizer="fedadam").server_step_lr == 0.01


def test_the_command_line_sets_each_server_optimizer_constant(capsys) -> None:
    for flag, bad in (("--server-lr", "-1"), ("--server-beta1", "1.5"), ("--server-tau", "0")):
        assert cli.main(["serve", "--server-optimizer", "fedadam", flag, bad]) == 2
        assert "configuration error: server_lr must be >= 0" in capsys.readouterr().err


def test_a_killed_aggregator_keeps_its_server_optimizer_state(agg_pki, tmp_path) -> None:
    """Twins take the same uploads under FedAdam; one is killed -9 after round 2 and restarted.
    Their final states are the same bytes, and not FedAvg's."""
    flags = ("--log-level", "WARNING", "--quorum", "1", "--min-edges", "1", "--rounds", "4",
             "--server-optimizer", "fedadam")
    dirs = [tmp_path / "never-killed", tmp_path / "killed"]
    twins = [harness.start_aggregator(agg_pki.dir, d, d.with_suffix(".log"), flags=flags) for d in dirs]
    rng = np.random.default_rng(1)
    increments = [[rng.normal(0, 1e-2, n).astype(np.float32) for n in LENGTHS] for _ in range(4)]
    try:
        for k, increment in enumerate(increments):
            if k == 2:
                twins[1].kill()
                log = dirs[1].with_suffix(".log")
                twins[1] = harness.start_aggregator(agg_pki.dir, dirs[1], log, flags=flags)
            for twin in twins:
                client = Client(twin.port, agg_pki.ca, *agg_pki.pair("edge-0"))
                client.upload(client.join(LENGTHS).round_id, increment)
                client.close()
        finals = []
        for twin in twins:
            client = Client(twin.port, agg_pki.ca, *agg_pki.pair("edge-0"))
            finals.append(np.concatenate(client.download()[1]))
            client.close()
    finally:
        for twin in twins:
            twin.stop()

    assert finals[0].tobytes() == finals[1].tobytes()
    fedavg = np.concatenate([sum(inc[i] for inc in increments) for i in range(len(LENGTHS))])
    assert np.abs(finals[0] - fedavg).max() > 1e-3


def test_the_plan_carries_fedprox_mu_to_the_edges(serve, connect) -> None:
    running = serve(proximal_mu=0.01, quorum=1, min_edges=1)
    reply = connect(running).join(LENGTHS)
    assert reply.plan.proximal_mu == pytest.approx(0.01)
    assert connect(running, "ops").get_round().plan.proximal_mu == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="proximal_mu must be a finite number >= 0, got -1"):
        AggregatorConfig(proximal_mu=-1.0)


def test_warm_up_rehearsal_is_in_the_plans_after_the_warm_up_rounds_and_refused_without_them() -> None:
    config = AggregatorConfig(total_rounds=4, warmup_rounds=2, warmup_words=300, warmup_rehearsal=0.5)
    spec = (300, config.warmup_styles, config.warmup_labels, config.warmup_seed)
    assert [config.warmup_for(i) for i in range(4)] == [(*spec, 0.0)] * 2 + [(*spec, 0.5)] * 2
    assert AggregatorConfig(total_rounds=4, warmup_rounds=2).warmup_for(2) == (0, "", "", 0, 0.0)
    for bad in ({"warmup_rehearsal": 0.5}, {"warmup_rounds": 1, "warmup_rehearsal": -1.0},
                {"warmup_rounds": 1, "warmup_rehearsal": float("nan")}):  # fmt: skip
        with pytest.raises(ConfigError, match="warmup_rehearsal must be a finite number >= 0, and needs"):
            AggregatorConfig(total_rounds=4, **bad)
    plan = TrainingPlan(1, 0.1, 8, warmup_words=300, warmup_styles="clean", warmup_labels="words",
                        warmup_seed=7, rehearsal_share=0.5)  # fmt: skip
    message = messages.plan_message(plan)
    assert not message.HasField("warmup") and message.rehearsal.share == 0.5
    assert message.rehearsal.words.words == 300 and messages.plan_from(message) == plan
    warm = replace(plan, rehearsal_share=0.0)
    assert warm.warmup and messages.plan_message(warm).warmup.words == 300
    assert messages.plan_from(messages.plan_message(warm)) == warm


def test_a_finished_federation_restarted_with_more_rounds_goes_on_under_its_new_config(
    agg_pki, tmp_path
) -> None:
    """Two FedAvg rounds finish the federation; restarted with four rounds and FedAvgM, it opens round 3
    from the final state, keeps its history, and moves the state as FedAvgM from there on."""
    flags = ["--log-level", "WARNING", "--quorum", "1", "--min-edges", "1"]
    state_dir, log = tmp_path / "state", tmp_path / "aggregator.log"
    rng = np.random.default_rng(2)
    increments = [[rng.normal(0, 1e-2, n).astype(np.float32) for n in LENGTHS] for _ in range(4)]

    def rounds(more: list[str], uploads: list[list[np.ndarray]]) -> tuple[list[int], pb.JoinResponse]:
        running = harness.start_aggregator(agg_pki.dir, state_dir, log, flags=flags + more)
        client = Client(running.port, agg_pki.ca, *agg_pki.pair("edge-0"))
        try:
            ids = []
            for increment in uploads:
                reply = client.join(LENGTHS)
                assert reply.action == pb.JoinResponse.ACTION_TRAIN
                client.upload(reply.round_id, increment)
                ids.append(reply.round_id)
            return ids, client.join(LENGTHS)
        finally:
            client.close()
            running.stop()

    first, finished = rounds(["--rounds", "2"], increments[:2])
    assert finished.action == pb.JoinResponse.ACTION_FINISHED
    _, still = rounds(["--rounds", "2", "--server-optimizer", "fedavgm"], [])  # no more rounds: finished
    assert still.action == pb.JoinResponse.ACTION_FINISHED
    more = ["--rounds", "4", "--server-optimizer", "fedavgm", "--server-lr", "0.5", "--server-beta1", "0.5"]
    then, done = rounds(more, increments[2:])
    assert first == [1, 2] and then == [3, 4] and done.action == pb.JoinResponse.ACTION_FINISHED

    running = harness.start_aggregator(agg_pki.dir, state_dir, log, flags=flags + more)
    client = Client(running.port, agg_pki.ca, *agg_pki.pair("edge-0"))
    try:
        final = np.concatenate(client.download()[1])
        listed = client.list_rounds().rounds
    finally:
        client.close()
        running.stop()
    assert [(r.round_index, r.total_rounds) for r in listed] == [(0, 2), (1, 2), (2, 4), (3, 4)]
    exact = np.zeros(sum(LENGTHS), bool)  # this client's manifest marks no tensor exact
    expected = np.concatenate([a + b for a, b in zip(*increments[:2], strict=True)])
    slots: dict[str, np.ndarray] = {}
    for increment in increments[2:]:
        slots = server_opt.step("fedavgm", expected, np.concatenate(increment), slots, exact, 0.5, 0.5, 0, 0)
    np.testing.assert_allclose(final, expected, rtol=0, atol=1e-6)
