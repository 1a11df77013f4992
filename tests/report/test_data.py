"""Gathering the data checks' findings: the parent run's ``data_report.json`` as logged; nothing
(and no note) for a study run before the search logged one; a note for one that is no object."""

from __future__ import annotations

import optuna
import pytest

from ftsearch import report
from ftsearch.config import load_study
from ftsearch.data.checks import LABEL_ISSUES
from ftsearch.distributed.storage import open_storage
from ftsearch.generations import PARENT_RUN_ATTR
from ftsearch.report.collect import DATA_REPORT
from tests.helpers import store
from tests.report.samples import label_issues, text_data_report


@pytest.fixture
def parent_with(write_study):
    """Make the tiny study (no trials) with an MLflow parent run holding ``artifacts`` at its root,
    each as JSON (``log_dict``). Returns (config, parent run id)."""

    def make(artifacts: dict):
        config = load_study(str(write_study()))
        client = store()
        run_id = client.create_run(client.create_experiment(config.name)).info.run_id
        for name, content in artifacts.items():
            client.log_dict(run_id, content, name)
        study = optuna.create_study(study_name=config.name, storage=open_storage(), direction="maximize")
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return config, run_id

    return make


def test_the_data_report_on_the_parent_run_is_collected(parent_with):
    config, _ = parent_with({DATA_REPORT: text_data_report(), "config.json": {"name": "tiny"}})
    gathered = report.collect(config)
    assert gathered.data == text_data_report()
    assert gathered.notes == []


def test_the_label_issues_beside_the_data_report_are_collected_into_it(parent_with):
    config, _ = parent_with({DATA_REPORT: text_data_report(), LABEL_ISSUES: label_issues()})
    gathered = report.collect(config)
    assert gathered.data == {**text_data_report(), "label_issues": label_issues()}
    assert gathered.data_figures == {} and gathered.notes == []


def test_label_issues_that_are_no_object_are_left_out_with_a_note(parent_with):
    config, run_id = parent_with({DATA_REPORT: text_data_report(), LABEL_ISSUES: [1]})
    gathered = report.collect(config)
    assert gathered.data == text_data_report()
    assert gathered.notes == [f"{LABEL_ISSUES} of run {run_id} is not a JSON object: the likely label errors are left out"]


def test_a_study_run_before_data_reports_has_none_and_no_note(parent_with):
    config, _ = parent_with({"config.json": {"name": "tiny"}})
    gathered = report.collect(config)
    assert gathered.data is None and gathered.notes == []


def test_a_data_report_that_is_no_object_is_left_out_with_a_note(parent_with):
    config, run_id = parent_with({DATA_REPORT: [1, 2]})
    gathered = report.collect(config)
    assert gathered.data is None
    assert gathered.notes == [f"{DATA_REPORT} of run {run_id} is not a JSON object: the data section is left out"]
