"""Multi-worker training: two `oncolite train` processes on 127.0.0.1 with TF_CONFIG, on CPU.

The documented recipe (train/train.py's docstring): the same command and --run path on every
worker, TF_CONFIG naming the cluster, `distribute: "auto"` picking MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_train import ENV, TINY, TL_VS_BR, planted_manifest

# Hang guard only (a collective that never completes would block forever): never a timing assertion.
WORKER_TIMEOUT = 600


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def checkpoint_values(prefix) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if "VARIABLE_VALUE" in name}


@pytest.mark.slow
def test_two_workers_train_in_sync_and_only_the_chief_writes_the_run(tmp_path):
    manifest = planted_manifest(tmp_path, TL_VS_BR, counts=(8, 4, 4))
    run = tmp_path / "run"
    sets = {**TINY, "head_epochs": 1, "finetune_epochs": 1, "batch_size": 8}
    cluster = [f"127.0.0.1:{port}" for port in free_ports(2)]
    argv = [sys.executable, "-m", "oncolite", "train", str(run), "--manifest", str(manifest), "--quiet",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        workers.append(subprocess.Popen(argv, env={**ENV, "TF_CONFIG": json.dumps(tf_config)}, cwd=tmp_path,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = []
    try:
        for proc in workers:
            errors.append(proc.communicate(timeout=WORKER_TIMEOUT)[1])
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for index, (proc, err) in enumerate(zip(workers, errors)):
        assert proc.returncode == 0, f"worker {index}: {err[-3000:]}"

    # The chief (worker 0) wrote the run; the summary says both processes were one synchronous job.
    summary = json.loads((run / "train" / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["epochs"] == {"head": 1, "finetune": 1}
    assert (run / "models" / "float.keras").is_file() and (run / "config.json").is_file()
    assert sorted(p.name for p in (run / "workers").iterdir()) == ["1"]  # the other worker kept its own state

    # Each worker trained on its own shard of every batch; the all-reduce keeps the weights equal.
    chief = json.loads((run / "train" / "state" / "state.json").read_text())
    other = json.loads((run / "workers" / "1" / "state" / "state.json").read_text())
    assert chief["best"]["checkpoint"] == other["best"]["checkpoint"]
    ours = checkpoint_values(run / "train" / "state" / chief["best"]["checkpoint"])
    theirs = checkpoint_values(run / "workers" / "1" / "state" / other["best"]["checkpoint"])
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
