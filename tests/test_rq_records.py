"""The Redis side of the job queue on a real redis-server: audio blobs (chunked, atomic, with their
TTL) and job records (checked transitions, per-state indexes, one winner in a race)."""
from __future__ import annotations

import os
import threading

import pytest

from webapp.queue_rq import blobs
from webapp.queue_rq.records import (STATS_KEY, IllegalTransition, RecordState, Records, index_key, record_key)


def test_a_blob_round_trips_in_chunks_with_its_ttl(redis_server, tmp_path):
    conn = redis_server.client()
    src = tmp_path / "src.bin"
    payload = os.urandom(blobs.CHUNK_BYTES * 10 + 12345)  # 11 chunks: two round trips of 8
    src.write_bytes(payload)
    size = blobs.put_file(conn, "acestep:blob:t:source", src, ttl_s=120)
    assert size == len(payload)
    assert conn.llen("acestep:blob:t:source") == 11
    assert 100 < conn.ttl("acestep:blob:t:source") <= 120
    assert conn.keys("*staging*") == []  # renamed into place, nothing temporary left
    dest = tmp_path / "dest.bin"
    blobs.get_file(conn, "acestep:blob:t:source", size, dest)
    assert dest.read_bytes() == payload
    assert blobs.read_all(conn, "acestep:blob:t:source", size) == payload
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []

    blobs.put_file(conn, "acestep:blob:t:kept", src, ttl_s=None)
    assert conn.ttl("acestep:blob:t:kept") == -1


def test_a_missing_or_short_blob_is_refused_and_leaves_no_file(redis_server, tmp_path):
    conn = redis_server.client()
    work = tmp_path / "work"
    work.mkdir()
    src = work / "src.bin"
    src.write_bytes(os.urandom(blobs.CHUNK_BYTES * 2))
    size = blobs.put_file(conn, "acestep:blob:x", src, ttl_s=60)
    with pytest.raises(blobs.BlobMissing):
        blobs.get_file(conn, "acestep:blob:nothing", size, work / "out.bin")
    conn.rpop("acestep:blob:x")  # as if it were cut short
    with pytest.raises(blobs.BlobMissing):
        blobs.get_file(conn, "acestep:blob:x", size, work / "out.bin")
    assert sorted(p.name for p in work.iterdir()) == ["src.bin"]
    empty = work / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        blobs.put_file(conn, "acestep:blob:e", empty, ttl_s=60)
    assert conn.keys("acestep:blob:e*") == []


def _new_record(conn, task_id="a" * 32):
    conn.hset(record_key(task_id), mapping={"state": "queued", "created_at": "1", "protocol": "json", "params": "{}",
                                            "duration_s": "2.0", "sample_rate": "44100", "source_bytes": "10"})
    conn.zadd(index_key(RecordState.QUEUED), {task_id: 1})
    return task_id


def test_transitions_are_checked_and_move_the_indexes(redis_server):
    conn = redis_server.client()
    records = Records(conn)
    task = _new_record(conn)
    assert records.transition(task, RecordState.TAKEN, {"worker": "w1", "gpu_wait": True}) is RecordState.QUEUED
    with pytest.raises(IllegalTransition) as err:
        records.transition(task, RecordState.TAKEN)  # taken twice: a second GPU worker loses
    assert err.value.current is RecordState.TAKEN
    records.transition(task, RecordState.RUNNING, {"progress": 2})
    assert records.update(task, {"progress": 40, "stage": "generating"})
    records.transition(task, RecordState.COMPLETED, {"progress": 100}, ttl_s=300, stats_field="h1|completed|none")
    assert not records.update(task, {"progress": 1})  # finished: progress writes are refused
    rec = records.get(task)
    assert rec.state is RecordState.COMPLETED and rec.progress == 100 and rec.stage == "generating" and rec.worker == "w1"
    assert 200 < conn.ttl(record_key(task)) <= 300
    assert [conn.zcard(index_key(s)) for s in RecordState] == [0, 0, 0, 1, 0, 0]
    assert conn.hget(STATS_KEY, "h1|completed|none") == b"1"
    with pytest.raises(IllegalTransition):
        records.transition(task, RecordState.FAILED)  # a finished job stays finished
    with pytest.raises(IllegalTransition) as err:
        records.transition("b" * 32, RecordState.TAKEN)
    assert err.value.current is None
    assert not records.update("b" * 32, {"progress": 5})
    assert not conn.exists(record_key("b" * 32))  # an update never creates a record


def test_a_cancel_and_a_take_race_and_exactly_one_wins(redis_server):
    conn = redis_server.client()
    for round_ in range(30):
        task = _new_record(conn, f"{round_:032x}")
        outcomes = []
        barrier = threading.Barrier(2)

        def attempt(target):
            records = Records(redis_server.client())
            barrier.wait()
            try:
                records.transition(task, target, only_from=frozenset({RecordState.QUEUED}))
                outcomes.append(target)
            except IllegalTransition:
                pass

        threads = [threading.Thread(target=attempt, args=(s,)) for s in (RecordState.TAKEN, RecordState.CANCELLED)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(outcomes) == 1
        assert Records(conn).get(task).state is outcomes[0]
    assert conn.zcard(index_key(RecordState.QUEUED)) == 0
    assert conn.zcard(index_key(RecordState.TAKEN)) + conn.zcard(index_key(RecordState.CANCELLED)) == 30
