"""train.py's experiment tracker (off by default): the records of metrics.jsonl reach trackio's local store."""
import json
import subprocess
import sys

import pytest

import train
from test_train import run_train

READ_TRACKIO_LOGS = """import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2]), default=str))"""


def test_trackio_logs_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # trackio's local backend: a SQLite file here
    metrics = run_train(tmp_path / "run", max_steps=2, tracker="trackio", tracker_project="test", tracker_run="tiny")
    read = subprocess.run([sys.executable, "-c", READ_TRACKIO_LOGS, "test", "tiny"], check=True, capture_output=True,
                          text=True)
    logged = json.loads(read.stdout)
    assert [entry["step"] for entry in logged] == [record["step"] for record in metrics] == [1, 2]
    for entry, record in zip(logged, metrics):
        assert entry["loss"] == pytest.approx(record["loss"]) and entry["grad_norm"] == pytest.approx(record["grad_norm"])
        assert entry["lr/projector"] == pytest.approx(record["lr"]["projector"])


def test_off_by_default_and_a_wrong_name_is_refused():
    assert train.settings["tracker"] == "" and train.start_tracker(train.settings) is None
    cfg = {**train.settings, "tracker": "tensorboard"}
    with pytest.raises(ValueError, match="tracker='tensorboard'"):
        train.check_runs([cfg])


def test_records_are_flattened_for_the_tracker():
    record = {"step": 7, "loss": 1.5, "lr": {"vision": 0.0, "projector": 1e-3}, "skipped": 0}
    assert train.tracker_record(record) == {"loss": 1.5, "lr/vision": 0.0, "lr/projector": 1e-3, "skipped": 0}
