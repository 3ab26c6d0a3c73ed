"""The fleet on SQLite: registration, heartbeats, the lost rule, placement reasons, the heartbeat thread."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from shared import fleet
from shared.db.models import ExperimentState, SqlEvent, SqlExperiment, SqlWorker, WorkerState
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.settings import Settings
from tests.rows import add_queued_run
from workers import heartbeat

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LOST_AFTER = 15.0  # 3 heartbeats of 5 s


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def worker(
    id: str,
    *,
    gpus: int = 0,
    state: WorkerState = WorkerState.IDLE,
    queues: Sequence[str] = ("gpu",),
) -> fleet.WorkerView:
    return fleet.WorkerView(
        id=id,
        hostname="h",
        queues=list(queues),
        gpus=gpus,
        gpu_model=None,
        memory_bytes=None,
        versions={},
        state=state,
        current_experiment_id=None,
        started_at=T0,
        last_heartbeat=T0,
        seconds_since_heartbeat=0.0,
    )


def register(
    engine: Engine, worker_id: str, *, gpus: int = 0, queues: Sequence[str] = ("gpu",)
) -> None:
    with session_scope(engine) as session:
        fleet.register_worker(
            session,
            worker_id=worker_id,
            hostname="box",
            queues=queues,
            gpus=gpus,
            gpu_model="H200" if gpus else None,
            memory_bytes=141 * 2**30 if gpus else None,
            versions={"python": "3.11"},
            now=T0,
        )


# --- placement -----------------------------------------------------------------


def test_cpu_run_is_placeable_on_a_cpu_fleet() -> None:
    result = fleet.placement(0, 1, [worker("a")], queue="cpu")
    assert result == fleet.Placement(True, True, None)


def test_two_8_gpu_nodes_with_one_8_gpu_worker_can_never_be_placed() -> None:
    result = fleet.placement(8, 2, [worker("a", gpus=8)], queue="gpu")
    assert not result.placeable_ever and not result.placeable_now
    assert result.reason is not None
    assert "needs 2 nodes with 8 GPUs" in result.reason
    assert "1 live worker with 8+ GPUs on queue 'gpu' (1 idle)" in result.reason


def test_no_live_worker_on_the_queue() -> None:
    lost = worker("a", gpus=8, state=WorkerState.LOST)
    result = fleet.placement(1, 1, [lost], queue="x")
    assert result.reason == "no live worker on queue 'x'"
    assert not result.placeable_ever


def test_a_cpu_worker_cannot_take_a_gpu_run() -> None:
    result = fleet.placement(1, 1, [worker("a", gpus=0)], queue="gpu")
    assert not result.placeable_ever
    assert (
        result.reason
        == "needs 1 node with 1 GPU; no live worker on queue 'gpu' has 1+ GPUs (the most is 0)"
    )


def test_fits_the_fleet_but_not_now() -> None:
    fleet_now = [worker("a", gpus=8), worker("b", gpus=8, state=WorkerState.BUSY)]
    result = fleet.placement(8, 2, fleet_now, queue="gpu")
    assert result.placeable_ever and not result.placeable_now
    assert result.reason == "waiting for 2 idle workers with 8+ GPUs; 1 is idle"


def test_gpu_workers_take_cpu_runs_too() -> None:
    assert fleet.placement(0, 2, [worker("a", gpus=8), worker("b")], queue="q").placeable_now


def test_resources_of_uses_the_spec_defaults() -> None:
    assert fleet.resources_of({}) == (1, 1)
    assert fleet.resources_of({"resources": {"gpus": 0, "nodes": 3}}) == (0, 3)
    assert fleet.resources_of({"resources": {"gpus": "x", "nodes": 0}}) == (1, 1)


# --- rows: register, heartbeat, lost ----------------------------------------------


def test_effective_state_turns_lost_after_three_heartbeats(engine: Engine) -> None:
    register(engine, "box:1")
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "box:1")
        assert row is not None
        assert (
            fleet.effective_state(row, T0 + timedelta(seconds=14.9), LOST_AFTER) is WorkerState.IDLE
        )
        assert (
            fleet.effective_state(row, T0 + timedelta(seconds=15.1), LOST_AFTER) is WorkerState.LOST
        )
        assert row.state is WorkerState.IDLE  # read time only: nothing written


def test_heartbeat_keeps_a_worker_live_and_an_unknown_one_reregisters(engine: Engine) -> None:
    register(engine, "box:1")
    later = T0 + timedelta(seconds=12)
    with session_scope(engine) as session:
        assert fleet.heartbeat(session, worker_id="box:1", now=later)
        assert not fleet.heartbeat(session, worker_id="box:2", now=later)
    with session_scope(engine) as session:
        views = fleet.list_workers(
            session, now=later + timedelta(seconds=10), lost_after_s=LOST_AFTER
        )
    assert [(v.id, v.state) for v in views] == [("box:1", WorkerState.IDLE)]
    assert views[0].seconds_since_heartbeat == pytest.approx(10.0)


def test_busy_idle_and_mark_lost_then_recovery(engine: Engine) -> None:
    register(engine, "box:1", gpus=8)
    register(engine, "box:2", gpus=8)
    with session_scope(engine) as session:
        run = add_queued_run(session)
    with session_scope(engine) as session:
        assert fleet.mark_busy(session, worker_id="box:1", experiment_id=run, now=T0)
        # box:2 keeps beating; box:1 goes silent.
        fleet.heartbeat(session, worker_id="box:2", now=T0 + timedelta(seconds=10))
    with session_scope(engine) as session:
        lost = fleet.mark_lost(session, now=T0 + timedelta(seconds=20), lost_after_s=LOST_AFTER)
    assert lost == ["box:1"]
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "box:1")
        assert row is not None and row.state is WorkerState.LOST
        assert row.current_experiment_id == run  # what it was running when it vanished
        kinds = session.scalars(select(SqlEvent.kind).where(SqlEvent.actor == "system")).all()
        assert list(kinds) == ["worker.lost"]
        # It was only cut off: its next beat brings it back busy with the same run.
        assert fleet.heartbeat(session, worker_id="box:1", now=T0 + timedelta(seconds=21))
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "box:1")
        assert row is not None and row.state is WorkerState.BUSY
        assert not fleet.mark_idle(session, worker_id="box:1", experiment_id="exp_other", now=T0)
        assert fleet.mark_idle(session, worker_id="box:1", experiment_id=run, now=T0)
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "box:1")
        assert row is not None and (row.state, row.current_experiment_id) == (
            WorkerState.IDLE,
            None,
        )
        assert fleet.deregister(session, worker_id="box:1", now=T0)
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "box:1")
        assert row is not None and row.state is WorkerState.LOST
        assert "worker.stopped" in session.scalars(select(SqlEvent.kind)).all()


def test_queue_status_gives_each_waiting_run_its_reason(engine: Engine) -> None:
    register(engine, "box:1", gpus=2)
    register(engine, "box:2", gpus=2)
    with session_scope(engine) as session:
        too_big = add_queued_run(session, spec={"resources": {"gpus": 4, "nodes": 3}}, priority=9)
        fits = add_queued_run(session, spec={"resources": {"gpus": 2, "nodes": 2}}, priority=5)
        behind = add_queued_run(session, spec={"resources": {"gpus": 1, "nodes": 1}}, priority=1)
        add_queued_run(session, queue="cpu", spec={"resources": {"gpus": 0}})
    with session_scope(engine) as session:
        statuses = fleet.queue_status(
            session, broker_depths={"gpu": 2, "empty": 0}, now=T0, lost_after_s=LOST_AFTER
        )
    by_name = {s.name: s for s in statuses}
    assert set(by_name) == {"gpu", "cpu", "empty"}
    gpu = by_name["gpu"]
    assert (gpu.database_depth, gpu.broker_depth, gpu.live_workers, gpu.idle_workers) == (
        3,
        2,
        2,
        2,
    )
    assert gpu.oldest_waiting_id == too_big
    waiting = {w.id: w for w in gpu.waiting}
    assert [w.id for w in gpu.waiting] == [too_big, fits, behind]
    assert (
        waiting[too_big].reason
        == "needs 3 nodes with 4 GPUs; no live worker on queue 'gpu' has 4+ GPUs (the most is 2)"
    )
    assert waiting[fits].reason is None and waiting[fits].placeable_now
    assert waiting[behind].placeable_ever and not waiting[behind].placeable_now
    assert waiting[behind].reason is not None and "taken by 2 runs ahead" in waiting[behind].reason
    assert by_name["cpu"].waiting[0].reason == "no live worker on queue 'cpu'"
    assert by_name["empty"].database_depth == 0 and by_name["empty"].oldest_waiting_id is None


def test_known_queues_ignores_finished_runs(engine: Engine) -> None:
    register(engine, "box:1", queues=("gpu", "cpu"))
    with session_scope(engine) as session:
        add_queued_run(session, queue="old", state=ExperimentState.SUCCEEDED)
        add_queued_run(session, queue="new")
        assert fleet.known_queues(session) == ["cpu", "gpu", "new"]


# --- the worker side -------------------------------------------------------------


def fake_smi(output: str) -> heartbeat.Runner:
    def run(command: Sequence[str]) -> str:
        assert command[0] == "nvidia-smi"
        return output

    return run


def no_smi(command: Sequence[str]) -> str:
    raise FileNotFoundError(command[0])


def test_detect_gpus_from_nvidia_smi() -> None:
    hw = heartbeat.detect_gpus(
        fake_smi("NVIDIA H200, 143771, 550.54\nNVIDIA H200, 143771, 550.54\n")
    )
    assert hw == heartbeat.Hardware(2, "NVIDIA H200", 143771 * 2**20, "550.54")
    assert heartbeat.detect_gpus(no_smi) == heartbeat.Hardware(0, None, None, None)
    failing = fake_smi("")
    assert heartbeat.detect_gpus(failing).gpus == 0


def test_declared_gpus_override_detection(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, worker_gpus=2)
    assert heartbeat.hardware(settings, no_smi) == heartbeat.Hardware(2, None, None, None)
    assert heartbeat.hardware(Settings(home=tmp_path), no_smi).gpus == 0


def test_settings_lost_after_defaults_to_three_heartbeats(tmp_path: Path) -> None:
    assert Settings(home=tmp_path, worker_heartbeat_s=0.5).worker_lost_after_s == 1.5
    assert Settings(home=tmp_path, worker_lost_after_s=7).worker_lost_after_s == 7


def test_fleet_worker_id_is_the_name_or_host_and_main_pid(tmp_path: Path) -> None:
    assert heartbeat.fleet_worker_id(Settings(home=tmp_path, worker_name="w1")) == "w1"
    assert heartbeat.fleet_worker_id(Settings(home=tmp_path)).endswith(f":{heartbeat.MAIN_PID}")


def test_versions_never_import_torch() -> None:
    import sys

    had_torch = "torch" in sys.modules
    found = heartbeat.versions("550.54")
    assert found["python"] and found["celery"] and found["nvidia_driver"] == "550.54"
    assert ("torch" in sys.modules) == had_torch


def test_heartbeat_thread_registers_beats_and_survives_a_database_outage(
    engine: Engine, tmp_path: Path
) -> None:
    hw = heartbeat.Hardware(2, None, None, None)
    beat = heartbeat.Heartbeat(
        engine, worker_id="w1", queues=["gpu"], interval_s=0.05, hw=hw, versions={"python": "3"}
    )
    assert beat.tick()
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "w1")
        assert row is not None and (row.gpus, row.queues, row.state) == (
            2,
            ["gpu"],
            WorkerState.IDLE,
        )
        first = row.last_heartbeat
    # A database that cannot be opened: the tick fails, is counted, and does not raise.
    broken = make_engine(f"sqlite:///{tmp_path / 'missing' / 'no.db'}")
    down = heartbeat.Heartbeat(
        broken, worker_id="w2", queues=["gpu"], interval_s=0.05, hw=hw, versions={}
    )
    down.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while down.failures < 2 and datetime.now(UTC) < deadline:
            time.sleep(0.02)
        assert down.failures >= 2 and not down.registered
    finally:
        down.stop()
        broken.dispose()
    beat.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while datetime.now(UTC) < deadline:
            with session_scope(engine) as session:
                row = session.get(SqlWorker, "w1")
                assert row is not None
                if row.last_heartbeat > first:
                    break
            time.sleep(0.02)
        assert row.last_heartbeat > first
    finally:
        beat.stop()
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "w1")
        assert row is not None and row.state is WorkerState.LOST  # a clean stop


def test_placement_for_run_reads_the_spec_and_the_live_fleet(engine: Engine) -> None:
    register(engine, "box:1", gpus=2)
    with session_scope(engine) as session:
        small = add_queued_run(session, spec={"resources": {"gpus": 2, "nodes": 1}})
        big = add_queued_run(session, spec={"resources": {"gpus": 4, "nodes": 3}})
    with session_scope(engine) as session:
        now = T0 + timedelta(seconds=1)
        for run_id, ever in ((small, True), (big, False)):
            run = session.get(SqlExperiment, run_id)
            assert run is not None
            assert (
                fleet.placement_for_run(
                    session, run, now=now, lost_after_s=LOST_AFTER
                ).placeable_ever
                is ever
            )
        later = T0 + timedelta(seconds=LOST_AFTER + 1)  # the only worker went silent
        run = session.get(SqlExperiment, small)
        assert run is not None
        assert fleet.placement_for_run(session, run, now=later, lost_after_s=LOST_AFTER).reason == (
            "no live worker on queue 'gpu'"
        )
