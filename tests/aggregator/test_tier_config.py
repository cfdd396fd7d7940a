"""A leaf aggregator's [tier] table: the root's address and the leaf's own certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, ConfigError


def test_the_tier_table_makes_a_leaf_with_paths_beside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "leaf.toml"
    path.write_text('[tier]\nroot = "root.example:50051"\ncert = "tls/leaf-1.pem"\nkey = "tls/leaf-1.key"\n')
    config = AggregatorConfig.load(path)
    assert config.root == "root.example:50051"
    assert (config.root_cert, config.root_key) == (tmp_path / "tls/leaf-1.pem", tmp_path / "tls/leaf-1.key")
    assert AggregatorConfig().root == ""  # an aggregator is a root (or alone) unless told
    secure = AggregatorConfig(root="r:1", root_cert=Path("c"), root_key=Path("k"), secure_aggregation=True,
                              quorum=3)
    assert secure.secure_aggregation  # a leaf runs the secure protocol with its own edges


CERTS = {"root_cert": Path("c"), "root_key": Path("k")}


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({}, "needs its leaf certificate and key"),
        ({**CERTS, "server_optimizer": "fedadam"}, "forwards its sum as it is"),
        ({**CERTS, "download_encoding": "int3"}, "forwards its sum as it is"),
    ],
)
def test_a_leaf_without_its_certificate_or_with_root_only_settings_is_refused(overrides, says) -> None:
    with pytest.raises(ConfigError, match=says):
        AggregatorConfig(root="root:50051", **overrides)
