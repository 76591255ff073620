"""Tune: a recipe's [tune] table → one Optuna study per group → the best values, in a file the
recipe's `tuned` key reads.

Reads the recipe; writes `<out>/<name>/tune.journal` (the studies, unless `storage` names a
database), `trials/runs/<run-id>/` (one training run per trial, the files of a sweep's run; on
Slurm also `trials/jobs.jsonl` and `trials/slurm/`) and `best.toml` (`recipe.write_tuned`: the best
trial's [train] values per group).

1. Groups. [tune] group_by names a grid axis: one study per value of it ("lr per model size"); a
   trial trains that value's grid point with every other axis at its middle value, at the recipe's
   first seed, with the token budget of the sweep. Without group_by there is one study, "all", at
   the grid's middle point.
2. Trials. The driver asks a study for the next values (TPE: half the trials random, then
   guided; a constant liar keeps parallel trials apart) and trains them as a `RunSpec` run,
   evaluated `evals` times, on the sweep's executors: locally in a pool of worker processes placed
   as a sweep's are (one per GPU, `runs_per_gpu` sharing each GPU, or one per CPU without GPU:
   `sweeps.workers`), which die with the driver and stop at a step's end on an error or Ctrl-C
   (the stopped trials are retried by the next `umv2 tune`); or on Slurm, one job per trial through
   `sweeps.slurm.submit`, requeued from its checkpoint when preempted.
3. Pruning. Each evaluation's metric is reported to the study, and a trial that the median pruner
   stops is PRUNED (its run could resume). Locally the worker reports and stops its run itself; on
   Slurm the driver reads the run's metrics as they come and cancels the job.
4. Failures. A run that diverges (NaN/Inf: `RunFailed`) is a FAIL trial with the run's reason and
   is tried again, up to `retries` times, with the next seed. A trial whose worker or job died
   (a killed tune, a failed Slurm job) is FAIL too, and retried with the same seed: its run resumes
   from its checkpoint. (optuna's RetryFailedTrialCallback needs heartbeats, which the journal
   storage does not have, so this is its equivalent.)
5. Storage. By default a `JournalStorage` on `tune.journal` (`JournalFileBackend` with a symlink
   lock, which works on NFS too): an append-only log that many workers can share. `storage` may
   instead be a PostgreSQL/MySQL URL. Never SQLite: it locks up with parallel workers and breaks on
   network filesystems (optuna #820, #4994). Running tune again continues the same studies.
6. Budget. Each study runs until it has `n_trials` trials that are not retries, and its retries.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from umv2cli.config import RunSpec
from umv2cli.errors import UserError
from umv2cli.files import make_dir
from umv2cli.sweeps.plan import PlannedRun, build_plan, run_id
from umv2cli.sweeps.recipe import Recipe, TuneSpec, Tuned, group_key, load_recipe, write_tuned
from umv2cli.sweeps.workers import WorkerPool, first_done, place, stop_if_pool_stops

JOURNAL = "tune.journal"
POLL_S = 3.0
"""Seconds between two looks at the trials running on Slurm."""
SLURM_TRIALS = 4
"""Trials at once on Slurm unless --workers says otherwise."""


def tune(recipe_path: Path, out: Path, *, executor: str = "local", storage: str | None = None,
         workers: int | None = None, runs_per_gpu: int = 1, n_trials: int | None = None,
         on_trial: Callable[[str, Any], None] | None = None) -> tuple[Path, dict]:
    """Run (or continue) every study of the recipe and write best.toml; returns the folder and each
    group's summary: its best value and values (None when no trial completed), trials by state."""
    import optuna

    from umv2cli.data import open_data
    from umv2cli.sweeps.slurm import slurm_options

    recipe = load_recipe(recipe_path)
    if recipe.tune is None:
        raise UserError(f"{recipe_path}: no [tune] table; add one, e.g. [tune] with lr = {{low = 1e-4, high = 1e-2, "
                        "log = true}")
    if executor not in ("local", "slurm"):
        raise UserError(f"--executor {executor}: must be local or slurm")
    spec = recipe.tune if n_trials is None else dataclasses.replace(recipe.tune, n_trials=n_trials)
    bases = group_specs(recipe)
    slurm = slurm_options(recipe.slurm, where=str(recipe_path)) if executor == "slurm" else None
    if executor == "local":
        open_data(recipe.data)  # a missing data folder stops us before anything is written
    folder = out / recipe.name
    storage_spec = storage or str(folder / JOURNAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(storage_spec)
    make_dir(folder / "trials" / "runs")
    studies = {group: open_study(store, f"{recipe.name}/{group}", spec) for group in bases}
    for group, study in studies.items():
        for trial in retry_stale(study, store, spec):
            if on_trial:
                on_trial(group, trial)
    if slurm is None:
        pool = WorkerPool(place([base.train.device for base in bases.values()], workers, runs_per_gpu))
        _drive_local(studies, bases, spec, storage_spec, folder / "trials", pool, on_trial)
    else:
        _drive_slurm(studies, bases, spec, folder / "trials", slurm, workers or SLURM_TRIALS, on_trial)
    summary = {group: summarize(study) for group, study in studies.items()}
    best = {g: s for g, s in summary.items() if s["best_value"] is not None}
    if best:
        write_tuned(folder / "best.toml", Tuned(spec.group_by, {g: s["best_params"] for g, s in best.items()}),
                    {g: {"study": studies[g].study_name, "trial": s["best_trial"], spec.metric: s["best_value"],
                         "run_id": s["best_run_id"]} for g, s in best.items()})
    return folder, summary


# ----------------------------------------------------------------------------------------------
# 1. groups


def group_specs(recipe: Recipe) -> dict[str, RunSpec]:
    """group key → the RunSpec its trials start from: the grid's middle point (the group axis at
    each of its values), planned as the sweep plans it, at the first seed, without `tuned`."""
    group_by = recipe.tune.group_by
    middle = recipe.middle()
    grid = {axis: values if axis == group_by else [middle[axis]] for axis, values in recipe.grid.items()}
    runs = build_plan(dataclasses.replace(recipe, grid=grid, seeds=recipe.seeds[:1], corner_seeds=(), tuned=None))
    keys = [group_key(v) for v in recipe.grid[group_by]] if group_by else ["all"]
    return {key: run.spec for key, run in zip(keys, runs)}


def trial_spec(base: RunSpec, params: dict[str, Any], seed_offset: int, evals: int) -> RunSpec:
    """The base run with the trial's values and seed, evaluated `evals` times (unless the recipe
    sets train.eval_every)."""
    train = base.train
    eval_every = train.eval_every or max(1, train.steps // evals)
    return dataclasses.replace(base, train=dataclasses.replace(train, **params, seed=train.seed + seed_offset,
                                                               eval_every=eval_every))


# ----------------------------------------------------------------------------------------------
# 2.-3. trials: asked and told here, trained by a worker or a Slurm job


def ask(study, spec: TuneSpec, base: RunSpec) -> tuple[Any, PlannedRun]:
    """The study's next trial and its run (the retry of a failed trial when one waits)."""
    trial = study.ask(distributions(spec))
    run = trial_spec(base, trial.params, trial.user_attrs.get("seed_offset", 0), spec.evals)
    planned = PlannedRun(run_id(run), run, {})
    trial.set_user_attr("run_id", planned.run_id)
    return trial, planned


def distributions(spec: TuneSpec) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {name: CategoricalDistribution(p.choices) if p.choices else FloatDistribution(p.low, p.high, log=p.log)
            for name, p in spec.params.items()}


def has_work(study, spec: TuneSpec) -> bool:
    """Fewer than n_trials trials that are not retries, or a retry waiting."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    fresh = sum("retry_of" not in t.user_attrs for t in trials)
    return fresh < spec.n_trials or any(t.state == TrialState.WAITING for t in trials)


def _drive_local(studies: dict, bases: dict[str, RunSpec], spec: TuneSpec, storage_spec: str, trials: Path,
                 pool: WorkerPool, on_trial) -> None:
    """Keep a trial training in each worker of `pool` until every study has its trials."""
    pending: dict[Future, tuple[str, Any]] = {}
    with pool:
        while True:
            for group, study in studies.items():
                while len(pending) < pool.size and has_work(study, spec):
                    trial, run = ask(study, spec, bases[group])
                    # the worker rebuilds the trial from its storage id, which only `_trial_id` holds
                    pending[pool.submit(run_trial, storage_spec, study.study_name, trial._trial_id, run.spec,
                                        trials / "runs" / run.run_id, spec.metric, spec.prune)] = (group, trial)
            if not pending:
                return
            for future in first_done(pending):
                group, trial = pending.pop(future)
                told = tell(studies[group], trial, future.result(), spec)
                if on_trial:
                    on_trial(group, told)


def run_trial(storage_spec: str, study_name: str, trial_id: int, spec: RunSpec, run_dir: Path, metric: str,
              prune: bool) -> dict[str, Any]:
    """In a worker: train the trial's run, reporting `metric` at each evaluation and stopping when
    the pruner says so; returns {"state": complete | pruned | failed, "value", "step", "reason"}."""
    import optuna

    from umv2cli.rundir import read_status
    from umv2cli.train import RunFailed, train

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_spec), pruner=pruner(prune))
    trial = optuna.Trial(study, trial_id)
    last: dict[str, Any] = {"step": 0, "value": None}

    def report(line: dict) -> None:
        stop_if_pool_stops(line)
        if "eval_loss" in line:  # an evaluation step
            last.update(step=line["step"], value=line[metric])
            trial.report(line[metric], line["step"])
            if trial.should_prune():
                raise optuna.TrialPruned()

    try:
        result = train(spec, run_dir, resume=None, on_step=report)
    except optuna.TrialPruned:
        return {"state": "pruned", **last, "reason": f"pruned at step {last['step']}"}
    except RunFailed as e:
        return {"state": "failed", **last, "reason": read_status(run_dir) or str(e), "seed_step": 1}
    value = result.final.get(metric, math.nan)
    if result.status != "done" or not math.isfinite(value):
        return {"state": "failed", **last, "reason": f"{result.status}; {metric} = {value}", "seed_step": 1}
    return {"state": "complete", "step": result.step, "value": value, "reason": ""}


@dataclasses.dataclass
class _SlurmTrial:
    group: str
    trial: Any
    run: PlannedRun
    job_id: str
    reported: int = 0
    """The last step whose evaluation was reported to the study."""
    pruned: bool = False


def _drive_slurm(studies: dict, bases: dict[str, RunSpec], spec: TuneSpec, trials: Path, options, parallel: int,
                 on_trial) -> None:
    """Keep `parallel` trials as Slurm jobs until every study has its trials. Every POLL_S the
    driver reports new evaluations from each run's metrics, cancels the jobs of pruned trials, and
    tells the study about the runs that ended (one scheduler query for all of them)."""
    from umv2cli.sweeps.ledger import run_states
    from umv2cli.sweeps.slurm import cancel, submit

    pending: dict[str, _SlurmTrial] = {}
    while True:
        for group, study in studies.items():
            while len(pending) < parallel and has_work(study, spec):
                trial, run = ask(study, spec, bases[group])
                (job_id,) = submit(trials, [run], options)
                pending[run.run_id] = _SlurmTrial(group, trial, run, job_id)
        if not pending:
            return
        time.sleep(POLL_S)
        states = run_states(trials, {r: p.run.spec.train.steps for r, p in pending.items()})
        for state in states:
            p = pending[state.run_id]
            run_dir = trials / "runs" / state.run_id
            p.reported = report_evaluations(p.trial, run_dir, spec.metric, p.reported)
            if spec.prune and not p.pruned and p.reported and p.trial.should_prune():
                cancel([p.job_id])  # the run checkpoints on the signal and stops
                p.pruned = True
            if state.state in ("done", "failed") or not state.scheduled:
                del pending[state.run_id]
                told = tell(studies[p.group], p.trial, slurm_outcome(state, p, run_dir, spec.metric), spec)
                if on_trial:
                    on_trial(p.group, told)


def report_evaluations(trial, run_dir: Path, metric: str, after: int) -> int:
    """Report the run's evaluations after step `after` to the study; the last step reported."""
    from umv2cli.rundir import read_metrics

    for line in read_metrics(run_dir):
        if "eval_loss" in line and line["step"] > after:
            trial.report(line[metric], line["step"])
            after = line["step"]
    return after


def slurm_outcome(state, p: _SlurmTrial, run_dir: Path, metric: str) -> dict[str, Any]:
    """A trial's outcome from its run's state once its job has ended."""
    from umv2cli.rundir import tail_metrics

    if state.state == "done":
        value = tail_metrics(run_dir)[-1].get(metric, math.nan)
        if math.isfinite(value):
            return {"state": "complete", "step": state.step, "value": value, "reason": ""}
        return {"state": "failed", "step": state.step, "reason": f"{metric} = {value}", "seed_step": 1}
    if p.pruned:
        return {"state": "pruned", "step": p.reported, "reason": f"pruned at step {p.reported}"}
    own = (run_dir / "STATUS").exists()  # the run's own failure (NaN/Inf), else its job's
    reason = state.reason or f"its Slurm job {p.job_id} ended ({state.job_state or 'gone'}) at step {state.step}"
    return {"state": "failed", "step": state.step, "reason": reason, "seed_step": 1 if own else 0}


# ----------------------------------------------------------------------------------------------
# 4. outcomes, failures and retries


def tell(study, trial, outcome: dict[str, Any], spec: TuneSpec):
    """Record a trial's outcome; a failed one is retried, with the next seed after a divergence
    ("seed_step" 1), with the same one (resuming its run) after a lost worker or job. Returns the
    finished trial."""
    from optuna.trial import TrialState

    trial.set_user_attr("reason", outcome["reason"])
    if outcome["state"] == "complete":
        return study.tell(trial, outcome["value"])
    if outcome["state"] == "pruned":
        return study.tell(trial, state=TrialState.PRUNED)
    told = study.tell(trial, state=TrialState.FAIL)
    retry(study, told, spec, seed_step=outcome["seed_step"])
    return told


def retry(study, trial, spec: TuneSpec, seed_step: int) -> None:
    """Enqueue the same values again unless the trial's line has used its retries."""
    attrs = trial.user_attrs
    if attrs.get("retries", 0) < spec.retries:
        study.enqueue_trial(trial.params, user_attrs={
            "retry_of": attrs.get("retry_of", trial.number), "retries": attrs.get("retries", 0) + 1,
            "seed_offset": attrs.get("seed_offset", 0) + seed_step})


def retry_stale(study, storage, spec: TuneSpec) -> list:
    """Trials left RUNNING by a tune that was killed: FAIL, and retried at the same seed, so their
    runs resume from their checkpoints. Returns them. (Run one tune of a study at a time: a second
    one would take the first one's trials for stale.)"""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_user_attr(trial._trial_id, "reason", "its tune stopped before it finished")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        retry(study, trial, spec, seed_step=0)
    return [storage.get_trial(t._trial_id) for t in stale]


def summarize(study) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {name: sum(t.state == state for t in trials)
              for name, state in (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED),
                                  ("failed", TrialState.FAIL))}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    return {"study": study.study_name, **counts,
            "best_value": best.value if best else None, "best_params": best.params if best else None,
            "best_trial": best.number if best else None, "best_run_id": best.user_attrs.get("run_id") if best else None}


# ----------------------------------------------------------------------------------------------
# 5. storage and studies


def open_storage(spec: str):
    """A journal file (the default, safe for many workers, NFS included) or a PostgreSQL/MySQL URL."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if spec.startswith("sqlite"):
        raise UserError(f"--storage {spec}: SQLite locks up with parallel workers and breaks on network "
                        "filesystems; leave --storage out (a journal file) or give a PostgreSQL/MySQL URL")
    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec)
        except Exception as e:  # the database driver's own error types
            raise UserError(f"--storage {spec}: cannot open ({str(e).splitlines()[0]}); check the URL, the "
                            "server and its Python driver") from None
    path = Path(spec)
    make_dir(path.parent)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path))))


def open_study(storage, name: str, spec: TuneSpec):
    """Create or continue a study. The sampler's seed moves on with the trials already in it, so a
    continued study does not draw its first values again."""
    import optuna

    existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    sampler = optuna.samplers.TPESampler(n_startup_trials=max(2, spec.n_trials // 2),
                                         seed=spec.seed + existing.get(name, 0))
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner(spec.prune),
                               direction="minimize", load_if_exists=True)


def pruner(prune: bool):
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2) if prune else optuna.pruners.NopPruner()
