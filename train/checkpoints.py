"""Resume points of long loops (training epochs, QAT epochs): TensorFlow checkpoints plus state.json.

Each epoch writes its checkpoints under NEW names, then state.json (atomically) naming them,
then deletes the checkpoints the state no longer names. A kill at any moment leaves the state
on disk pointing at complete checkpoints: never at one being overwritten in place.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.atomic import write_json


def save_resume_point(state_path: Path, state: dict, keep) -> None:
    """Write `state` (which names the checkpoints in `keep`), then delete the other checkpoints
    beside it. The checkpoints in `keep` must be complete before this is called."""
    write_json(state_path, state)
    keep = {name for name in keep if name}
    state_dir = Path(state_path).parent
    for index in state_dir.glob("*.index"):
        prefix = index.name[: -len(".index")]
        if prefix not in keep:
            for f in state_dir.glob(prefix + ".*"):  # .index and .data-*-of-*
                f.unlink(missing_ok=True)
