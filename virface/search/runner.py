"""Searching a stage (and its missing upstream stages) with Ray Tune and Optuna.

Experiment layout, under ``<storage>/<name>/``:
  <stage>/best.json          manifest: best trial, its config, metric, best-epoch checkpoint
  <stage>/trials.json        every trial: parameters, best value, epochs, outcome
  <stage>/tb/<stage>_<id>/   TensorBoard run of each trial (scalars + HParams with the outcome)
  <stage>/optuna.journal     the Optuna study (open it with optuna-dashboard)
  <stage>/plots/             Optuna's history and importance plots (--plots); pareto_front.png
                             (several objectives)
  search_<stage>/            Tune's experiment state (what --resume restores)
  train_<stage>_<id>/        multi-worker trials' Ray Train runs: their reported checkpoints

Everything that can be checked without Ray is checked before Ray starts: every stage's search
space, its metric against the data, the data paths and the upstream checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from virface import storage as storages
from virface.config import GROUP_MODEL, METHODS, TEST_PREFIX, TrainConfig, check_field_types, setting
from virface.errors import ConfigError, VirFaceError
from virface.fileio import write_text_atomic
from virface.ray_train import workers_beyond_cluster
from virface.search.experiments import RESUME_COMMAND_FILE
from virface.metrics import INSTANCE_METRICS
from virface.search.lock import ExperimentLock
from virface.search.manifest import (StageManifest, carried_choices, manifest_lineage, manifest_path,
                                     plan_chain, read_manifest, upstream_checkpoint, upstream_manifest,
                                     write_manifest)
from virface.search.report import (OUTCOME_COMPLETED, TRIALS_FILE, TrialRow, format_table, read_trials,
                                   trial_outcome, write_optuna_plots, write_trials)
from virface.search.pareto import (NoTrialSelected, TrialPoint, carried_trials, format_front, pareto_front,
                                   plot_front, rank_by_rule, rank_trials, select_point)
from virface.search.space import Parameter, SearchSpace, default_space_path, load_search_space, resolve_space
from virface.search.trial import (UPSTREAM_PARAMETER, TrialSetup, best_checkpoint_of, checkpoint_retention,
                                  concurrent_trials, reuses_actors, run_trial, trial_resources, trials_at_once)
from virface.stage_table import stage_chain, stage_spec

# The smallest real run: every stage trains and evaluates, for seconds. Used by the tests.
SMOKE_FIXED = {"max_epoch": 1, "steps_per_epoch": 3}
SMOKE_SYNTHETIC = {"n_labeled_ids": 16, "images_per_labeled_id": 6, "n_unlabeled_ids": 40,
                   "n_val_ids": 16, "val_pairs": 100}
SMOKE_NUM_SAMPLES = 1
DEFAULT_STORAGE = "experiments"
BUDGETS = ("default", "smoke")

GROUP_SEARCH, GROUP_CLUSTER = "search", "cluster and resources (override the YAML's)"


class SearchError(VirFaceError):
    """A stage's search produced no usable trial, or cannot start."""


class SearchInterrupted(VirFaceError):
    """The search was stopped (Ctrl-C, SIGTERM) before its stage finished; --resume continues."""


# How long a stop waits for the running trials' reported checkpoints to be registered before Tune
# is stopped anyway (a loop that never gets to it: stuck, or not started yet).
STOP_WAIT_S = 10.0


class _StopHandler:
    """SIGINT and SIGTERM during a search: the first records the interrupt and asks Tune to stop
    (SIGUSR1: Tune saves its state and returns, as on Ctrl-C); a second stops at once.

    Tune registers a reported checkpoint in a later step of its loop than the one that handled
    the report (and printed its line): stopped in between, its last snapshot names no checkpoint
    for that trial, and ``--resume`` trains it from the start. So Tune is stopped once no trial
    is saving (:class:`virface.search.callbacks.StopWhenSaved`, after each step of its loop), or
    ``STOP_WAIT_S`` after the signal, whichever comes first."""

    def __init__(self, message: str | None = None):
        self.interrupted = threading.Event()
        self.message = message
        self._lock = threading.Lock()
        self._closed = False
        self._timer: threading.Timer | None = None

    def __call__(self, signum, frame):
        if self.interrupted.is_set():
            raise KeyboardInterrupt
        self.interrupted.set()
        if self.message:
            # At once: `ray job stop` kills the driver a few seconds after its SIGTERM, maybe
            # before Tune has returned.
            print(self.message, file=sys.stderr, flush=True)
        self._timer = threading.Timer(STOP_WAIT_S, self.stop_tune)
        self._timer.daemon = True
        self._timer.start()

    def stop_tune_when_saved(self, trials) -> None:
        """After a step of Tune's loop: stop Tune if a stop was asked and no trial is saving."""
        if self.interrupted.is_set() and not any(getattr(t, "is_saving", False) for t in trials):
            self.stop_tune()

    def stop_tune(self) -> None:
        # Under the lock, which close() takes before the handlers are put back: SIGUSR1's own
        # action is to end the process.
        with self._lock:
            if not self._closed:
                os.kill(os.getpid(), signal.SIGUSR1)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()


@contextlib.contextmanager
def sigterm_as_sigint(message: str | None = None) -> Iterator[threading.Event]:
    """SIGTERM (``ray job stop``, ``kill``) stops the search as Ctrl-C does: Tune saves its state
    and returns, and no manifest is written for the unfinished stage. Yields the event the first
    such signal sets: what Tune returns after it is never taken for a finished stage (Tune marks
    the trials it stops TERMINATED, a trial that had just started among them).

    Tune's own SIGINT handler is kept out (``TUNE_DISABLE_SIGINT_HANDLER``): it would swallow the
    signal without a trace; ours records it and stops Tune through Tune's other stop signal,
    SIGUSR1 (ignored outside a run). Nested uses share the outer one's event. ``message`` (how to
    continue) is printed to stderr on the first signal."""
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, _StopHandler):
        yield current.interrupted
        return
    if threading.current_thread() is not threading.main_thread():
        yield threading.Event()
        return
    handler = _StopHandler(message)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGUSR1, lambda *_: None)   # Tune installs its own while it runs
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield handler.interrupted
    finally:
        handler.close()
        for s, h in previous.items():
            signal.signal(s, h)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


