"""The turn audit log: Parquet segments per rank, bounded memory, cut back on resume."""
import os

from resure_ds.report.audit import AuditLog, read_audit, segments, truncate


def rows(step, n, did="d"):
    return [{"source": "s", "dialogue_id": f"{did}{i}", "turn": i % 3, "loss": 1.0 + i, "z": None if i == 0 else 0.5,
             "weight": 1.0, "warm": i > 0, "step": step, "partial": False} for i in range(n)]


def test_rows_are_written_per_rank_in_training_order(tmp_path):
    a, b = AuditLog(str(tmp_path), 0), AuditLog(str(tmp_path), 1)
    a.add(rows(1, 3))
    b.add(rows(1, 2, "e"))
    assert read_audit(str(tmp_path)).num_rows == 0  # nothing on disk before a flush
    a.flush()
    b.flush()
    a.add(rows(2, 2))
    a.flush()
    a.flush()  # nothing buffered: no empty segment
    names = [os.path.basename(p) for p in segments(str(tmp_path))]
    assert names == ["rank00000-seg000000.parquet", "rank00000-seg000001.parquet", "rank00001-seg000000.parquet"]
    t = read_audit(str(tmp_path)).to_pylist()
    assert [(r["rank"], r["step"], r["dialogue_id"]) for r in t] == [
        (0, 1, "d0"), (0, 1, "d1"), (0, 1, "d2"), (0, 2, "d0"), (0, 2, "d1"), (1, 1, "e0"), (1, 1, "e1")]
    assert t[0]["z"] is None and t[1]["z"] == 0.5


def test_memory_is_bounded_by_flush_rows(tmp_path):
    log = AuditLog(str(tmp_path), 0, flush_rows=10)
    for step in range(1, 8):
        log.add(rows(step, 4))
        assert len(log.rows) < 10
    log.flush()
    assert read_audit(str(tmp_path)).num_rows == 28 and len(segments(str(tmp_path))) == 3


def test_truncate_drops_the_steps_being_redone(tmp_path):
    log = AuditLog(str(tmp_path), 0, flush_rows=8)
    for step in range(1, 7):
        log.add(rows(step, 3))  # segments: steps 1-3 (9 rows), 4-6 (9 rows)
    log.flush()
    open(os.path.join(tmp_path, "audit", "rank00000-seg000009.parquet.tmp"), "w").close()  # a killed writer's
    assert truncate(str(tmp_path), 4) == 6
    steps = read_audit(str(tmp_path)).column("step").to_pylist()
    assert sorted(steps) == sorted([1, 2, 3, 4] * 3)
    assert not [n for n in os.listdir(os.path.join(tmp_path, "audit")) if n.endswith(".tmp")]
    assert truncate(str(tmp_path), 2) == 6 and len(segments(str(tmp_path))) == 1  # the second segment emptied
    assert truncate(str(tmp_path), 0) == 6 and segments(str(tmp_path)) == []      # a fresh start in a used folder
    log2 = AuditLog(str(tmp_path), 0)
    log2.add(rows(1, 1))
    log2.flush()
    assert read_audit(str(tmp_path)).num_rows == 1


def test_empty_run_reads_as_an_empty_table(tmp_path):
    assert read_audit(str(tmp_path)).num_rows == 0
    assert read_audit(str(tmp_path), columns=["weight"]).column_names == ["weight"]
