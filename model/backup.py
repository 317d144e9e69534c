"""The training backup that an interrupted run resumes from, never half-written.

Keras' BackupAndRestore writes `latest.weights.h5` in place. When the disk fills (or the
process is killed) during that write, the file is left truncated, and the next run cannot
load it: Keras 3.15 raises ValueError ("Layer 'dense_0' expected 1 variables, but received
0"), which its double-checkpoint fallback (it catches OSError only) does not handle, so every
resume of that run fails until someone deletes the backup by hand.

Here both files of the backup are written under temporary names beside the real ones and
renamed into place: a failed save leaves the previous epoch's backup whole, and the run
resumes from it. The backup also stays after `fit` returns (train.py deletes it once the run
folder is complete): a failure while saving the final model must not cost the whole training.
"""

from __future__ import annotations

import os
from pathlib import Path

from model import configlib

PARTIAL_WEIGHTS = "latest.partial.weights.h5"  # Keras insists on the .weights.h5 suffix


def atomic_backup_and_restore(backup_dir: Path):
    """A keras.callbacks.BackupAndRestore (epoch backups in `backup_dir`) whose weights and
    training metadata are replaced atomically. Overrides Keras 3's private `_save_model`
    (keras/src/callbacks/backup_and_restore.py); tests/test_train_faults.py checks it against the
    installed Keras."""
    import keras

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def _save_model(self) -> None:
            folder = Path(self.backup_dir)
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / PARTIAL_WEIGHTS
            try:
                self.model.save_weights(str(partial), overwrite=True)
                os.replace(partial, self._weights_path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            configlib.write_json_atomic(
                Path(self._training_metadata_path),
                {"epoch": self._current_epoch, "batch": self._last_batch_seen},
            )

    return AtomicBackupAndRestore(str(backup_dir), delete_checkpoint=False)
