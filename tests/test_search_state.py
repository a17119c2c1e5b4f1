"""A search's saved state after a write that failed (a full disk): Tune's experiment state and the
Optuna journal, cut short as a full disk cuts them, are made resumable, saying so; nothing
finished is lost. Without Ray: the files are written and cut here."""
import errno
import json
import pickle

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from virface.search.state import StateError, TuneStateKeeper, is_disk_error, repair_journal, repair_tune_state


def study_with_one_complete_trial(path):
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    study.tell(trial, 0.75)
    return study


def load(path):
    return optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))


def test_a_journal_line_cut_by_a_full_disk_is_dropped_and_the_finished_trial_kept(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = tmp_path / "optuna.journal"
    study_with_one_complete_trial(path)
    whole = path.read_bytes()
    cut = b'{"op_code":4,"worker_id":"w","study_id":0,"datet'          # the append the disk cut
    path.write_bytes(whole + cut)
    said = []
    repair_journal(str(path), said.append)
    assert path.read_bytes() == whole
    assert said == [f"{path}: dropped its last record, cut short by a write that failed ({len(cut)} "
                    f"byte(s): {cut!r}...)"]
    study = load(path)                                                  # what --resume does next
    study.tell(study.ask(), 0.5)
    assert [(t.state.name, t.value) for t in load(path).trials] == [("COMPLETE", 0.75), ("COMPLETE", 0.5)]
    repair_journal(str(path), said.append)                             # a whole journal: untouched
    assert len(said) == 1


def test_without_the_repair_the_next_append_is_glued_to_the_cut_line_and_the_journal_breaks(tmp_path):
    # What --resume met before: the study's next write lands on the cut line.
    path = tmp_path / "optuna.journal"
    study_with_one_complete_trial(path)
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"w","study_id":0,"datet')
    study = load(path)
    with pytest.raises(AttributeError, match="_last_created_trial_id_by_this_process"):
        study.ask()                                 # the AttributeError the issue saw on --resume


def test_tunes_experiment_state_cut_short_is_put_back_from_its_last_complete_version(tmp_path):
    search, kept = tmp_path / "search_pretrain", tmp_path / "pretrain" / "tune_state"
    search.mkdir()
    state = search / "experiment_state-2026-12-03_09-00-00.json"
    keeper = TuneStateKeeper(str(search), str(kept))
    state.write_text(json.dumps({"trial_data": [["t1", "TERMINATED"]]}))
    keeper.keep()
    complete = state.read_text()
    state.write_text(json.dumps({"trial_data": [["t1", "TERMINATED"], ["t2", "RUNNING"]]})[:30])
    keeper.keep()                                                     # a cut version is not kept
    said = []
    repair_tune_state(str(search), str(kept), said.append)
    assert state.read_text() == complete
    assert said == [f"{state} was cut short (a write that failed); put back its last complete "
                    f"version, from {kept / state.name}"]
    repair_tune_state(str(search), str(kept), said.append)            # complete now: untouched
    assert len(said) == 1


def test_a_cut_experiment_state_without_a_complete_copy_is_named(tmp_path):
    search = tmp_path / "search_pretrain"
    search.mkdir()
    (search / "experiment_state-x.json").write_text('{"trial_data": [')
    with pytest.raises(StateError, match=r"experiment_state-x.json: Tune's experiment state is cut short"):
        repair_tune_state(str(search), str(tmp_path / "kept"), print)


def test_disk_errors_are_told_from_other_errors():
    assert is_disk_error(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            pickle.loads(pickle.dumps(list(range(100)))[:20])
        except Exception as inner:
            raise RuntimeError("Tune's result grid") from inner
    except RuntimeError as outer:
        assert is_disk_error(outer)                                   # a pickle cut short
    assert not is_disk_error(ValueError("lr must be > 0"))
    assert not is_disk_error(OSError(errno.ENOENT, "No such file"))
