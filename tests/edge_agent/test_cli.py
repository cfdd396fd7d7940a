"""The `edge_agent` command: keygen, and clear errors before any round for bad files or a dead server."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import EXIT_UNREACHABLE, EXIT_USAGE, main


def agent(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_keygen_writes_a_private_32_byte_key_and_never_overwrites(tmp_path: Path, capsys) -> None:
    key = tmp_path / "federation.key"
    assert main(["keygen", "--out", str(key)]) == 0
    data = key.read_bytes()
    assert len(data) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["keygen", "--out", str(key)]) == EXIT_USAGE
    assert "refusing to overwrite" in capsys.readouterr().err
    assert key.read_bytes() == data


def test_keygen_takes_only_out(tmp_path: Path, capsys) -> None:
    key = tmp_path / "federation.key"

    with pytest.raises(SystemExit) as refused:
        main(["keygen", "--out", str(key), "--val", str(tmp_path / "val")])

    assert refused.value.code == 2
    assert "unrecognized arguments: --val" in capsys.readouterr().err
    assert not key.exists()


def _args(edge_data, test_pki, key: Path, **override: str) -> list[str]:
    values = {
        "--shard": str(edge_data.shards[0]),
        "--server": "127.0.0.1:1",
        "--key": str(key),
        "--cert": str(test_pki.cert("edge-0")),
        "--cert-key": str(test_pki.key("edge-0")),
        "--ca": str(test_pki.ca),
        **override,
    }
    return [x for kv in values.items() for x in kv]


@pytest.mark.parametrize(
    ("flag", "make", "message"),
    [
        ("--shard", lambda d: d / "missing-shard", "no such dataset"),
        ("--key", lambda d: (d / "short.key").write_bytes(b"x" * 31) and d / "short.key", "31"),
        ("--key", lambda d: d / "missing.key", "no such federation key file"),
        ("--cert", lambda d: (d / "bad.pem").write_text("not a certificate") and d / "bad.pem", "bad.pem"),
    ],
    ids=["missing-shard", "short-key", "missing-key", "bad-cert"],
)
def test_bad_files_fail_before_joining_naming_the_file(
    flag, make, message, edge_data, test_pki, federation_key: Path, tmp_path: Path
) -> None:
    path = make(tmp_path)
    proc = agent(*_args(edge_data, test_pki, federation_key, **{flag: str(path)}))
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert str(path) in proc.stderr and message in proc.stderr


def test_unreachable_aggregator_gives_up_after_patience(edge_data, test_pki, federation_key: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = agent(*_args(edge_data, test_pki, federation_key, **{"--server": f"127.0.0.1:{port}"}),
                 "--patience", "3")
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert "aggregator unavailable" in proc.stderr and "retrying in" in proc.stderr
    assert f"giving up on 127.0.0.1:{port}" in proc.stderr


def test_device_cuda_without_a_gpu_fails_before_joining(
    edge_data, test_pki, federation_key: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, whatever the machine has
    work = tmp_path / "work"
    proc = agent(*_args(edge_data, test_pki, federation_key), "--device", "cuda", "--work-dir", str(work),
                 env=env)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "edge_agent: --device cuda: no CUDA device is available" in proc.stderr
    assert "retrying" not in proc.stderr and not work.exists()


def test_unknown_device_is_refused_by_argparse(edge_data, test_pki, federation_key: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*_args(edge_data, test_pki, federation_key), "--device", "tpu"])
    assert exc.value.code == EXIT_USAGE
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--own-model"], "--own-model needs --personalize and --val"),
        (["--personalize", "--own-model"], "--own-model needs --personalize and --val"),
        (["--own-prox", "-1"], "--own-prox must be 0 or more, got -1"),
        (["--personal-epochs", "0"], "--personal-epochs must be 1 or more"),
        (["--personal-lr", "-0.1"], "--personal-lr a positive number"),
    ],
    ids=["own-model-alone", "own-model-without-val", "negative-own-prox", "no-personal-epochs", "bad-lr"],
)
def test_personal_model_flags_are_checked_before_joining(
    extra, message, edge_data, test_pki, federation_key: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*_args(edge_data, test_pki, federation_key), *extra])
    assert exc.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err
