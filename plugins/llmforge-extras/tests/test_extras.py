"""llmforge-extras' own tests: written against llmforge.plugin and llmforge.testing only."""

from __future__ import annotations

import math

import pytest

from llmforge.plugin import Document, ErrorPolicy, SourceContext, UserError
from llmforge.testing import SpecError, run_spec, validate_spec

from llmforge_extras.options import CSVColumnOptions, InverseSqrtOptions
from llmforge_extras.schedule import inverse_sqrt
from llmforge_extras.source import csv_column


@pytest.fixture
def reviews(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["id,text,stars", '1,"Great, would buy again",5', "2,,1", '3,"two\nlines",4'] + [f"{i},review {i} of the product,3" for i in range(4, 60)]
    path.write_text("\n".join(rows) + "\n")
    return path


def context(mode: str = "raise") -> SourceContext:
    return SourceContext(name="data.sources.reviews", errors=ErrorPolicy(mode, log=None))


def test_each_non_empty_cell_of_the_column_is_a_document(reviews):
    docs = list(csv_column(CSVColumnOptions(paths=[str(reviews)], column="text"), context=context()))
    assert all(isinstance(d, Document) for d in docs)
    assert [d.content for d in docs[:2]] == ["Great, would buy again", "two\nlines"]
    assert docs[0].origin == f"{reviews}:2" and docs[1].origin == f"{reviews}:5"
    assert len(docs) == 58


def test_a_missing_column_is_bad_input_named_or_skipped(reviews):
    options = CSVColumnOptions(paths=[str(reviews)], column="body")
    with pytest.raises(UserError, match=r"reviews.csv: no column 'body' \(header: id, text, stars\)"):
        list(csv_column(options, context=context()))
    skipping = context("skip")
    assert list(csv_column(options, context=skipping)) == [] and skipping.errors.skipped == 1


def test_the_schedule_warms_up_then_falls_as_one_over_sqrt_step():
    lr = inverse_sqrt(InverseSqrtOptions(warmup_steps=4, min_lr=1e-5), peak_lr=1e-3, total_steps=10)
    assert [lr(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr(15) == pytest.approx(1e-3 * math.sqrt(4 / 16))
    assert lr(10**9) == 1e-5


def test_options_are_validated_where_a_spec_writes_them(reviews):
    spec = validate_spec([f"data.sources.sums={{name: csv_column, paths: ['{reviews}'], column: text}}",
                          "stages.1.train.lr_schedule={name: inverse_sqrt, warmup_steps: 2}"])
    assert spec.data.sources["sums"].column == "text" and spec.stages[1].train.lr_schedule.warmup_steps == 2
    with pytest.raises(SpecError) as e:
        validate_spec(["stages.1.train.lr_schedule={name: inverse_sqrt, warmup_steps: 0}",
                       "data.sources.sums={name: csv_column, paths: ['nowhere/*.csv'], column: text}"])
    assert {i.path for i in e.value.issues} == {("stages", 1, "train", "lr_schedule", "warmup_steps"), ("data", "sources", "sums", "paths", 0)}


@pytest.mark.slow
def test_a_run_trains_on_the_column_with_the_schedule(reviews, run_dir):
    rows = run_spec([f"data.sources.sums={{name: csv_column, paths: ['{reviews}'], column: text}}",
                     "stages.1.train.lr_schedule={name: inverse_sqrt, warmup_steps: 2}"], run_dir=run_dir, max_steps=4)
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3 * math.sqrt(2 / 3), 1e-3 * math.sqrt(2 / 4)])
    assert any(r["kind"] == "eval" and "val_loss" in r for r in rows)
