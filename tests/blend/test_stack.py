"""The ``stack`` blend method: nested-CV choice, blend.json round trip, tamper refusal."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oof_project import write_run

from aivh_ens.blend.artifact import _check_blend_doc, apply_blend, load_blend
from aivh_ens.blend.core import spaces
from aivh_ens.blend.stack import fit_stack
from aivh_ens.blend.stage import run_blend
from aivh_ens.errors import UserError

N = 2000


def negative_weight_runs(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Run a = signal + a large nuisance; run b = the nuisance alone. b says nothing about the label by
    itself, but a - b recovers the signal: only a negative weight on b uses it."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2 == 0).astype(float)  # as write_run labels the rows
    u = rng.normal(0, 3, n)
    logit = {"a": (2 * y - 1) + rng.normal(0, 1, n) + u, "b": u + rng.normal(0, 0.3, n)}
    return {k: np.round(1 / (1 + np.exp(-v)), 8) for k, v in logit.items()}


@pytest.fixture(scope="module")
def stacked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stack")
    for name, prob in negative_weight_runs().items():
        write_run(root, name, prob)
    run_blend(root, trials=20, nested_trials=5, seed=0)
    return root


def test_stack_beats_convex_blends_on_nested_score_when_a_run_needs_a_negative_weight(stacked):
    doc = json.loads((stacked / "runs" / "blend" / "blend.json").read_text())
    rows = {b["method"]: b["nested_mean"] for b in doc["baselines"]}
    convex = max(v for k, v in rows.items() if k != "stack")
    assert rows["stack"] > convex + 0.05, rows
    assert doc["method"] == "stack" and doc["space"] == "logit"
    assert doc["stack"]["coef"]["a"] > 0 > doc["stack"]["coef"]["b"]


def test_stack_threshold_comes_from_inner_oof_not_the_fitted_rows():
    """The threshold is the best one on inner-OOF scores: refitting on scrambled rows it never saw would not
    change it, and its in-sample score is at most the in-sample optimum."""
    probs = negative_weight_runs(400, seed=1)
    P = np.stack([probs["a"], probs["b"]])
    y = np.arange(400) % 2 == 0
    fit = fit_stack(spaces(P), y, "f1", seed=0)
    from aivh_ens.metrics import best_threshold

    _, in_sample_best = best_threshold(y, fit.scores(spaces(P)), "f1")
    assert fit.score <= in_sample_best + 1e-12 and 0.0 <= fit.threshold <= 1.0 and fit.C is not None


def test_stack_round_trips_through_blend_json(stacked):
    doc = load_blend(stacked / "runs" / "blend" / "blend.json")
    import pandas as pd

    scores = {r: pd.read_csv(stacked / "oof" / f"{r}.csv")["prob"].to_numpy() for r in ("a", "b")}
    probs, labels = apply_blend(doc, scores)
    coef = np.array([doc["stack"]["coef"]["a"], doc["stack"]["coef"]["b"]])
    S = spaces(np.stack([scores["a"], scores["b"]]))
    expect = 1 / (1 + np.exp(-(S["logit"].T @ coef + doc["stack"]["intercept"])))
    np.testing.assert_allclose(probs, expect, rtol=1e-12, atol=1e-12)
    assert np.array_equal(labels, (probs >= doc["threshold"]).astype(np.int64))
    assert abs(sum(doc["weights"].values()) - 1) < 1e-9


def _set(path: str, value):
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (_set("stack.coef.b", 5.0), "weights of a stack must be the shares of |stack.coef|"),
        (_set("stack.coef.c", 1.0), "stack.coef must map each run of runs"),
        (_set("stack.intercept", "0"), "stack.intercept must be a finite number"),
        (_set("stack.C", -1.0), "stack.C must be a number > 0"),
        (_set("stack.features", "rank"), "a stack reads logits"),
        (_set("space", "prob"), "a stack reads logits"),
        (_set("method", "caruana"), "a stack section goes with method 'stack'"),
        (_set("stack", KeyError), "a stack section goes with method 'stack'"),
        (_set("stack.extra", 1), "stack has unknown key(s) extra"),
    ],
)
def test_tampered_stack_section_is_refused_in_one_line(stacked, tmp_path, edit, error):
    doc = copy.deepcopy(json.loads((stacked / "runs" / "blend" / "blend.json").read_text()))
    edit(doc)
    with pytest.raises(UserError, match=re.escape(error)) as e:
        _check_blend_doc(doc)
    assert "\n" not in str(e.value)
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(error)):
        load_blend(path, stacked)


def test_cli_prints_the_stack_row_and_its_formula(stacked):
    from click.testing import CliRunner

    from aivh_ens.cli import main

    res = CliRunner().invoke(
        main, ["blend", "--workdir", str(stacked), "--trials", "5", "--nested-trials", "3", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert re.search(r"^stack\s+logit\s", res.output, re.M) and "<- picked" in res.output
    assert "stack: sigmoid(" in res.output and "* logit(b)" in res.output


def test_stack_inner_folds_keep_groups_whole(tmp_path, monkeypatch):
    from aivh_ens.data import folds as folds_mod

    y = np.tile([1, 0], 300)  # AI/human pairs
    groups = np.repeat(np.arange(300), 2)
    splits = folds_mod.group_splits(y, groups, 5, seed=0)
    seen = np.zeros(600, dtype=int)
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])  # no pair split across inner train and test
        seen[test] += 1
    assert (seen == 1).all()  # every row in exactly one inner test fold
    # OOF files with a group column: the blend hands each fit the groups of its rows
    rng = np.random.default_rng(0)
    for run in ("a", "b"):
        write_run(tmp_path, run, np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.3, 600), 0.01, 0.99), y=y,
                  folds=groups % 5)  # fmt: skip
        oof = tmp_path / "oof" / f"{run}.csv"
        df = pd.read_csv(oof)
        df["group"] = groups
        df.to_csv(oof, index=False)
    calls = []
    real = folds_mod.group_splits
    monkeypatch.setattr(
        folds_mod, "group_splits", lambda y, g, k, seed: calls.append(g) or real(y, g, k, seed)
    )
    run_blend(tmp_path, trials=3)
    assert len(calls) == 6 and all(g is not None for g in calls)  # the full fit and the 5 nested folds
    assert sorted(len(g) for g in calls) == [480] * 5 + [600]