def resolve_storage(storage: str | None) -> str:
    """The experiment storage as an absolute path, or a storage URI (``s3://bucket/prefix``,
    see virface.storage) as given, less a trailing slash.

    Under ``ray job submit --working-dir``, the job runs in a temporary copy of that folder,
    which Ray deletes: a relative storage (the default included) would vanish with the job, so it
    is an error there, asking for a path every node shares.
    """
    given = storage or DEFAULT_STORAGE
    if storages.is_uri(given):
        from urllib.parse import urlsplit

        parts = urlsplit(given)
        if not parts.netloc or parts.fragment:
            raise ConfigError(f"storage: {storages.without_credentials(given)!r}: a storage URI is "
                              f"SCHEME://BUCKET/PREFIX[?QUERY], e.g. s3://my-bucket/experiments")
        return parts._replace(path=parts.path.rstrip("/")).geturl()
    if not os.path.isabs(given) and _job_working_dir() is not None:
        raise ConfigError(
            f"storage: {given!r} is relative, and this is a Ray job with a --working-dir: it would "
            f"land in the job's temporary copy ({os.getcwd()}) and be deleted when the job ends. "
            f"Pass --storage /a/path/every/node/shares (NFS, a mounted bucket)")
    return os.path.abspath(given)


def _job_working_dir() -> str | None:
    """The working_dir of the Ray job this process is the entrypoint of, if any."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    text = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not text:
        return None
    try:
        return (json.loads(text).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


@dataclass
class SearchOptions:
    """One ``virface-search`` invocation. The CLI is built from these fields (see virface.options)."""

    stage: str = setting("virface", group=GROUP_SEARCH, choices=METHODS,
                         help="the stage to search; upstream stages without a manifest are "
                              "searched first")
    space: str | None = setting(None, group=GROUP_SEARCH, metavar="NAME|YAML",
                                help="search space of --stage: a shipped space's name (--spaces "
                                     "lists them) or a YAML file (default: the space named <stage>)")
    storage: str | None = setting(
        None, group=GROUP_SEARCH, metavar="DIR|URI",
        help="where experiments live: a folder, made absolute (on a cluster, one every node "
             "shares), or a URI such as s3://bucket/prefix (README: Cloud storage) "
             f"(default: ./{DEFAULT_STORAGE}; required inside a Ray job with a working dir)")
    name: str = setting("default", group=GROUP_SEARCH, help="experiment name: <storage>/<name>/")
    budget: str = setting("default", group=GROUP_SEARCH, choices=BUDGETS,
                          help="smoke: 1 trial x 1 epoch x 3 steps per stage on tiny data")
    num_samples: int | None = setting(None, group=GROUP_SEARCH,
                                      help="trials per stage (default: the YAML's budget)")
    max_epoch: int | None = setting(None, group=GROUP_SEARCH,
                                    help="epochs of every trial of every stage of the chain (default: "
                                         "each space's)")
    steps_per_epoch: int | None = setting(None, group=GROUP_SEARCH,
                                          help="steps per epoch of every trial of every stage (default: "
                                               "each space's, else one pass over the data)")
    seed: int | None = setting(None, group=GROUP_SEARCH,
                               help="seed of every trial (weights, sampling) and of every stage's "
                                    "searcher (default: each space's, 0)")
    max_concurrent: int | None = setting(None, group=GROUP_SEARCH,
                                         help="trials at once (default: the YAML's budget)")
    max_failures: int = setting(1, group=GROUP_SEARCH,
                                help="retries of an errored trial (and, for a multi-worker trial, Ray "
                                     "Train's restarts of its worker group from its last checkpoint)")
    resume: bool = setting(False, group=GROUP_SEARCH,
                           help="continue an interrupted search (a finished one is only printed)")
    from_checkpoint: str | None = setting(
        None, group=GROUP_SEARCH, metavar="PT",
        help="start --stage from this checkpoint instead of its upstream search (default: the "
             "upstream stage's best)")
    plots: bool = setting(False, group=GROUP_SEARCH,
                          help="write Optuna's history and importance plots per stage")
    quiet: bool = setting(False, group=GROUP_SEARCH, help="no per-trial progress lines")
    arch: str | None = setting(None, group=GROUP_MODEL, metavar="NAME",
                               help="backbone of the pretrain stage (default: the YAML's)")
    address: str | None = setting(
        None, group=GROUP_CLUSTER, metavar="ADDR",
        help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray on loopback)")
    workers: int | None = setting(None, group=GROUP_CLUSTER,
                                  help="DDP ranks per trial (default: the YAML's)")
    cpus_per_worker: float | None = setting(None, group=GROUP_CLUSTER,
                                            help="CPUs per worker (default: the YAML's)")
    gpus_per_worker: float | None = setting(None, group=GROUP_CLUSTER,
                                            help="GPUs per worker, fractions allowed (default: the YAML's)")
    compare: str | None = setting(
        None, group=GROUP_SEARCH, metavar="STAGES",
        help="also search these stages (comma-separated, baseline among them) from the same "
             "upstream checkpoint with --stage's budget, retrain each winner with --seeds seeds "
             "and report paired test differences to the baseline (default: no comparison)")
    seeds: int = setting(3, group=GROUP_SEARCH,
                         help="seeds each compared winner is retrained with")
    carry_top: int = setting(
        1, group=GROUP_SEARCH, metavar="K",
        help="pass each stage's K best trials (on validation) on: the next stage searches which "
             "one to start from (its 'upstream' parameter); 1: only the best, as a plain chain")
    data: dict[str, Any] = field(default_factory=dict)   # TrainConfig data fields (GROUP_DATA)
    # Set by a comparison, not the command line: --stage's trials x epochs x steps for an arm.
    budget_overrides: dict[str, Any] = field(default_factory=dict)
    # Set by the command line: the command that started this search, with --resume (a stopped
    # search names it).
    resume_command: str | None = None
    # Set from --storage: a storage URI (s3://...) when the experiments live there; ``storage``
    # is then the driver's local copy of its own records (virface.storage.ExperimentMirror).
    storage_uri: str | None = None

    def how_to_resume(self) -> str:
        return (f"`{self.resume_command}`" if self.resume_command
                else "the same command and --resume")

    def __post_init__(self):
        check_field_types(self)
        if self.stage not in METHODS:
            raise ConfigError(f"stage: {self.stage!r} is not one of {list(METHODS)}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget: {self.budget!r} is not one of {list(BUDGETS)}")
        # Before anything starts: -1 trials would search forever, 0 would "fail" every trial.
        for name, low in (("num_samples", 1), ("max_concurrent", 1), ("max_failures", 0), ("workers", 1),
                          ("seeds", 1), ("carry_top", 1), ("max_epoch", 1), ("steps_per_epoch", 1),
                          ("seed", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name}: {value} must be >= {low}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker: {self.cpus_per_worker} must be > 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker: {self.gpus_per_worker} must be >= 0")
        self.storage = resolve_storage(self.storage)
        if storages.is_uri(self.storage):
            self.storage_uri = self.storage
            self.storage = storages.mirror_dir(self.storage_uri)
        if self.storage_uri and self.compare:
            raise ConfigError(f"compare: --compare with a storage URI ({storages.without_credentials(self.storage_uri)}) "
                              f"is not supported yet; compare on a local or shared folder")
        if self.from_checkpoint and not storages.is_uri(self.from_checkpoint):
            self.from_checkpoint = os.path.abspath(self.from_checkpoint)

    @property
    def experiment_location(self) -> str:
        """Where the experiment lives: ``<storage>/<name>``, a folder or a URI."""
        return storages.join(self.storage_uri or self.storage, self.name)

    @property
    def shown_storage(self) -> str:
        """--storage as given (a URI without credentials) or the folder."""
        return storages.without_credentials(self.storage_uri) if self.storage_uri else self.storage

    def mirror(self) -> storages.ExperimentMirror:
        """The driver's records of the experiment: a local folder, and with a storage URI the
        experiment there they are copied to (and pulled from)."""
        return storages.ExperimentMirror(os.path.join(self.storage, self.name),
                                         self.experiment_location if self.storage_uri else None)


    def run_overrides(self) -> dict[str, int]:
        """The budget and run-size options given, which apply to every stage of the chain."""
        return {k: getattr(self, k) for k in RUN_OVERRIDES if getattr(self, k) is not None}


# Options that override every stage's space: trials per stage, and fixed TrainConfig fields.
RUN_OVERRIDES = ("num_samples", "max_epoch", "steps_per_epoch", "seed")
FIXED_OVERRIDES = ("max_epoch", "steps_per_epoch", "seed")


@dataclass
class StageOutcome:
    stage: str
    manifest: StageManifest | None
    manifest_path: str | None
    rows: list[TrialRow]
    metric: str = ""
    reused: bool = False
    error: str | None = None

    def table(self) -> str:
        text = format_table(self.stage, self.metric, self.rows, reused=self.reused,
                            manifest=self.manifest, manifest_path=self.manifest_path, error=self.error)
        m = self.manifest
        if m is not None and m.pareto:
            from virface.search.pareto import Objective, SelectRule

            rule = m.pareto["select"]
            text += "\n" + format_front(
                [Objective(*o) for o in m.pareto["objectives"]],
                [TrialPoint(**p) for p in m.pareto["front"]], m.trial_id,
                SelectRule(rule["metric"], rule["mode"],
                           {k: (b["min"], b["max"]) for k, b in rule["where"].items()}))
            if m.pareto.get("plot"):
                text += f"\nplot: {m.pareto['plot']}"
        if m is not None and m.carried:
            text += (f"\ncarried on to the next stage ({len(m.carried)}): "
                     + ", ".join(f"{c['trial_id']} ({m.metric_name}={c['metric_value']:.4f})" for c in m.carried))
        if m is not None and len(m.lineage) > 1:
            text += f"\nlineage: {' -> '.join(m.lineage)}"
        return text


def stage_space(options: SearchOptions, stage: str) -> SearchSpace:
    """The stage's search space with the command line's overrides (metric not yet resolved)."""
    path = resolve_space(options.space) if (options.space and stage == options.stage) else default_space_path(stage)
    space = load_search_space(path, stage)
    fixed = dict(space.fixed)
    if options.arch and stage_spec(stage).is_first:
        if "arch" in space.parameter_names:
            raise ConfigError(f"arch: --arch {options.arch} fixes the backbone, but {space.path} "
                              f"searches arch; drop --arch or the parameter")
        fixed["arch"] = options.arch
    budget, resources, searcher = space.budget, space.resources, space.searcher
    if options.budget == "smoke":
        fixed.update(SMOKE_FIXED)
        budget = replace(budget, num_samples=SMOKE_NUM_SAMPLES, time_budget_s=None)
    if options.num_samples is not None:
        budget = replace(budget, num_samples=options.num_samples)
    for key in FIXED_OVERRIDES:
        value = getattr(options, key)
        if value is None:
            continue
        if key in space.parameter_names:
            raise ConfigError(f"{key}: --{key} {value} sets it for every stage, but {space.path} "
                              f"searches {key}; drop the option or the parameter")
        fixed[key] = value
    if options.seed is not None:
        searcher = replace(searcher, arguments={**searcher.arguments, "seed": options.seed})
    if stage == options.stage and options.budget_overrides:
        overrides = dict(options.budget_overrides)
        budget = replace(budget, num_samples=overrides.pop("num_samples", budget.num_samples))
        fixed.update(overrides)
    if options.max_concurrent is not None:
        budget = replace(budget, max_concurrent_trials=options.max_concurrent)
    for key in ("workers", "cpus_per_worker", "gpus_per_worker"):
        if getattr(options, key) is not None:
            resources = replace(resources, **{key: getattr(options, key)})
    return replace(space, fixed=fixed, budget=budget, resources=resources, searcher=searcher)


def base_train_config(options: SearchOptions) -> dict[str, Any]:
    data = dict(options.data)
    if options.budget == "smoke" and not data.get("labeled"):
        data["synthetic"] = {**SMOKE_SYNTHETIC, **data.get("synthetic", {})}
    return data


def pair_set_names(base: dict[str, Any]) -> list[str]:
    """The pair sets trials will evaluate, known without reading the data: the synthetic faces'
    own sets (when no labeled data is given) and every ``--val`` name."""
    names = []
    if not base.get("labeled"):
        from virface.data.synthetic import PAIR_SET_NAMES

        names += list(PAIR_SET_NAMES)
    return names + [n for n in (base.get("val") or {}) if n not in names]


def prepare_space(options: SearchOptions, stage: str) -> SearchSpace:
    """The stage's space, its metric resolved against the data; every error before Ray starts."""
    space = stage_space(options, stage)
    base = {**base_train_config(options), **space.fixed, "method": stage}
    TrainConfig.from_dict(base)                  # data options that cannot make a config
    return space.resolve_metric(pair_set_names(base) if base.get("eval", True) else [])


