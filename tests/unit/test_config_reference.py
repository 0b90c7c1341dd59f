"""docs/configuration.md is generated from the settings model and must stay in step with it."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from duet.config_cli import config_app, config_reference
from duet.config_reference import REGENERATE, env_names, render_markdown, rows
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def test_docs_configuration_is_up_to_date_with_the_settings():
    assert DOC.read_text() == render_markdown(), (
        f"docs/configuration.md is out of date with service/settings.py: regenerate with {REGENERATE}"
    )


def test_every_setting_has_a_row_with_its_environment_variables():
    table = rows()
    assert len(table) == len(Settings.model_fields)
    for (variables, *_), (name, field) in zip(table, Settings.model_fields.items()):
        for env in env_names(name, field, "DUET_"):
            assert f"`{env}`" in variables


def test_the_names_the_reference_prints_are_the_ones_settings_reads(monkeypatch):
    """A wrong prefix or a missed alias would send operators to a variable nobody reads."""
    redis = Settings.model_fields["redis_url"]
    assert env_names("redis_url", redis, "DUET_") == ["DUET_REDIS_URL", "REDIS_URL"]
    for env in env_names("redis_url", redis, "DUET_"):
        monkeypatch.setenv(env, f"redis://{env.lower()}:6379/0")
        assert Settings().redis_url == f"redis://{env.lower()}:6379/0"
        monkeypatch.delenv(env)
    monkeypatch.setenv("DUET_MAX_BATCH_SIZE", "7")
    assert Settings().max_batch_size == 7


def test_the_rendering_ignores_the_environment(monkeypatch):
    """Defaults come from the field definitions: regenerating on a configured machine changes nothing."""
    monkeypatch.setenv("DUET_PORT", "9999")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/0")
    assert render_markdown() == DOC.read_text()


def test_duet_config_reference_prints_the_page():
    """Mounted the way duet/cli.py mounts it, the command writes exactly the checked-in page."""
    app = typer.Typer(no_args_is_help=True)
    app.add_typer(config_app, name="config-reference")
    app.command("noop")(lambda: None)  # a second command, so typer keeps the sub-command name
    result = CliRunner().invoke(app, ["config-reference"])
    assert result.exit_code == 0, result.output
    assert result.output == render_markdown()

    plain = typer.Typer()
    plain.command("config-reference")(config_reference)
    plain.command("noop")(lambda: None)
    assert CliRunner().invoke(plain, ["config-reference"]).output == render_markdown()
