"""Shift diagnosis and threshold modes (aivh_ens.blend.shift) on constructed score distributions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import ks_2samp

from aivh_ens.blend import shift
from aivh_ens.errors import UserError
from aivh_ens.metrics import best_threshold, f1


def scores(n: int, share: float, seed: int, move: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores): class logits N(+-1.5, 1), AI share ``share``; ``move`` shifts every logit."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < share
    z = np.where(y, 1.5, -1.5) + rng.normal(0, 1, n) + move
    return y.astype(np.int8), 1 / (1 + np.exp(-z))


OOF = scores(6000, 0.5, 0)


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("oof", "oof", None), ("auto", "auto", None), ("share:0.5", "share", 0.5), ("prior:0.25", "prior", 0.25),
     ("0.7", "value", 0.7), ("0", "value", 0.0), (" 1 ", "value", 1.0)],
)  # fmt: skip
def test_parse_threshold(text, kind, value):
    m = shift.parse_threshold(text)
    assert (m.kind, m.value) == (kind, value)


@pytest.mark.parametrize(
    ("text", "words"),
    [("share:1.5", ["'share:1.5'", "strictly between 0 and 1"]), ("prior:-1", ["'prior:-1'", "between 0 and 1"]),
     ("share:abc", ["'share:abc'", "share:P"]), ("share:0", ["between 0 and 1"]), ("mean:0.5", ["unknown mode 'mean'"]),
     ("1.2", ["number in [0, 1]"]), ("nan", ["number in [0, 1]"]), ("", ["''"])],
)  # fmt: skip
def test_parse_threshold_refuses(text, words):
    with pytest.raises(UserError) as e:
        shift.parse_threshold(text)
    msg = str(e.value)
    assert "--threshold" in msg and "\n" not in msg
    for w in words:
        assert w in msg


def test_ks_distance_matches_scipy():
    a, b = scores(500, 0.5, 1)[1], scores(700, 0.3, 2)[1]
    assert shift.ks_distance(a, b) == pytest.approx(ks_2samp(a, b).statistic)
    # weights equal to repeating rows
    w = np.arange(len(b)) % 3 + 1
    assert shift.ks_distance(a, b, w) == pytest.approx(ks_2samp(a, np.repeat(b, w)).statistic)


def test_share_threshold_labels_the_top_share():
    s = np.random.default_rng(0).random(1000)
    for share in (0.1, 0.25, 0.5, 0.9):
        t = shift.share_threshold(s, share)
        assert np.sum(s >= t) == round(share * 1000)


def test_prior_threshold_is_the_sweep_on_reweighted_rows():
    y, s = OOF
    # at the training share it is the plain exact best threshold
    t_same = shift.prior_threshold(s, y, float(y.mean()))
    assert f1(y, s >= t_same) == pytest.approx(best_threshold(y, s)[1])
    # prior 0.25 from a 50% set = every human row counted three times as often as an AI row
    t = shift.prior_threshold(s, y, 0.25)
    reps = np.where(y == 1, 1, 3)
    t_dup, _ = best_threshold(np.repeat(y, reps), np.repeat(s, reps))
    assert np.sum(s >= t) == np.sum(s >= t_dup)
    assert t > t_same  # fewer AI rows: a higher cut


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_label_shift_estimates_recover_the_share(share):
    y, s = OOF
    yt, t = scores(4000, share, 7)
    d = shift.diagnose(s, y, t, best_threshold(y, s)[0])
    for e in d.estimates:  # the mixture assumes less, and overlapping lumps cost it some accuracy
        tol = 0.06 if "mixture" in e.method else 0.03
        assert e.share == pytest.approx(yt.mean(), abs=tol), e.method
    assert not d.scores_moved()  # only the share changed
    if share != 0.5:
        assert d.ks > d.ks_label_shift


def test_moved_scores_are_told_apart_from_label_shift():
    y, s = OOF
    yt, t = scores(
        4000, 0.5, 8, move=-1.5
    )  # every test logit moved down: the OOF threshold labels too few AI
    thr = best_threshold(y, s)[0]
    d = shift.diagnose(s, y, t, thr)
    assert d.scores_moved() and d.two_lumps()
    assert d.predicted_share < 0.35 and "moved" in " ".join(d.lines())
    assert d.estimate("two-component mixture on test logits") == pytest.approx(0.5, abs=0.06)
    c = shift.choose_threshold("auto", s, y, t, thr, "f1", d)
    assert c.resolved.startswith("share:") and "moved" in c.reason
    best = best_threshold(yt, t)[1]
    assert best - f1(yt, t >= c.threshold) < 0.02 < best - f1(yt, t >= thr)


@pytest.mark.parametrize(("share", "resolved"), [(0.5, "oof"), (0.2, "prior:"), (0.8, "prior:")])
def test_auto_under_label_shift(share, resolved):
    y, s = OOF
    yt, t = scores(4000, share, 9)
    thr = best_threshold(y, s)[0]
    c = shift.choose_threshold("auto", s, y, t, thr)
    assert c.resolved.startswith(resolved) and c.mode == "auto"
    if resolved == "oof":
        assert c.threshold == thr
    else:  # the cap keeps part of the way (an unseen generator looks the same); uncapped it goes all the way
        assert f1(yt, t >= c.threshold) >= f1(yt, t >= thr) - 0.002
        free = shift.choose_threshold(
            "auto", s, y, t, thr, rule=dataclasses.replace(shift.AUTO, odds_cap=1e9)
        )
        assert best_threshold(yt, t)[1] - f1(yt, t >= free.threshold) < 0.02


def test_each_mode_names_its_threshold():
    y, s = OOF
    t = scores(1000, 0.5, 3)[1]
    table = shift.modes_table(["oof", "share:0.3", "prior:0.3", "0.42", "auto"], s, y, t, 0.5)
    assert table["oof"].threshold == 0.5 and table["0.42"].threshold == 0.42
    assert np.mean(t >= table["share:0.3"].threshold) == pytest.approx(0.3, abs=0.001)
    assert table["prior:0.3"].threshold == shift.prior_threshold(s, y, 0.3)
    assert all(c.reason for c in table.values())


def fold_models(
    n: int, share: float, seed: int, k: int = 4, move: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (k, n) scores): each row's logit N(+-2, 1) (+ ``move``), seen by k fold models that each add
    their own noise N(0, 1.5), as models trained on different folds disagree."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < share
    z = np.where(y, 2.0, -2.0) + rng.normal(0, 1, n) + move
    return y.astype(np.int8), 1 / (1 + np.exp(-(z[None] + rng.normal(0, 1.5, (k, n)))))


def fold_oof() -> tuple[np.ndarray, np.ndarray]:
    """OOF scores as cv makes them: each row scored by the one fold model that did not train on it."""
    y, P = fold_models(6000, 0.5, 0)
    return y, P[np.arange(6000) % 4, np.arange(6000)]


@pytest.mark.parametrize(
    ("share", "move", "resolved"), [(0.5, 0.0, "oof"), (0.2, 0.0, "prior:"), (0.5, -1.5, "share:")]
)
def test_fold_averaged_test_scores_are_compared_one_fold_model_at_a_time(share, move, resolved):
    y, s = fold_oof()
    yt, views = fold_models(4000, share, 1, move=move)
    t = views.mean(axis=0)  # what submit cuts: the fold models' average
    thr = best_threshold(y, s)[0]
    averaged = shift.diagnose(s, y, t, thr)
    d = shift.diagnose(s, y, t, thr, test_views=views)
    assert d.n_views == 4 and "each of 4 fold models' own, pooled" in " ".join(d.lines())
    assert d.ks == pytest.approx(shift.ks_distance(views.ravel(), s))
    # the average separates the classes further than any one model: against single-model OOF scores it
    # looks moved even where nothing changed, and auto would throw away the OOF threshold
    assert averaged.scores_moved()
    c = shift.choose_threshold("auto", s, y, t, thr, "f1", d)
    assert c.resolved.startswith(resolved), c.reason
    if move == 0.0:  # one model at a time, the test scores fit the OOF classes (at the EM share)
        assert not d.scores_moved()
        assert d.estimate("EM on calibrated scores (Saerens 2002)") == pytest.approx(yt.mean(), abs=0.02)
    else:  # and a real move is still one
        assert d.scores_moved()
    # the predicted share and the mixture are of the scores the threshold cuts
    assert d.predicted_share == np.mean(t >= thr)
    assert d.estimate("two-component mixture on test logits") == averaged.estimate(
        "two-component mixture on test logits"
    )


def test_test_views_must_cover_the_test_rows():
    y, s = fold_oof()
    with pytest.raises(ValueError, match=r"expected \(V, 10\)"):
        shift.diagnose(s, y, s[:10], 0.5, test_views=s[:9][None])


def test_the_printed_auto_rule_names_its_constants():
    """The rule submit prints and records carries AutoRule's values, not unfilled placeholders."""
    from aivh_ens.blend.shift import AUTO_RULE
    from aivh_ens.blend.shift_diag import AUTO

    assert "{" not in AUTO_RULE and "}" not in AUTO_RULE
    assert f"at most {AUTO.odds_cap:g}x" in AUTO_RULE and f"at least {AUTO.share_min_n} images" in AUTO_RULE