def check_data_paths(base: dict[str, Any], stage: str) -> None:
    config = TrainConfig.from_dict({**base, "method": stage})
    for key, path in [("labeled", config.labeled), ("unlabeled", config.unlabeled),
                      *((f"val {name}", p) for name, p in config.val.items()),
                      *((f"test {name}", p) for name, p in config.test.items())]:
        if path is not None and not os.path.exists(path):
            raise SearchError(f"{key}: {path} does not exist")


def check_upstream(stage: str, checkpoint: str | None, base: dict[str, Any], space: SearchSpace) -> str | None:
    """Named errors before any trial starts: a checkpoint the stage cannot start from, or whose
    model does not fit what the stage would build. Returns the backbone the stage inherits from
    ``checkpoint`` (None without one)."""
    from virface.checkpoint import check_start_checkpoint, inherit_model_fields, read_start_checkpoint
    from virface.data.loading import count_labeled_identities

    config = TrainConfig.from_dict({**base, **space.fixed, "method": stage, "pretrained_file": checkpoint})
    check_start_checkpoint(config)
    if checkpoint is None:
        return None
    state, path = read_start_checkpoint(config)
    inherited = inherit_model_fields(config, state, path)
    found = count_labeled_identities(inherited)
    if found != inherited.num_ids:
        raise SearchError(f"stage {stage} starts from {path}, trained on {inherited.num_ids} labeled "
                          f"identities, but the labeled data given has {found}; give the data the "
                          f"upstream stage was trained on")
    return inherited.arch


