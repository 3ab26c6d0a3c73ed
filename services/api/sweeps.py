"""Sweeps: one spec expanded over grid or random choices, each trial a normal experiment.

A choice is a dotted path into the spec document (``model.arch``,
``data.batch_size``, ``stages.1.max_lr``; ``stages.*.epochs`` sets it in
every stage) and either a list of values or, for ``random``, a range
``{"low", "high", "log", "integer"}``. Every trial's spec is validated in
full before anything is written, and the sweep and all its runs are written
in one transaction: a sweep with one bad trial creates nothing and the 422
names the trial and the field.

Trials are ordinary runs (own spec, own outbox message) that carry
``sweep_id``, so one failed trial fails alone, and the runs page,
comparisons and leaderboards filter by sweep.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select

from services.api.auth import Caller
from services.api.crud import spec_hash, submission_rows
from services.api.errors import Forbidden
from services.api.schemas import SweepCreate, SweepList, SweepRead, SweepTrial
from shared.db.base import utcnow
from shared.db.models import SqlEvent, SqlExperiment, SqlOutbox, SqlProject, SqlSweep, new_id
from shared.db.session import session_scope
from shared.errors import FieldProblem, InvalidSpec, NotFound
from shared.spec import ExperimentSpec
from shared.spec_io import dump_spec, validate_spec

#: Trials one sweep may create: beyond this a typo in a grid floods the queue.
MAX_TRIALS = 200
MAX_VALUES = 100


@dataclass(frozen=True)
class Trial:
    """One expanded trial: the choices that made it and its validated spec."""

    values: dict[str, Any]
    spec: ExperimentSpec


def _problem(path: str, message: str) -> InvalidSpec:
    return InvalidSpec([FieldProblem(path, message)])


def set_path(document: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at dotted ``path`` in ``document``; ``*`` means every item of a list.

    The parent of the last key must exist (a new leaf key in a mapping is
    fine: ``data.resize`` when the base spec leaves it out); ValueError says
    which part of the path is wrong.
    """
    parts = path.split(".")
    targets: list[Any] = [document]
    for depth, part in enumerate(parts[:-1]):
        following: list[Any] = []
        for target in targets:
            following.extend(_step(target, part, ".".join(parts[: depth + 1])))
        targets = following
    last = parts[-1]
    for target in targets:
        if isinstance(target, dict):
            target[last] = copy.deepcopy(value)
        elif isinstance(target, list):
            for index in _indices(target, last, path):
                target[index] = copy.deepcopy(value)
        else:
            raise ValueError(f"{'.'.join(parts[:-1])} is a value, not a mapping or a list")


def _indices(target: list[Any], part: str, where: str) -> list[int]:
    if part == "*":
        return list(range(len(target)))
    if not part.isdigit() or int(part) >= len(target):
        raise ValueError(f"{where}: the list has {len(target)} items; {part!r} is not one of them")
    return [int(part)]


def _step(target: Any, part: str, where: str) -> list[Any]:
    if isinstance(target, dict):
        if part not in target or not isinstance(target[part], dict | list):
            raise ValueError(f"{where} is not in the base spec (as a mapping or a list)")
        return [target[part]]
    if isinstance(target, list):
        return [target[i] for i in _indices(target, part, where)]
    raise ValueError(f"{where}: cannot go into a plain value")


def _choices(path: str, choice: Any, strategy: str) -> list[Any] | dict[str, Any]:
    where = f"parameters.{path}"
    if isinstance(choice, list):
        if not choice:
            raise _problem(where, "give at least one value")
        if len(choice) > MAX_VALUES:
            raise _problem(where, f"at most {MAX_VALUES} values per parameter")
        return choice
    if isinstance(choice, Mapping) and strategy == "random":
        unknown = set(choice) - {"low", "high", "log", "integer"}
        if unknown:
            raise _problem(
                where, f"unknown range keys {sorted(unknown)}: use low, high, log, integer"
            )
        low, high = choice.get("low"), choice.get("high")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise _problem(where, "a range needs numeric low and high")
        assert isinstance(low, int | float)
        assert isinstance(high, int | float)
        if not low < high:
            raise _problem(where, "low must be below high")
        if choice.get("log") and low <= 0:
            raise _problem(where, "a log range needs low > 0")
        return dict(choice)
    kinds = "a list of values" + (
        " or a range {low, high, log, integer}" if strategy == "random" else ""
    )
    raise _problem(where, f"give {kinds}")


def _draw(choice: list[Any] | dict[str, Any], rng: random.Random) -> Any:
    if isinstance(choice, list):
        return rng.choice(choice)
    low, high = float(choice["low"]), float(choice["high"])
    value = (
        math.exp(rng.uniform(math.log(low), math.log(high)))
        if choice.get("log")
        else rng.uniform(low, high)
    )
    return round(value) if choice.get("integer") else value


def combinations(request: SweepCreate) -> list[dict[str, Any]]:
    """The trials' choices: every grid combination, or ``count`` random draws with ``seed``."""
    if not request.parameters:
        raise _problem("parameters", "give at least one spec path to vary")
    space = {
        path: _choices(path, choice, request.strategy)
        for path, choice in request.parameters.items()
    }
    if request.strategy == "grid":
        if request.count is not None:
            raise _problem("count", "count is for random sweeps; a grid makes every combination")
        size = math.prod(len(v) for v in space.values() if isinstance(v, list))
        if size > MAX_TRIALS:
            raise _problem("parameters", f"the grid has {size} combinations; at most {MAX_TRIALS}")
        paths = list(space)
        lists = [space[p] for p in paths]
        return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*lists)]
    if request.count is None:
        raise _problem("count", "a random sweep needs count (how many trials to draw)")
    if request.count > MAX_TRIALS:
        raise _problem("count", f"at most {MAX_TRIALS} trials per sweep")
    rng = random.Random(request.seed)
    return [
        {path: _draw(choice, rng) for path, choice in space.items()} for _ in range(request.count)
    ]


