from __future__ import annotations

from typer.testing import CliRunner

from duet.cli import app

runner = CliRunner()


def test_models_list_and_show(bootstrapped_data_dir):
    listed = runner.invoke(app, ["models", "list", "--data-dir", str(bootstrapped_data_dir)])
    assert listed.exit_code == 0, listed.output
    assert "minilm-dual" in listed.output and "production->1" in listed.output
    shown = runner.invoke(app, ["models", "show", "minilm-dual", "--data-dir", str(bootstrapped_data_dir)])
    assert shown.exit_code == 0 and '"trained": false' in shown.output


def test_register_and_alias_a_model_folder(tmp_path, tiny_model_dir):
    data = str(tmp_path / "data")
    env = {"DUET_REGISTER_DEFAULT_MODELS": "false"}
    registered = runner.invoke(
        app,
        ["models", "register", str(tiny_model_dir), "--name", "tiny", "--alias", "staging", "--data-dir", data],
        env=env,
    )
    assert registered.exit_code == 0, registered.output
    assert "registered tiny/1 (32-d, text)" in registered.output
    moved = runner.invoke(app, ["models", "alias", "tiny", "production", "1", "--data-dir", data], env=env)
    assert moved.exit_code == 0 and "tiny@production -> tiny/1" in moved.output


def test_user_errors_are_one_line_and_exit_1(bootstrapped_data_dir):
    result = runner.invoke(app, ["models", "alias", "minilm", "staging", "7", "--data-dir", str(bootstrapped_data_dir)])
    assert result.exit_code == 1
    assert "has no version 7" in result.output and "Traceback" not in result.output


def test_version_and_short_help():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("duet ")
    for args in (["-h"], ["serve", "-h"], ["models", "list", "-h"]):
        shown = runner.invoke(app, args)
        assert shown.exit_code == 0 and "Usage:" in shown.output, args


def test_an_embedded_worker_without_its_server_is_refused(tmp_path):
    """Its server holds the data dir; with no server, a worker would run jobs nobody reaps."""
    result = runner.invoke(app, ["worker", "--embedded", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no `duet serve` holds the data dir" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "jobs.sqlite3").exists()


def test_an_unwritable_data_dir_is_one_line_for_every_command(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = str(blocker / "data")
    for args in (["models", "list"], ["worker", "--embedded"]):
        result = runner.invoke(app, [*args, "--data-dir", data])
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and data in lines[0] and "DUET_DATA_DIR" in lines[0], (args, result.output)


def test_an_invalid_setting_is_one_line_naming_its_variable(tmp_path):
    result = runner.invoke(app, ["models", "list", "--data-dir", str(tmp_path)], env={"DUET_PORT": "eighty"})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "DUET_PORT" in lines[0] and "Traceback" not in result.output
