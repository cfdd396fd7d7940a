"""The recognizer CLI end to end on tiny data, model files, and the errors users get for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recognizer import cli
from recognizer.charset import get_alphabet
from recognizer.dataset import make_loader
from recognizer.keys import generate_key, load_key
from recognizer.lmdb_data import LmdbWriter
from recognizer.model import build_model, same_weights
from recognizer.model_io import ModelFileError, load_model, read_model_file, save_model, start_from
from recognizer.state import fingerprint, pack_model
from recognizer.synth import render_sample


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image synthetic LMDB."""
    out = tmp_path_factory.mktemp("cli") / "words"
    assert cli.main(["synth", "--out", str(out), "--count", "24", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(words: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file trained for one epoch by `recognizer train` (its key lands beside it)."""
    model = tmp_path_factory.mktemp("model") / "tiny.npz"
    argv = ["train", "--data", str(words), "--preset", "fedocr-tiny", "--gamma", "1/2",
            "--epochs", "1", "--batch-size", "12", "--out", str(model)]
    assert cli.main(argv) == 0
    return model


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_model_and_its_key(trained: Path) -> None:
    assert trained.is_file()
    assert len(trained.with_suffix(".key").read_bytes()) == 32


def test_eval_json_reports_accuracy_and_loss(trained: Path, words: Path, capsys) -> None:
    code, out, _ = run_cli(["eval", "--model", str(trained), "--data", str(words), "--json", "--beam", "1"],
                           capsys)
    report = json.loads(out)
    assert code == 0
    assert report["samples"] == 24 and report["gamma"] == 0.5 and report["preset"] == "fedocr-tiny"
    assert 0.0 <= report["accuracy"] <= 1.0 and np.isfinite(report["loss"])


def test_predict_reads_image_files(trained: Path, tmp_path: Path, capsys) -> None:
    image, _label = render_sample(seed=1, index=0, style="clean")
    path = tmp_path / "word.jpg"
    path.write_bytes(image)
    code, out, _ = run_cli(["predict", "--model", str(trained), "--beam", "2", str(path)], capsys)
    assert code == 0
    assert out.startswith(f"{path}\t")


def test_info_json_counts_scale_with_gamma(capsys) -> None:
    infos = {}
    for gamma in ("1", "1/4"):
        code, out, _ = run_cli(["info", "--preset", "fedocr-tiny", "--gamma", gamma, "--json"], capsys)
        assert code == 0
        infos[gamma] = json.loads(out)
    assert infos["1"]["virtual_params"] == infos["1/4"]["virtual_params"]
    assert infos["1/4"]["real_params"] < 0.5 * infos["1"]["real_params"]
    assert {"name", "virtual", "real", "ratio"} <= set(infos["1/4"]["layers"][0])


def test_saved_model_reloads_to_the_same_outputs(tmp_path: Path, words: Path) -> None:
    key = generate_key(tmp_path / "k.key")
    model = build_model("fedocr-tiny", key, 0.25)
    initial = fingerprint(model, key)
    with torch.no_grad():  # move BN statistics and weights away from W_0
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(tmp_path / "m.npz", model, key, "fedocr-tiny", initial)
    loaded, meta = load_model(tmp_path / "m.npz", key)
    images, targets, _ = next(iter(make_loader(words, 4, shuffle=False)))
    model.eval()
    assert meta["gamma"] == 0.25
    assert torch.allclose(model(images, targets), loaded(images, targets), atol=1e-6)


def test_wrong_key_is_refused_and_unverified_reads_garbage(tmp_path: Path, words: Path) -> None:
    key = generate_key(tmp_path / "right.key")
    other = generate_key(tmp_path / "other.key")
    model = build_model("fedocr-tiny", key, 0.5)
    save_model(tmp_path / "m.npz", model, key, "fedocr-tiny", fingerprint(model, key))
    with pytest.raises(ModelFileError, match="another federation key"):
        load_model(tmp_path / "m.npz", other)
    garbage, _ = load_model(tmp_path / "m.npz", other, verify_key=False)
    images, targets, _ = next(iter(make_loader(words, 4, shuffle=False)))
    model.eval()
    with torch.no_grad():  # BN variances land on shuffled weights, so NaN counts as garbage too
        assert not torch.allclose(model(images, targets), garbage(images, targets), atol=1e-3)


def test_a_model_starts_a_preset_that_reads_wider_images(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "m.key")
    narrow = build_model("fedocr-cpu", key, 0.5)
    initial = fingerprint(narrow, key)
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(0.01)  # trained weights, not W_0
    save_model(tmp_path / "m.npz", narrow, key, "fedocr-cpu", initial)
    wide = build_model("fedocr-cpu-wide", key, 0.5)
    start_from(wide, tmp_path / "m.npz", key, "fedocr-cpu-wide", fingerprint(wide, key))

    assert np.array_equal(pack_model(wide, key), pack_model(narrow, key))
    assert wide.encoder(torch.zeros(1, 3, 32, 160)).shape[-1] == 40  # a column per letter up to 25 and more
    assert same_weights("fedocr-cpu", "fedocr-cpu-wide") and not same_weights("fedocr-cpu", "fedocr-tiny")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--model", "{tmp}/none.npz", "--data", "{words}", "--key", "{key}"],
         "none.npz: no such model"),
        (["eval", "--model", "{model}", "--data", "{tmp}/missing", "--key", "{key}"], "missing"),
        (["eval", "--model", "{model}", "--data", "{tmp}", "--key", "{key}"], "{tmp}"),
        (["eval", "--model", "{model}", "--data", "{words}", "--key", "{tmp}/short.key"], "short.key"),
        (["eval", "--model", "{tmp}/junk.npz", "--data", "{words}", "--key", "{key}"],
         "junk.npz: not a FedOCR"),
        (["predict", "--model", "{model}", "--key", "{key}", "{tmp}/junk.npz"],
         "junk.npz: not a readable image"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/m.npz", "--key", "{key}"], "missing"),
        (["info", "--preset", "no-such-preset"], "fedocr-tiny"),
        (["train", "--data", "{words}", "--out", "{tmp}/m.npz", "--epochs", "2", "--cosine-from", "2"],
         "--cosine-from 2 must be within 0..1 (--epochs 2)"),
        (["train", "--data", "{words}", "--out", "{tmp}/m.npz", "--average", "1.5"],
         "--average 1.5 must be a decay in (0, 1)"),
        (["train", "--data", "{words}", "--out", "{tmp}/m.npz", "--key", "{key}", "--init", "{model}"],
         "{model}: cannot start from it: preset 'fedocr-tiny' (here 'fedocr-cpu')"),
        (["train", "--data", "{words}", "--out", "{tmp}/m.npz", "--preset", "fedocr-tiny", "--gamma", "1/2",
          "--init", "{model}"], "{model}: made under another federation key"),
    ],
)
def test_bad_input_gets_an_error_naming_it(argv, expected, trained: Path, words: Path, tmp_path: Path,
                                           capsys) -> None:
    (tmp_path / "short.key").write_bytes(b"x" * 31)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    names = {"tmp": str(tmp_path), "words": str(words), "model": str(trained),
             "key": str(trained.with_suffix(".key"))}
    code, _, err = run_cli([a.format(**names) for a in argv], capsys)
    assert code == 2
    assert "error" in err and expected.format(**names) in err


def test_cosine_from_holds_the_lr_then_decays_it_each_epoch(words: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--data", str(words), "--preset", "fedocr-tiny", "--epochs", "3", "--batch-size", "12",
            "--lr", "0.002", "--cosine-from", "1", "--out", str(tmp_path / "m.npz")]
    code, out, _ = run_cli(argv, capsys)

    assert code == 0
    lrs = [row["lr"] for row in json.loads(out)["history"]]
    assert lrs[0] == 0.002 and 0.002 > lrs[1] > lrs[2] > 0.00002


def test_average_writes_the_averaged_weights_and_the_last_beside_them(words: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """--average: OUT holds the moving average, OUT.last.npz the same weights a run without it ends at."""
    argv = ["train", "--data", str(words), "--preset", "fedocr-tiny", "--epochs", "2", "--batch-size", "12",
            "--threads", "1", "--key", str(tmp_path / "fed.key")]
    assert run_cli([*argv, "--out", str(tmp_path / "plain.npz")], capsys)[0] == 0
    code, out, _ = run_cli([*argv, "--average", "0.5", "--out", str(tmp_path / "avg.npz")], capsys)

    assert code == 0 and json.loads(out)["last_weights"] == str(tmp_path / "avg.last.npz")
    plain, last, averaged = (read_model_file(tmp_path / name)[1] for name in ("plain.npz", "avg.last.npz",
                                                                             "avg.npz"))
    np.testing.assert_array_equal(plain, last)
    assert np.abs(last - averaged).max() > 1e-4
    load_model(tmp_path / "avg.npz", load_key(tmp_path / "fed.key"))  # a model file like any other


def test_bad_gamma_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", "--preset", "fedocr-tiny", "--gamma", "2"])
    assert exc.value.code == 2
    assert "gamma must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2", "gamma must be in (0, 1], got 2.0"), ("3/2", "gamma must be in (0, 1], got 1.5"),
     ("half", "gamma must be a number in (0, 1] or 'none', got 'half'"),
     ("1/0", "gamma must be a number in (0, 1] or 'none', got '1/0'")],
)
def test_gamma_errors_name_the_range_and_the_input(text: str, expected: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["info", "--preset", "fedocr-tiny", "--gamma", text])
    assert expected in capsys.readouterr().err


def test_gamma_is_parsed_once_for_the_cli_the_hashing_and_the_experiments() -> None:
    from experiments.scales import MODELS
    from recognizer.hashing import real_count

    assert [cli.parse_gamma(t) for t in ("1", "0.25", "1/4", "none", "OFF", "-")] == [1.0, 0.25, 0.25,
                                                                                     None, None, None]
    assert [m.gamma_value for m in MODELS] == [None, 1.0, 0.5, 0.25, 0.125]
    assert real_count(10, 0.25) == 3
    for bad in (0.0, 1.5, float("nan"), True, "1/4"):
        with pytest.raises(ValueError, match="gamma must be"):
            real_count(10, bad)


def test_train_defaults_are_the_aggregators_plan_defaults() -> None:
    from aggregator.config import AggregatorConfig
    from fedocr.recipe import RECIPE

    args = cli.build_parser().parse_args(["train", "--data", "d", "--out", "m.npz"])
    plan = AggregatorConfig()

    assert (args.optimizer, args.batch_size, args.epochs, tuple(args.decay_epochs)) == (
        plan.optimizer, plan.batch_size, plan.local_epochs, plan.lr_decay_rounds)
    assert (plan.optimizer, plan.learning_rate, plan.batch_size, plan.local_epochs, plan.lr_decay_rounds) == (
        RECIPE.optimizer, RECIPE.lr, RECIPE.batch_size, RECIPE.epochs, RECIPE.decay_at) == (
        "adam", 0.002, 16, 1, ())


def test_console_script_is_installed_and_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("recognizer")
    first = subprocess.run([exe, "keygen", "--out", tmp_path / "f.key"], capture_output=True, text=True)
    second = subprocess.run([exe, "keygen", "--out", tmp_path / "f.key"], capture_output=True, text=True)
    assert first.returncode == 0 and len(load_key(tmp_path / "f.key")) == 32
    assert second.returncode == 2 and "refusing to overwrite" in second.stderr


def test_labels_outside_the_alphabet_are_folded_and_counted(tmp_path: Path) -> None:
    image, _ = render_sample(seed=0, index=0, style="clean")
    with LmdbWriter(tmp_path / "any") as writer:
        writer.add(image, "Café")
    loader = make_loader(tmp_path / "any", 1, shuffle=False, check_labels=True)
    assert loader.dataset.label_report.dropped_chars == 1
    _, targets, labels = next(iter(loader))
    assert labels == ["Café"] and get_alphabet("alnum36").decode(targets[0].tolist()) == "caf"


def test_a_failed_save_leaves_the_previous_model_file_whole(tmp_path: Path, monkeypatch) -> None:
    key = bytes(range(32))
    model = build_model("fedocr-tiny", key, 0.5)
    path = tmp_path / "m.npz"
    save_model(path, model, key, "fedocr-tiny", fingerprint(model, key))
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a model")
        raise OSError("No space left on device")

    monkeypatch.setattr("recognizer.model_io.np.savez", broken_savez)
    with pytest.raises(OSError, match="No space"):
        save_model(path, model, key, "fedocr-tiny", fingerprint(model, key))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch report no CUDA device, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_cpu_trains_and_evaluates_as_the_default_does_without_a_gpu(
    trained: Path, words: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_cuda(monkeypatch)  # so the fixture's default (auto) and --device cpu must agree
    model = tmp_path / "cpu.npz"
    key = trained.with_suffix(".key")  # same key and seed as the fixture: same W_0 and batch order
    argv = ["train", "--data", str(words), "--preset", "fedocr-tiny", "--gamma", "1/2", "--epochs", "1",
            "--batch-size", "12", "--out", str(model), "--key", str(key), "--device", "cpu"]
    assert run_cli(argv, capsys)[0] == 0
    reports = []
    for path, extra in ((trained, []), (model, ["--device", "cpu"])):
        code, out, _ = run_cli(["eval", "--model", str(path), "--data", str(words), "--key", str(key),
                                "--beam", "1", "--json", *extra], capsys)
        assert code == 0
        reports.append(json.loads(out))
    assert reports[1]["samples"] == 24
    assert reports[1]["loss"] == pytest.approx(reports[0]["loss"], abs=1e-4)
    assert reports[1]["accuracy"] == pytest.approx(reports[0]["accuracy"])
    default, _ = load_model(trained, load_key(key))
    on_cpu, _ = load_model(model, load_key(key), device="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    for a, b in zip(default.parameters(), on_cpu.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_device_cuda_without_a_gpu_is_an_error_naming_cuda(
    command: str, trained: Path, words: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_cuda(monkeypatch)
    out = tmp_path / "never.npz"
    argv = {
        "train": ["train", "--data", str(words), "--out", str(out)],
        "eval": ["eval", "--model", str(trained), "--data", str(words)],
        "predict": ["predict", "--model", str(trained), str(tmp_path / "word.png")],
    }[command]
    code, _, err = run_cli([*argv, "--device", "cuda"], capsys)
    assert code == 2
    assert f"recognizer {command}: error: --device cuda: no CUDA device" in err
    assert not out.exists() and not out.with_suffix(".key").exists()


def test_unknown_device_is_refused_by_argparse(words: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--data", str(words), "--out", str(tmp_path / "m.npz"), "--device", "tpu"])
    assert exc.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


def test_auto_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    from recognizer.device import default_bf16, default_workers, resolve_device

    _no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") == resolve_device("cuda")
    # Defaults that follow from the device: the CPU keeps today's (no workers, float32).
    assert default_workers(torch.device("cpu")) == 0 and not default_bf16(torch.device("cpu"))
    assert 1 <= default_workers(torch.device("cuda")) <= 8


def test_train_flags_default_to_the_device(tmp_path: Path) -> None:
    parse = cli.build_parser().parse_args
    base = ["train", "--data", "d", "--out", str(tmp_path / "m.npz")]
    args = parse(base)
    assert (args.device, args.bf16, args.workers) == ("auto", None, None)  # resolved per device
    assert parse([*base, "--bf16"]).bf16 is True  # CPU bf16 autocast, as before
    assert parse([*base, "--no-bf16", "--device", "cuda", "--workers", "3"]).bf16 is False


def test_load_model_places_the_model_and_its_index_maps_on_a_device(trained: Path) -> None:
    # The meta device stands in for a GPU: every parameter and buffer (hashed layers' index maps,
    # the TPS grid) must follow .to(device), none may stay pinned to the CPU.
    model, _ = load_model(trained, load_key(trained.with_suffix(".key")), device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert any(name.endswith("_idx") for name, _ in model.named_buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_init_fine_tunes_a_saved_model(trained: Path, words: Path, tmp_path: Path, capsys) -> None:
    """--init starts from the file's weights: a zero-epoch run saves them unchanged, under the same key."""
    key = trained.with_suffix(".key")
    argv = ["train", "--data", str(words), "--preset", "fedocr-tiny", "--gamma", "1/2", "--epochs", "0",
            "--key", str(key), "--init", str(trained), "--out", str(tmp_path / "tuned.npz")]
    assert run_cli(argv, capsys)[0] == 0
    before = read_model_file(trained)
    after = read_model_file(tmp_path / "tuned.npz")
    assert np.array_equal(before[1], after[1]) and before[0] == after[0]
