"""Built-in tasks: deterministic from the seed (also across Python processes), train and eval
disjoint, every date style correct and unambiguous."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys

import pytest

from deltatune.data.builtin import (BUILTIN_TASKS, DATE_STYLES, DATES_INSTRUCTION, MONTHS,
                                    WEEKDAYS, builtin_task, number_words, ordinal)
from deltatune.errors import ConfigError


def test_dates_are_deterministic_and_seed_dependent():
    first = builtin_task("dates", seed=7, n_train=200, n_eval=50)
    assert builtin_task("dates", seed=7, n_train=200, n_eval=50) == first
    assert builtin_task("dates", seed=8, n_train=200, n_eval=50) != first


def test_dates_are_identical_in_another_python_process():
    code = ("import json; from deltatune.data.builtin import builtin_task; "
            "print(json.dumps(builtin_task('dates', 3, 20, 5)))")
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env=environment).stdout
    train, eval_records = json.loads(output)
    assert (train, eval_records) == tuple(map(list, builtin_task("dates", 3, 20, 5)))


def test_train_and_eval_dates_are_distinct_and_disjoint():
    train, eval_records = builtin_task("dates", seed=0, n_train=3000, n_eval=300)
    train_days = {record["output"] for record in train}
    eval_days = {record["output"] for record in eval_records}
    assert len(train_days) == 3000 and len(eval_days) == 300
    assert not train_days & eval_days


def test_eval_set_does_not_change_with_the_training_size():
    _, small = builtin_task("dates", seed=1, n_train=10, n_eval=40)
    _, large = builtin_task("dates", seed=1, n_train=5000, n_eval=40)
    assert small == large


def test_every_date_record_is_correct():
    train, _ = builtin_task("dates", seed=2, n_train=2000, n_eval=0)
    inputs = {record["input"] for record in train}
    for record in train:
        assert record["instruction"] == DATES_INSTRUCTION
        date = datetime.date.fromisoformat(record["output"])
        assert 1950 <= date.year <= 2049
        assert record["input"] in {style(date) for style in DATE_STYLES}
        # Short outputs and inputs: learnable in minutes by a small model.
        assert len(record["input"]) <= 40
    assert len(inputs) == 2000
    seen_styles = {index for record in train for index, style in enumerate(DATE_STYLES)
                   if style(datetime.date.fromisoformat(record["output"])) == record["input"]}
    assert seen_styles == set(range(len(DATE_STYLES)))


def test_date_styles_are_unambiguous():
    # Two different dates never render to the same text in any style.
    day = datetime.date(2019, 3, 5)
    other = datetime.date(2019, 5, 3)
    assert {style(day) for style in DATE_STYLES}.isdisjoint({style(other) for style in DATE_STYLES})
    rendered = {style(day) for style in DATE_STYLES}
    assert {"March 5, 2019", "5 Mar 2019", "2019.03.05", "the 5th of March, 2019",
            "Tuesday, March 5 2019", "05/03/2019 (day/month/year)"} <= rendered
    numeric = [text for text in rendered if re.fullmatch(r"\d{1,2}\D\d{1,2}\D\d{4}.*", text)]
    assert numeric and all("(" in text for text in numeric)  # day/month order always stated
    assert WEEKDAYS[day.weekday()] == "Tuesday" and MONTHS[2] == "March"


@pytest.mark.parametrize("day,text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"),
                                      (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"),
                                      (22, "22nd"), (23, "23rd"), (31, "31st")])
def test_ordinal(day, text):
    assert ordinal(day) == text


@pytest.mark.parametrize("number,words", [
    (0, "zero"), (15, "fifteen"), (40, "forty"), (42, "forty-two"), (100, "one hundred"),
    (312, "three hundred and twelve"), (1000, "one thousand"), (3012, "three thousand and twelve"),
    (99999, "ninety-nine thousand nine hundred and ninety-nine")])
def test_number_words(number, words):
    assert number_words(number) == words


def test_numbers_task():
    train, eval_records = builtin_task("numbers", seed=0, n_train=300, n_eval=30)
    assert not {r["output"] for r in train} & {r["output"] for r in eval_records}
    assert all(number_words(int(r["output"])) == r["input"] for r in train + eval_records)


def test_registry_and_errors():
    assert {"dates", "numbers"} <= set(BUILTIN_TASKS)
    assert all(task.description for task in BUILTIN_TASKS.values())
    with pytest.raises(ConfigError, match="unknown built-in task 'colors'; choose one of dates"):
        builtin_task("colors", 0, 10, 10)
    with pytest.raises(ConfigError, match="only 100000 distinct items"):
        builtin_task("numbers", 0, 100_000, 1)