def expand(request: SweepCreate, *, default_project: str | None) -> list[Trial]:
    """Every trial's validated spec; InvalidSpec names the trial and field of the first bad one."""
    base = copy.deepcopy(request.spec)
    if "project" not in base and default_project is not None:
        base["project"] = default_project
    validate_spec(copy.deepcopy(base))  # a bad base spec is reported once, not per trial
    trials: list[Trial] = []
    chosen = combinations(request)
    width = len(str(len(chosen)))
    for index, values in enumerate(chosen):
        document = copy.deepcopy(base)
        for path, value in values.items():
            try:
                set_path(document, path, value)
            except ValueError as exc:
                raise _problem(f"parameters.{path}", str(exc)) from exc
        document["name"] = f"{request.name}-{index + 1:0{width}d}"
        try:
            spec = validate_spec(document)
        except InvalidSpec as exc:
            shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
            raise InvalidSpec(
                [
                    FieldProblem(f"trials[{index}].{p.path}", f"{p.message} (trial {shown})")
                    for p in exc.problems
                ]
            ) from exc
        trials.append(Trial(values=values, spec=spec))
    return trials


def create(
    *, engine: Engine, caller: Caller, request: SweepCreate, trials: list[Trial]
) -> SweepRead:
    """Write the sweep and one run per trial (with outbox messages) in one transaction."""
    project = trials[0].spec.project
    if not caller.can_see(project):
        raise Forbidden(
            f"this token belongs to project {caller.project!r} and cannot submit "
            f"into project {project!r}"
        )
    sweep_id = new_id("swp")
    now = utcnow()
    runs, messages, events, recorded = [], [], [], []
    for trial in trials:
        spec = trial.spec.model_copy(update={"tags": [*trial.spec.tags, f"sweep:{sweep_id}"]})
        document = dump_spec(spec)
        run_id = new_id("exp")
        run_row, message_row, event_row = submission_rows(
            caller=caller,
            spec=spec,
            document=document,
            digest=spec_hash(document),
            run_id=run_id,
            now=now,
            sweep_id=sweep_id,
        )
        event_row["message"] += f" as a trial of sweep {sweep_id}"
        runs.append(run_row)
        messages.append(message_row)
        events.append(event_row)
        recorded.append({"experiment_id": run_id, "values": trial.values})
    with session_scope(engine) as session:
        if session.get(SqlProject, project) is None:
            if not caller.is_admin:
                raise NotFound(f"no project {project!r}")
            session.add(SqlProject(id=project))
            session.flush()
        session.add(
            SqlSweep(
                id=sweep_id,
                project_id=project,
                name=request.name,
                strategy=request.strategy,
                parameters=dict(request.parameters),
                seed=request.seed,
                base_spec=dict(request.spec),
                trials=recorded,
                submitted_by=caller.token_id,
                created_at=now,
            )
        )
        session.flush()
        session.execute(insert(SqlExperiment), runs)
        session.execute(insert(SqlOutbox), messages)
        session.execute(insert(SqlEvent), events)
    return get(engine=engine, caller=caller, sweep_id=sweep_id)


def _read(sweep: SqlSweep, states: dict[str, int]) -> SweepRead:
    return SweepRead(
        id=sweep.id,
        name=sweep.name,
        project=sweep.project_id,
        strategy=sweep.strategy,
        parameters=sweep.parameters,
        seed=sweep.seed,
        created_at=sweep.created_at,
        count=len(sweep.trials),
        states=states,
        trials=[SweepTrial.model_validate(t) for t in sweep.trials],
    )


def get(*, engine: Engine, caller: Caller, sweep_id: str) -> SweepRead:
    """One sweep, its trials and how many of its runs are in each state."""
    with session_scope(engine) as session:
        sweep = session.get(SqlSweep, sweep_id)
        if sweep is None or not caller.can_see(sweep.project_id):
            raise NotFound(f"no sweep {sweep_id!r}")
        states = dict(
            session.execute(
                select(SqlExperiment.state, func.count())
                .where(SqlExperiment.sweep_id == sweep_id)
                .group_by(SqlExperiment.state)
            ).all()
        )
        return _read(sweep, {str(k): v for k, v in states.items()})


def list_sweeps(
    *, engine: Engine, caller: Caller, project: str | None = None, limit: int = 50, offset: int = 0
) -> SweepList:
    """Sweeps the caller may see, newest first (states are on each sweep's own page)."""
    conditions = []
    if not caller.is_admin:
        conditions.append(SqlSweep.project_id == caller.project)
    if project is not None:
        conditions.append(SqlSweep.project_id == project)
    with session_scope(engine) as session:
        total = session.scalar(select(func.count()).select_from(SqlSweep).where(*conditions))
        rows = session.scalars(
            select(SqlSweep)
            .where(*conditions)
            .order_by(SqlSweep.created_at.desc(), SqlSweep.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        items = [_read(row, {}) for row in rows]
    return SweepList(items=items, count=total or 0)