def check_trial_fits(space: SearchSpace) -> None:
    """A trial whose workers the cluster can never hold is an error now, not a trial pending
    forever (Tune waits for resources without a limit)."""
    import ray

    r = space.resources
    why = workers_beyond_cluster(r.workers, r.cpus_per_worker, r.gpus_per_worker, ray.cluster_resources())
    if why:
        raise SearchError(f"one trial of stage {space.stage} needs {why}")


# Process settings of a search, applied for its duration only (see search_environment).
SEARCH_ENVIRONMENT = {
    # Tune's own loggers are off: each trial writes its own TensorBoard run, live.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Snapshot the experiment state within a second of each result (default: every >= 10 s), so
    # a killed driver's --resume finds every trial's latest checkpoint.
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Tune's own progress tables: off (our callback prints progress).
    "RAY_AIR_NEW_OUTPUT": "0",
    # The metrics servers of a Ray this search starts: on free ports (0), not on the fixed 44227
    # and 44217 that any other Ray of the host holds.
    "DASHBOARD_METRIC_PORT": "0",
    "AUTOSCALER_METRIC_PORT": "0",
}


@contextlib.contextmanager
def search_environment() -> Iterator[None]:
    """Set the search's environment variables (those not set by the user) and Optuna's log level
    for the duration of a search, then put everything back."""
    import optuna

    wanted = dict(SEARCH_ENVIRONMENT)
    saved = {key: os.environ.get(key) for key in wanted}
    verbosity = optuna.logging.get_verbosity()
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def user_archs(spaces: dict[str, SearchSpace], upstream_arch: str | None) -> list[str]:
    """Every backbone name the plan's trials may build: each stage's fixed arch and searched
    choices, and the backbone of the checkpoint the first stage starts from (``check_upstream``'s;
    later stages inherit it)."""
    archs = [upstream_arch]
    for space in spaces.values():
        archs.append(space.fixed.get("arch"))
        archs += [choice for p in space.parameters if p.name == "arch"
                  for choice in getattr(p.distribution, "choices", ())]
    return [a for a in archs if isinstance(a, str)]


def init_ray(options: SearchOptions, say, archs: list[str] = ()) -> bool:
    """Connect to ``--address`` (or the cluster of a ``ray job submit``); else start a local Ray.
    Returns whether this process started Ray (and so must stop it). Ray failing to start or to
    connect (a loaded machine: "The current node timed out during startup") is a SearchError
    saying so: nothing of the experiment was written yet, and the same command continues it."""
    import ray

    from virface.ray_train import user_code_runtime_env

    if ray.is_initialized():
        return False
    runtime_env = user_code_runtime_env(archs)
    if options.address or os.environ.get("RAY_ADDRESS"):
        address = options.address or os.environ["RAY_ADDRESS"]
        say(f"connecting to the Ray cluster at {address} ...")
        # A cluster on loopback (a test, a laptop) has its raylet there too, not on the
        # machine's network address, which Ray would otherwise assume for this driver.
        local = address.split("://")[-1].startswith(("127.", "localhost"))
        with ray_start_errors(options, f"could not connect to the Ray cluster at {address}"):
            ray.init(address=options.address or None, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=runtime_env, **({"_node_ip_address": "127.0.0.1"} if local else {}))
        return False
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    say(f"starting a local Ray ({cpus} CPU, {gpus} GPU; dashboard on 127.0.0.1) ...")
    # The dashboard is what lets Tune clean up trials that ASHA stops (notes/RAY.md); everything
    # listens on loopback only. address="local": our own Ray even beside another cluster, on
    # free ports (the dashboard's chosen free); the one port ray.init cannot choose, its
    # dashboard agent's HTTP (52365, for job submission, which a local search does not use), Ray
    # leaves off when another Ray holds it.
    from virface.ray_train import init_local_ray

    with ray_start_errors(options, "the local Ray failed to start"):
        init_local_ray(cpus, gpus, log_to_driver=False, runtime_env=runtime_env)
    return True


