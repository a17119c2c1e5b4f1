"""Ray Tune's OptunaSearch, made to record what the search selects on.

Ray's OptunaSearch tells Optuna each trial's *last* reported value and marks a trial that ASHA
stopped early as COMPLETE. Our trials report ``best_<metric>`` (the best epoch so far), which is
what the manifest picks a trial by, so here:
- each epoch's ``best_<metric>`` is the trial's intermediate value at step ``epoch`` (not Tune's
  training_iteration, which restarts from 1 after a resume);
- a trial that ends before its last epoch without an error is PRUNED (Optuna then records its
  last intermediate value, the best so far); a full trial is COMPLETE with its best value;
- the study's objective carries the metric's name (Optuna's dashboard labels the axis with it);
- every trial carries user attributes tying it to the other records: ``tune_trial_id`` (Tune's id,
  the TensorBoard run and trial folder names), and when it ends its ``outcome`` (completed,
  stopped early, failed) and ``checkpoint`` (its best epoch's file).

With several objectives (``metric`` and ``mode`` lists) Optuna takes no intermediate values and
prunes nothing: each trial is told its final values, COMPLETE (or FAIL without them).

The study lives in a journal file, written at once; Tune's state (this searcher's pickle
included) is saved a moment later. A driver killed in between leaves a journal ahead of Tune's
state, which the restored search must accept rather than crash on (Optuna refuses to update a
finished trial): results and completions of trials the journal already finished are skipped,
and trials the journal started that Tune never recorded are marked FAIL (abandoned).
"""
from __future__ import annotations

import logging
import warnings

from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger("virface")


# User attributes of every Optuna trial, linking it to the other records of the search.
TUNE_TRIAL_ID, CHECKPOINT, OUTCOME = "tune_trial_id", "checkpoint", "outcome"


class StageOptunaSearch(OptunaSearch):
    """OptunaSearch for one stage. ``metric`` must be the best-so-far metric the trials report;
    ``objective_name`` names the study's objective; ``max_epochs`` is a full trial's length."""

    def __init__(self, *args, objective_name: str | list[str], max_epochs: int, trial_root: str | None = None,
                 trial_dir: str = "{trial_id}", **kwargs):
        self._objective_names = [objective_name] if isinstance(objective_name, str) else list(objective_name)
        self._max_epochs = max_epochs
        # Where Tune keeps a trial's checkpoints: <trial_root>/<trial_dir with its id>/checkpoint_N/.
        self._trial_root, self._trial_dir = trial_root, trial_dir
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials and not self._finished_in_study(trial_id):
            # Which Tune trial (and TensorBoard run, trial folder) this Optuna trial is.
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def _record_end(self, trial_id: str, ot_trial, result: dict | None, error: bool) -> None:
        """The trial's outcome and its best-epoch checkpoint, as user attributes (before the
        trial is told: a finished Optuna trial cannot be changed)."""
        from virface.search.report import trial_outcome

        result = result or {}
        epochs = int(result.get("epoch", 0) or 0)
        try:
            ot_trial.set_user_attr(TUNE_TRIAL_ID, trial_id)
            ot_trial.set_user_attr(OUTCOME, trial_outcome(epochs, self._max_epochs, error))
            folder = result.get("checkpoint_dir_name")
            if folder and self._trial_root and not error:
                from virface.search.trial import best_file_in

                from virface.storage import join

                directory = join(self._trial_root, self._trial_dir.format(trial_id=trial_id), folder)
                ot_trial.set_user_attr(CHECKPOINT, directory if "://" in directory else best_file_in(directory))
        except Exception as exc:   # a record, never a reason to lose the trial's result
            log.warning("optuna trial of %s: user attributes not written: %s", trial_id, exc)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        import optuna

        with warnings.catch_warnings():
            # set_metric_names is marked experimental; we use it on purpose.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(self._objective_names)

    def _finished_in_study(self, trial_id: str) -> bool:
        from optuna.trial import TrialState

        number = self._ot_trials[trial_id].number
        state = self._ot_study.get_trials(deepcopy=False)[number].state
        return state != TrialState.RUNNING

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        from optuna.trial import TrialState

        known = {t.number for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in known:
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)
                log.warning("optuna trial %d was started by a driver that died before Tune "
                            "recorded it; marked FAIL", frozen.number)

    @property
    def _multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials and not self._multi_objective:
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict | None) -> None:
        """The best-so-far value at step ``epoch``, once per epoch (a resumed trial repeats one)."""
        if not result or self.metric not in result or trial_id not in self._ot_trials:
            return
        if self._finished_in_study(trial_id):
            return                  # the journal is ahead of Tune's restored state
        reported = self.__dict__.setdefault("_reported_epochs", {}).setdefault(trial_id, set())
        epoch = int(result.get("epoch", 0))
        if epoch not in reported:
            self._ot_trials[trial_id].report(float(result[self.metric]), epoch)
            reported.add(epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        from optuna.trial import TrialState

        if self._finished_in_study(trial_id):
            self._completed_trials.add(trial_id)     # recorded before the driver died
            return
        ot_trial = self._ot_trials[trial_id]
        self._record_end(trial_id, ot_trial, result, error)
        if self._multi_objective:
            values = [(result or {}).get(m) for m in self.metric]
            ok = not error and all(isinstance(v, (int, float)) for v in values)
            state = TrialState.COMPLETE if ok else TrialState.FAIL
            self._tell(trial_id, ot_trial, [float(v) for v in values] if ok else None, state)
            return
        # Tune does not pass the result that ends a trial (ASHA's stop at a rung, the last
        # epoch) to on_trial_result: report it here, so a PRUNED trial keeps its final value.
        self._report(trial_id, result)
        value = (result or {}).get(self.metric)
        if error or value is None:
            state, value = TrialState.FAIL, None
        elif int(result.get("epoch", self._max_epochs)) < self._max_epochs:
            state, value = TrialState.PRUNED, None      # Optuna keeps the last intermediate value
        else:
            state = TrialState.COMPLETE
        self._tell(trial_id, ot_trial, value, state)

    def _tell(self, trial_id: str, ot_trial, value, state) -> None:
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except OSError:
            raise                  # the journal could not be written (a full disk): stop the search
        except Exception as exc:   # e.g. a NaN value: Optuna refuses it; the trial still ends
            log.warning("optuna could not record trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
