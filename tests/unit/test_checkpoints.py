"""Resuming picks the newest checkpoint that was written completely."""

from __future__ import annotations

from trainer.run import COMPLETE_MARKER, last_checkpoint


def checkpoint(run_dir, step, complete=True, trainer_state=True):
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    if trainer_state:
        (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / COMPLETE_MARKER).write_text(str(step))
    return folder


def test_a_partial_newest_checkpoint_is_skipped(tmp_path):
    checkpoint(tmp_path, 5)
    ten = checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 15, complete=False, trainer_state=False)  # killed while saving
    assert last_checkpoint(tmp_path) == str(ten)


def test_numeric_order_and_no_checkpoints(tmp_path):
    assert last_checkpoint(tmp_path) is None
    checkpoint(tmp_path, 9)
    hundred = checkpoint(tmp_path, 100)
    assert last_checkpoint(tmp_path) == str(hundred)


def test_checkpoints_without_markers_fall_back_to_trainer_state(tmp_path):
    done = checkpoint(tmp_path, 4, complete=False)
    checkpoint(tmp_path, 8, complete=False, trainer_state=False)
    assert last_checkpoint(tmp_path) == str(done)
