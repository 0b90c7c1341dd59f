"""Alias moves that must keep pinned collections searchable (issue 14 part 2): `require_compatible` on
`ModelRegistry.set_alias`, the trainer's promotion (`promote.require_compatible`) and the CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.helpers import embedded_registry, register_trained


@pytest.fixture()
def registry(tmp_path, tiny_model_dir):
    """m/1 holds production; m/2 claims m/1 (its real weights hash); m/3 claims nothing."""
    from registry.manifest import Compatibility

    registry = embedded_registry(tmp_path / "registry")
    v1 = register_trained(registry, "m", tiny_model_dir, aliases=("production",))
    register_trained(
        registry, "m", tiny_model_dir, [Compatibility(ref="m/1", weights_sha256=v1.manifest.lineage.weights_sha256)]
    )
    register_trained(registry, "m", tiny_model_dir)
    return registry


def test_require_compatible_refuses_a_version_without_a_claim(registry):
    from registry.errors import IncompatibleVersionError

    with pytest.raises(IncompatibleVersionError, match="m/3 is not registered compatible with m/1"):
        registry.set_alias("m", "production", 3, require_compatible=True)
    assert registry.aliases("m") == {"production": 1}
    registry.set_alias("m", "production", 2, require_compatible=True)
    assert registry.aliases("m") == {"production": 2}
    registry.set_alias("m", "production", 3)  # the default moves as before
    assert registry.aliases("m") == {"production": 3}


def test_promotion_requiring_compatibility_is_refused_with_the_reason(registry):
    from trainer.export import Promotion, move_alias

    rule_passed = Promotion("production", "sts/spearman", 0.5, 0.6, True, "sts/spearman improved")
    refused = move_alias(registry, registry.get_version("m", 3), rule_passed, require_compatible=True)
    assert not refused.promoted
    assert refused.reason.startswith("sts/spearman improved; refused: ")
    assert "m/3 is not registered compatible with m/1" in refused.reason
    assert registry.aliases("m") == {"production": 1}

    moved = move_alias(registry, registry.get_version("m", 2), rule_passed, require_compatible=True)
    assert moved == rule_passed and registry.aliases("m") == {"production": 2}


def test_promotion_requiring_compatibility_with_an_unreadable_holder_is_refused(registry):
    """The holder's manifest cannot be read, so the claim cannot be checked: the run's version stays
    registered and unpromoted, saying why, instead of the job failing after training."""
    from registry.manifest import MANIFEST_FILE
    from trainer.export import Promotion, move_alias

    (registry.get_version("m", 1).path / MANIFEST_FILE).write_text("{")
    rule_passed = Promotion("production", "sts/spearman", 0.5, 0.6, True, "sts/spearman improved")
    refused = move_alias(registry, registry.get_version("m", 2), rule_passed, require_compatible=True)
    assert not refused.promoted
    assert "m/1's manifest cannot be read" in refused.reason
    assert registry.get_version("m", 2).aliases == ()


def test_promote_spec_reads_require_compatible():
    from trainer.config import PromoteSpec

    assert PromoteSpec(metric="sts/spearman").require_compatible is False
    assert PromoteSpec(metric="sts/spearman", require_compatible=True).require_compatible is True


def test_cli_alias_move_requiring_compatibility(tmp_path, tiny_model_dir):
    from duet.cli import app

    runner, data, env = CliRunner(), str(tmp_path / "data"), {"DUET_REGISTER_DEFAULT_MODELS": "false"}
    for alias in ("production", "staging"):  # tiny/1 holds production; tiny/2 claims nothing
        args = ["models", "register", str(tiny_model_dir), "--name", "tiny", "--alias", alias, "--data-dir", data]
        assert runner.invoke(app, args, env=env).exit_code == 0
    refused = runner.invoke(
        app, ["models", "alias", "tiny", "production", "2", "--require-compatible", "--data-dir", data], env=env
    )
    assert refused.exit_code == 1
    assert "tiny/2 is not registered compatible with tiny/1" in refused.output
    moved = runner.invoke(app, ["models", "alias", "tiny", "production", "2", "--data-dir", data], env=env)
    assert moved.exit_code == 0 and "tiny@production -> tiny/2" in moved.output


def test_a_move_arriving_during_a_require_compatible_check_waits_for_it(registry, monkeypatch):
    """The check and the move are one step: a plain move to m/3 that arrives while m/2's claim on m/1 is
    being checked lands after m/2, instead of slipping in and leaving m/2 (not compatible with m/3) over
    collections pinned to m/3."""
    import threading

    import registry.store as store

    real = store.alias_move
    other = threading.Thread(target=registry.set_alias, args=("m", "production", 3))

    def check_while_another_move_arrives(*args, **kwargs):
        answer = real(*args, **kwargs)
        other.start()
        other.join(timeout=2)  # it can only finish here if it did not wait for this move
        return answer

    monkeypatch.setattr(store, "alias_move", check_while_another_move_arrives)
    registry.set_alias("m", "production", 2, require_compatible=True)
    other.join()
    assert registry.aliases("m") == {"production": 3}
