"""Built-in instruction tasks generated from a seed, for demos, tests and benchmarks that need no
data files: short inputs and outputs a 135M model learns with LoRA in minutes, scored by exact
match. Generation uses only `random.Random(seed)` and fixed word lists (no locale), so a seed
gives the same records on every machine and Python run; train and eval never share an item.
"""
from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import Callable

from deltatune.errors import ConfigError

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DAY = datetime.date(1950, 1, 1)
LAST_DAY = datetime.date(2049, 12, 31)
DATES_INSTRUCTION = "Convert the date to ISO 8601 format (YYYY-MM-DD)."

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBERS_INSTRUCTION = "Write the number in digits."
NUMBERS_LIMIT = 100_000


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Every style is unambiguous: numeric day/month orders are either year-first or say their order.
DATE_STYLES: list[Callable[[datetime.date], str]] = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",
    lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    lambda d: f"{d.day}.{d.month}.{d.year} (day.month.year)",
    lambda d: f"{MONTHS[d.month - 1].upper()} {d.day}, {d.year}",
]


def date_record(index: int, rng: random.Random) -> dict:
    """The record of day `index` after 1950-01-01, written in a style drawn from `rng`."""
    date = FIRST_DAY + datetime.timedelta(days=index)
    return {"instruction": DATES_INSTRUCTION, "input": rng.choice(DATE_STYLES)(date),
            "output": date.isoformat()}


def number_words(number: int) -> str:
    """English words of 0 <= number < 1,000,000 ("three hundred and twelve")."""
    if number < 20:
        return ONES[number]
    if number < 100:
        return TENS[number // 10] + ("" if number % 10 == 0 else f"-{ONES[number % 10]}")
    if number < 1000:
        rest = number % 100
        return f"{ONES[number // 100]} hundred" + (f" and {number_words(rest)}" if rest else "")
    rest = number % 1000
    head = f"{number_words(number // 1000)} thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


def number_record(index: int, rng: random.Random) -> dict:
    return {"instruction": NUMBERS_INSTRUCTION, "input": number_words(index),
            "output": str(index)}


@dataclass(frozen=True)
class BuiltinTask:
    """A generated task: item `index` (0 <= index < capacity) → record, with an rng for style."""

    description: str
    record: Callable[[int, random.Random], dict]
    capacity: int


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "dates": BuiltinTask(
        "normalise dates written in many styles (\"the 5th of March, 2019\", \"5 Mar 2019\", "
        "\"2019.03.05\", ...) to ISO format 2019-03-05; days from 1950 to 2049",
        date_record, (LAST_DAY - FIRST_DAY).days + 1),
    "numbers": BuiltinTask(
        "write numbers given in English words (\"three thousand and twelve\") in digits; "
        "0 to 99,999",
        number_record, NUMBERS_LIMIT),
}


def builtin_task(name: str, seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train_records, eval_records) of a built-in task; the two never share an item."""
    if name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; choose one of "
                          f"{', '.join(sorted(BUILTIN_TASKS))}")
    task = BUILTIN_TASKS[name]
    if n_train < 1 or n_eval < 0:
        raise ConfigError(f"built-in task sizes must be n_train >= 1 and n_eval >= 0, got "
                          f"{n_train} and {n_eval}")
    if n_train + n_eval > task.capacity:
        raise ConfigError(f"built-in task {name!r} has only {task.capacity} distinct items; "
                          f"asked for {n_train} + {n_eval}")
    records = _draw(task, seed, n_eval + n_train)
    return records[n_eval:], records[:n_eval]


def _draw(task: BuiltinTask, seed: int, count: int) -> list[dict]:
    """`count` records of distinct items. Items are drawn one at a time (not random.sample,
    whose algorithm changes with the count) so the first k records of a seed never depend on
    `count`: eval, drawn first, stays the same when the training size changes."""
    rng, seen, records = random.Random(seed), set(), []
    while len(records) < count:
        index = rng.randrange(task.capacity)
        if index not in seen:
            seen.add(index)
            records.append(task.record(index, rng))
    return records