@contextlib.contextmanager
def ray_start_errors(options: SearchOptions, what: str) -> Iterator[None]:
    """``ray.init`` inside: its failure becomes a SearchError naming ``what`` failed and Ray's
    reason. (The processes a failed start leaves share this process's fate: they end with it.)"""
    import ray

    try:
        yield
    except Exception as exc:
        with contextlib.suppress(Exception):
            ray.shutdown()
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        again = ("run the same command again: --resume continues the search where it stopped"
                 if options.resume else "run the same command again (with --resume if an "
                 "earlier run of it was interrupted)")
        raise SearchError(f"{what} ({type(exc).__name__}: {reason}); no trial ran and nothing "
                          f"of experiment {options.name} was changed: {again}") from exc


def search_stage(options: SearchOptions, stage: str, space: SearchSpace, say,
                 interrupted: threading.Event | None = None,
                 mirror: storages.ExperimentMirror | None = None) -> StageOutcome:
    """Search one stage. ``interrupted`` is set by a stop signal (:func:`sigterm_as_sigint`): a
    search it stopped raises :class:`SearchInterrupted`, whatever its trials look like."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from virface.search.callbacks import StopWhenSaved, TrialProgress
    from virface.search.searcher import StageOptunaSearch
    from virface.search.state import (KEPT_STATE_DIR, MirrorKeeper, MirroredJournalBackend, TuneStateKeeper,
                                      is_disk_error, repair_journal, repair_tune_state)

    mirror = mirror or options.mirror()
    # The driver's own records (manifests, journal, ...) are under experiment_dir, a local folder;
    # Tune's and Ray Train's folders under location: the same folder, or a storage URI.
    experiment_dir = os.path.join(options.storage, options.name)
    location = options.experiment_location
    remote = options.storage_uri is not None
    stage_dir = os.path.join(experiment_dir, stage)
    search_dir = storages.join(location, f"search_{stage}")
    base = base_train_config(options)
    from_checkpoint = options.from_checkpoint if stage == options.stage else None
    upstream, upstream_source = upstream_checkpoint(stage, options.storage, options.name, from_checkpoint)
    parent = upstream_manifest(stage, options.storage, options.name, from_checkpoint)
    choices = carried_choices(parent)
    for checkpoint in ([c["checkpoint"] for c in choices.values()] if choices else [upstream]):
        check_upstream(stage, checkpoint, base, space)
    if choices:
        space = with_upstream_parameter(space, list(choices))
        upstream_source = (f"one of the {len(choices)} {parent.stage} trials carried on "
                           f"({', '.join(choices)}), searched as the parameter '{UPSTREAM_PARAMETER}'")
    check_trial_fits(space)
    objectives = (", ".join(f"{o.name} ({o.mode})" for o in space.objectives) + " (Pareto front; select: "
                  f"{space.select_rule().describe()})" if space.multi_objective
                  else f"{space.metric_name} ({space.metric_mode})") + f", each trial's value: {space.selection}"
    say(f"[{stage}] searching {len(space.parameters)} parameter(s) from {space.path}: "
        f"{space.budget.num_samples} trial(s) x up to {space.max_epochs} epoch(s), selecting on "
        f"{objectives}; starts from: {upstream_source}")
    if space.metric_name == "loss":
        say(f"[{stage}] no validation pair sets (--val): each trial's best epoch and the best trial "
            f"follow the training loss, not verification accuracy")

    metric, selection = space.metric_name, f"best_{space.metric_name}"
    setup = TrialSetup(
        stage=stage, base_config={**base, **space.fixed, "best_metric": metric,
                                      "selection": space.selection},
        upstream_checkpoint=upstream, tb_root=os.path.join(stage_dir, "tb"),
        tb_upload=storages.join(location, stage, "tb") if remote else None,
        train_storage=location, metric=metric, mode=space.metric_mode,
        resources=space.resources, measure_cost=bool(space.cost_metrics),
        upstream_choices={k: c["checkpoint"] for k, c in choices.items()},
        worker_max_failures=options.max_failures)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    import ray

    at_once = min(trials_at_once(space.resources, ray.cluster_resources()),
                  space.budget.max_concurrent_trials or space.budget.num_samples)
    progress = TrialProgress(stage, metric, space.parameter_names, space.budget.num_samples,
                             space.max_epochs, max(1, at_once), setup.tb_root,
                             print_lines=not options.quiet)
    if storages.exists(search_dir) and not options.resume:
        raise SearchError(f"{search_dir} holds an interrupted search of stage {stage}; continue "
                          f"it with --resume, or choose another --name")
    space_record = os.path.join(stage_dir, SPACE_RECORD)
    journal, kept_state = os.path.join(stage_dir, "optuna.journal"), os.path.join(stage_dir, KEPT_STATE_DIR)
    if options.resume and tune.Tuner.can_restore(search_dir):
        check_same_space(space, space_record)
        say(f"[{stage}] resuming the interrupted search in {search_dir}")
        # What a write that failed (a full disk) left cut short, before Tune or Optuna reads it.
        if not remote:          # objects are written whole: nothing is cut short there
            repair_tune_state(search_dir, kept_state, lambda text: say(f"[{stage}] {text}"))
        repair_journal(journal, lambda text: say(f"[{stage}] {text}"))
        tuner = tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        from optuna.storages import JournalStorage

        os.makedirs(stage_dir, exist_ok=True)
        write_text_atomic(space_record, json.dumps(space.describe(), indent=2, sort_keys=True) + "\n")
        mirror.push(os.path.relpath(space_record, experiment_dir))
        storage = JournalStorage(MirroredJournalBackend(
            journal, storages.join(location, stage, "optuna.journal") if remote else None))
        if space.multi_objective:
            # Optuna is told each trial's best epoch for the selection metric and the others'
            # last values (cost metrics are the same every epoch).
            search_metric = [selection if o.name == metric else o.name for o in space.objectives]
            search_mode: Any = [o.mode for o in space.objectives]
            objective_name: Any = [o.name for o in space.objectives]
        else:
            search_metric, search_mode, objective_name = selection, space.metric_mode, metric
        searcher = StageOptunaSearch(
            space=space.define_by_run, metric=search_metric, mode=search_mode,
            points_to_evaluate=space.points_to_evaluate() or None, sampler=space.make_sampler(),
            study_name=f"{options.name}-{stage}", storage=storage, objective_name=objective_name,
            max_epochs=space.max_epochs, trial_root=search_dir, trial_dir=f"{stage}_{{trial_id}}")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                # ASHA decides on the best epoch so far: what the search selects a trial by.
                metric=selection, mode=space.metric_mode, search_alg=searcher,
                scheduler=space.make_scheduler(), num_samples=space.budget.num_samples,
                max_concurrent_trials=concurrent_trials(space.resources, space.budget.max_concurrent_trials,
                                                        ray.cluster_resources()),
                time_budget_s=space.budget.time_budget_s,
                trial_dirname_creator=lambda t: f"{stage}_{t.trial_id}",
                reuse_actors=reuses_actors(space.resources)),
            run_config=tune.RunConfig(
                name=f"search_{stage}", storage_path=location, verbose=0,
                failure_config=tune.FailureConfig(max_failures=options.max_failures),
                checkpoint_config=checkpoint_retention(),
                callbacks=[progress, StopWhenSaved(), CSVLoggerCallback(), JsonLoggerCallback(),
                           # A trial's HParams entry (written by progress) copied at its end.
                           *([MirrorKeeper(mirror)] if remote else [TuneStateKeeper(search_dir, kept_state)])]),
        )
    if interrupted is not None and interrupted.is_set():
        raise SearchInterrupted(f"the search was interrupted before stage {stage} started; continue "
                                f"it with the same command and --resume")
    started = time.time()
    try:
        results = tuner.fit()
    except Exception as exc:
        if not is_disk_error(exc):
            raise
        raise SearchError(f"the search of stage {stage} stopped: a file under {experiment_dir} could "
                          f"not be written, or was read back cut short ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); a "
                          f"full disk? Free space, then continue with the same command and --resume: "
                          f"every finished trial is kept") from exc
    if (interrupted is not None and interrupted.is_set()) or stage_interrupted(results, space, time.time() - started):
        raise SearchInterrupted(f"the search of stage {stage} was interrupted; its state is saved: "
                                f"continue it with {options.how_to_resume()}")
    return conclude_stage(options, stage, space, list(results), upstream=upstream, parent=parent,
                          choices=choices, mirror=mirror, say=say)


def conclude_stage(options: SearchOptions, stage: str, space: SearchSpace, results: list, *,
                   upstream: str | None, parent: StageManifest | None, choices: dict[str, dict[str, Any]],
                   mirror: storages.ExperimentMirror, say=print) -> StageOutcome:
    """What a finished stage search decides, from Tune's results: the trials' rows, each trial at
    its best validation epoch, the chosen trial (best ``metric``; with several objectives the
    Pareto front's by its select rule), the trials carried on (``--carry_top``) with what each
    started from, and the manifest, written last: it is what makes the stage finished. Ray-free:
    a result is read through ``error``, ``metrics``, ``config``, ``path`` and ``checkpoint`` only.
    ``upstream``/``parent``: the checkpoint and manifest the stage started from; ``choices``: the
    upstream trials carried on to it (its ``upstream`` parameter), if any."""
    from virface.search.callbacks import write_stage_hparams

    experiment_dir = os.path.join(options.storage, options.name)
    stage_dir = os.path.join(experiment_dir, stage)
    metric = space.metric_name
    rows = [trial_row(r, space) for r in results]
    write_stage_hparams(experiment_dir, stage, space.parameters, [r.metrics or {} for r in results])
    mirror.sync()
    ok = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    if not ok:
        errors = "; ".join(sorted({str(r.error).strip().splitlines()[-1] for r in results if r.error})) or "no results"
        return StageOutcome(stage, None, None, rows, metric, error=f"every trial of stage {stage} failed: {errors}")
    # Each trial at its best validation epoch: its checkpoint and what it reported there.
    points = []
    for result in ok:
        path, epoch_metrics = best_epoch_of(result, metric, options.storage_uri)
        if path is not None:
            names = [o.name for o in space.objectives] or [metric]
            points.append(TrialPoint(_trial_id(result), {n: epoch_metrics.get(n) for n in names}, path,
                                     {k: result.config.get(k) for k in space.parameter_names
                                      if k in (result.config or {})}))
    if not points:
        return StageOutcome(stage, None, None, rows, metric, error=f"stage {stage}: no trial reported a checkpoint")
    pareto = None
    if space.multi_objective:
        objectives, rule = space.objective_list(), space.select_rule()
        front = pareto_front(points, objectives)
        try:
            select_point(front, rule)            # NoTrialSelected when no front trial fits
            ranked = rank_by_rule(front, rule)
        except NoTrialSelected as exc:
            return StageOutcome(stage, None, None, rows, metric, error=f"stage {stage}: {exc}")
        plot = os.path.join(stage_dir, "plots", "pareto_front.png")
        os.makedirs(os.path.dirname(plot), exist_ok=True)
        plot_front(objectives, points, front, ranked[0].trial_id, plot)
        pareto = {"objectives": [[o.name, o.mode] for o in objectives], "select": rule.to_dict(),
                  "front": [p.to_dict() for p in front],
                  "trials": [p.to_dict() for p in points], "plot": plot}
    else:
        completed = {r.trial_id for r in rows if r.outcome == OUTCOME_COMPLETED}
        ranked = rank_trials(points, metric, space.metric_mode, completed)
        full = sum(p.trial_id in completed for p in points)
        if 0 < full < len(points):
            say(f"[{stage}] choosing among the {full} trial(s) that trained all {space.max_epochs} "
                f"epoch(s); the scheduler stopped {len(points) - full} earlier (ranked after them)")
    best = ranked[0]
    from virface.checkpoint import load_checkpoint

    chosen = load_checkpoint(best.checkpoint)

    def started_from(point: TrialPoint) -> tuple[str | None, list[str]]:
        """The upstream checkpoint a trial started from, and its lineage."""
        choice = point.params.get(UPSTREAM_PARAMETER)
        if choice is not None:
            entry = choices[choice]
            return entry["checkpoint"], list(entry.get("lineage") or []) + [f"{stage}:{point.trial_id}"]
        return upstream, manifest_lineage(parent) + [f"{stage}:{point.trial_id}"]

    best_upstream, lineage = started_from(best)
    carried = []
    if options.carry_top > 1:
        if len(ranked) < options.carry_top:
            say(f"[{stage}] --carry_top {options.carry_top}: only {len(ranked)} trial(s) qualify; "
                f"carrying those on")
        for point in carried_trials(ranked, options.carry_top):
            start, point_lineage = started_from(point)
            carried.append({"trial_id": point.trial_id, "checkpoint": point.checkpoint,
                            "metric_value": float(point.values[metric]), "params": point.params,
                            "upstream": point.params.get(UPSTREAM_PARAMETER)
                            or (parent.trial_id if parent else None),
                            "upstream_checkpoint": start, "lineage": point_lineage})
    manifest = StageManifest(
        stage=stage, experiment=options.name, trial_id=best.trial_id,
        config=chosen["config"], metric_name=metric,
        metric_value=float(best.values[metric]), metric_mode=space.metric_mode, checkpoint=best.checkpoint,
        metric_se=(float(chosen["metrics"][metric + "_se"])
                   if isinstance(chosen["metrics"].get(metric + "_se"), (int, float)) else None),
        upstream=best_upstream, test_metrics={k: float(v) for k, v in chosen["metrics"].items()
                                              if k.startswith(TEST_PREFIX) and isinstance(v, (int, float))},
        lineage=lineage, carried=carried, pareto=pareto, overrides=options.run_overrides(),
        instance_metrics={k: float(chosen["metrics"][k]) for k in INSTANCE_METRICS if k in chosen["metrics"]},
        trial_upstreams={r.trial_id: str(r.params[UPSTREAM_PARAMETER]) for r in rows
                         if UPSTREAM_PARAMETER in r.params} if choices else {})
    write_trials(os.path.join(stage_dir, TRIALS_FILE), stage, metric, space.metric_mode,
                 space.max_epochs, rows)
    path = manifest_path(options.storage, options.name, stage)
    # The manifest is what makes a stage finished: sent after everything it refers to.
    mirror.sync(skip=[os.path.relpath(path, experiment_dir)])
    write_manifest(manifest, path)
    mirror.push(os.path.relpath(path, experiment_dir))
    return StageOutcome(stage, manifest, shown_path(options, path), rows, metric)


def shown_path(options: SearchOptions, path: str | os.PathLike) -> str:
    """A record's path as the user knows it: under a storage URI, its URI there."""
    if not options.storage_uri:
        return str(path)
    return storages.join(storages.without_credentials(options.storage_uri),
                         os.path.relpath(path, options.storage))


SPACE_RECORD = "search_space.json"


def check_same_space(space: SearchSpace, record: str) -> None:
    """A resumed search continues with the space it started with (Tune restores that one); a
    space edited meanwhile is an error naming what changed, not a silent mix."""
    if not os.path.exists(record):
        return
    with open(record, encoding="utf-8") as f:
        before = json.load(f)
    now = json.loads(json.dumps(space.describe(), sort_keys=True))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise SearchError(f"the search space of stage {space.stage} changed since the search "
                          f"started ({', '.join(changed)} differ from {record}); --resume continues "
                          f"the search it started: restore the file and options, or search anew "
                          f"under another --name")


def stage_interrupted(results, space: SearchSpace, elapsed_s: float) -> bool:
    """Whether Tune returned because it was stopped (Ctrl-C, SIGTERM) rather than done: a trial
    still pending, running or paused, or fewer trials than the budget with time left."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    if any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return True
    budget = space.budget.time_budget_s
    return len(results) < space.budget.num_samples and (budget is None or elapsed_s < budget)


def _trial_id(result) -> str:
    return str(result.metrics.get("trial_id") or os.path.basename(result.path))


def best_epoch_of(result, metric: str, storage_uri: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """The trial's best-epoch checkpoint file (a URI under a storage URI) and its objective
    values there: ``metric`` at its best epoch (``best_<metric>``), the others from the last
    report (the cost metrics are measured once per trial, so every report carries the same)."""
    path, value = best_checkpoint_of(result, metric, storage_uri)
    if path is None:
        return None, {}
    return path, {**(result.metrics or {}), metric: value}


def with_upstream_parameter(space: SearchSpace, trial_ids: list[str]) -> SearchSpace:
    """The space with a first, categorical parameter choosing the upstream trial to start from;
    the first trial starts from the best one (``trial_ids[0]``), as a plain chain would."""
    from optuna.distributions import CategoricalDistribution

    parameter = Parameter(UPSTREAM_PARAMETER, CategoricalDistribution(list(trial_ids)), default=trial_ids[0])
    return replace(space, parameters=[parameter, *space.parameters])


def trial_row(result, space: SearchSpace) -> TrialRow:
    params = {k: result.config.get(k) for k in space.parameter_names if k in (result.config or {})}
    metrics = result.metrics or {}
    best = metrics.get(f"best_{space.metric_name}")
    epochs = int(metrics.get("epoch", 0) or 0)
    error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else None
    trial_id = _trial_id(result) if metrics else os.path.basename(result.path or "?")
    return TrialRow(trial_id, params, float(best) if isinstance(best, (int, float)) else None,
                    epochs, trial_outcome(epochs, space.max_epochs, error), error)


def reused_outcome(options: SearchOptions, stage: str) -> StageOutcome:
    path = manifest_path(options.storage, options.name, stage)
    metric, rows = read_trials(os.path.join(options.storage, options.name, stage, TRIALS_FILE))
    manifest = read_manifest(path)
    return StageOutcome(stage, manifest, shown_path(options, path), rows, metric or manifest.metric_name,
                        reused=True)


def adopt_upstream_data(options: SearchOptions, stage: str, say) -> SearchOptions:
    """The options with the data that ``stage``'s start checkpoint was trained on, when none was
    given and that checkpoint was not trained on the built-in synthetic faces (said, never a
    silent switch to the synthetic faces); an error naming the options to give when that data is
    not here (see virface.checkpoint.checkpoint_data)."""
    from virface.checkpoint import checkpoint_data, format_data_options, load_checkpoint

    if options.data.get("labeled") or stage_spec(stage).is_first:
        return options
    path, _ = upstream_checkpoint(stage, options.storage, options.name,
                                  options.from_checkpoint if stage == options.stage else None)
    adopted = checkpoint_data({**options.data, "method": stage}, load_checkpoint(path), path)
    if not adopted:
        return options
    say(f"no data options were given, and {path} was trained on other data than the built-in "
        f"synthetic faces: searching on the data it records: {format_data_options(adopted)}")
    return replace(options, data={**options.data, **{k: v for k, v in adopted.items() if v}})


def draw_plots(options: SearchOptions, outcome: StageOutcome, say) -> None:
    stage_dir = os.path.join(options.storage, options.name, outcome.stage)
    journal = os.path.join(stage_dir, "optuna.journal")
    if not os.path.exists(journal):
        say(f"[{outcome.stage}] no plots: {journal} does not exist")
        return
    for path in write_optuna_plots(journal, f"{options.name}-{outcome.stage}",
                                   os.path.join(stage_dir, "plots"), outcome.metric, say=say):
        say(f"[{outcome.stage}] plot: {path}")
    options.mirror().sync()


def run_search(options: SearchOptions, say=print) -> list[StageOutcome]:
    """Search ``options.stage`` and every upstream stage that has no manifest yet, in order.

    A stage whose manifest exists is finished: it is reported from its files, not searched
    again. ``say`` receives the start-up and progress lines (``print`` by default).
    """
    say = (lambda text: None) if options.quiet else say
    mirror = options.mirror()
    if options.storage_uri:
        # Before anything: a missing bucket or an unreachable endpoint is an error naming the URI.
        storages.check_reachable(options.storage_uri)
        say(f"storage {options.shown_storage}: the driver's records are copied to {mirror.local}")
        mirror.pull()
    finished = manifest_path(options.storage, options.name, options.stage).exists()
    if finished:
        plan = []
        say(f"stage {options.stage} of experiment {options.name} finished earlier: reporting it "
            f"from {storages.without_credentials(options.experiment_location)} (use another --name to search again)")
    else:
        plan = plan_chain(options.stage, options.storage, options.name, options.from_checkpoint)
    if plan:
        options = adopt_upstream_data(options, plan[0], say)
    outcomes: list[StageOutcome] = []
    if not options.from_checkpoint or finished:
        for stage in stage_chain(options.stage):
            if stage not in plan and manifest_path(options.storage, options.name, stage).exists():
                outcomes.append(reused_outcome(options, stage))
    if plan:
        if options.run_overrides():
            say("for every stage: " + ", ".join(f"{k}={v}" for k, v in options.run_overrides().items())
                + " (options given; they override each search space)")
        say(f"checking {', '.join(plan)}: search spaces, metrics and data ...")
        spaces = {stage: prepare_space(options, stage) for stage in plan}
        check_data_paths(base_train_config(options), options.stage)
        first_upstream, _ = upstream_checkpoint(
            plan[0], options.storage, options.name,
            options.from_checkpoint if plan[0] == options.stage else None)
        upstream_arch = check_upstream(plan[0], first_upstream, base_train_config(options), spaces[plan[0]])
        with ExperimentLock(options.experiment_location), search_environment():
            # Held now: what another driver may have written before is fetched again.
            mirror.pull()
            started = init_ray(options, say, user_archs(spaces, upstream_arch))
            try:
                if options.resume_command:
                    # What --list shows to continue this experiment if it stops (written once
                    # Ray is up: a failed start leaves the experiment folder as it was).
                    write_text_atomic(os.path.join(options.storage, options.name, RESUME_COMMAND_FILE),
                                      options.resume_command + "\n")
                    mirror.push(RESUME_COMMAND_FILE)
                # After ray.init, which installs a SIGTERM handler of its own that aborts.
                with sigterm_as_sigint(f"stopping: the search's state is being saved; continue it "
                                       f"with {options.how_to_resume()}") as interrupted:
                    for stage in plan:
                        outcome = search_stage(options, stage, spaces[stage], say, interrupted, mirror)
                        outcomes.append(outcome)
                        if outcome.manifest is None:
                            break
            finally:
                if started:
                    import ray

                    ray.shutdown()
    if options.plots:
        for outcome in outcomes:
            if outcome.manifest is not None:
                draw_plots(options, outcome, say)
    return outcomes
