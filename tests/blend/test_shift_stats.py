"""The statistics behind ``--threshold auto`` (aivh_ens.blend.shift_stats) and the rule's caution."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import kolmogi

from aivh_ens.blend import shift, shift_stats
from aivh_ens.metrics import best_threshold, f1

K = 4


def fold_views(n: int, share: float, seed: int, move: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (K, n) scores): logit N(+-2, 1) by class (AI ones moved by ``move``), exactly round(share * n)
    AI rows; each of K fold models adds its own N(0, 1): what cv and submit make (tests/blend/test_shift.py)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) < round(share * n))
    z = np.where(y, 2.0 + move, -2.0) + rng.normal(0, 1, n)
    return y.astype(np.int8), 1 / (1 + np.exp(-(z[None] + rng.normal(0, 1, (K, n)))))


def oof_rows(n: int = 8000) -> tuple[np.ndarray, np.ndarray, float]:
    y, P = fold_views(n, 0.5, 0)
    s = P[np.arange(n) % K, np.arange(n)]
    return y, s, best_threshold(y, s)[0]


OOF = oof_rows()


def auto(share: float, n: int, seed: int, move: float = 0.0, rule: shift.AutoRule = shift.AUTO):
    y, s, thr = OOF
    _, views = fold_views(n, share, seed, move)
    d = shift.diagnose(s, y, views.mean(axis=0), thr, test_views=views)
    return d, shift.choose_threshold("auto", s, y, views.mean(axis=0), thr, "f1", d, rule)


@pytest.mark.parametrize(("n", "m", "alpha"), [(50, 20000, 0.05), (4000, 20000, 0.01), (1000, 1000, 0.1)])
def test_ks_critical_value_is_kolmogorovs(n, m, alpha):
    crit = shift_stats.ks_critical(n, m, alpha)
    assert crit == pytest.approx(kolmogi(alpha) * np.sqrt((n + m) / (n * m)), rel=2e-3)
    assert shift_stats.ks_critical(4 * n, 4 * m, alpha) == pytest.approx(crit / 2)


def test_kish_n():
    assert shift_stats.kish_n(np.ones(500)) == pytest.approx(500)
    assert shift_stats.kish_n(np.r_[1.0, np.zeros(9)]) == pytest.approx(1)
    # half the rows three times as heavy: fewer effective rows than rows
    assert shift_stats.kish_n(np.r_[np.ones(50), 3 * np.ones(50)]) == pytest.approx(80)


def test_fold_views_of_one_image_count_once():
    y, s, thr = OOF
    _, views = fold_views(800, 0.5, 3)
    one = shift.diagnose(s, y, views[0], thr)
    copies = shift.diagnose(s, y, views[0], thr, test_views=np.repeat(views[:1], 5, axis=0))
    assert copies.ks_critical() == pytest.approx(one.ks_critical())
    assert copies.se(shift.EM) == pytest.approx(one.se(shift.EM))
    assert copies.se(shift.BBSE) == pytest.approx(one.se(shift.BBSE))


def test_em_standard_error_covers_the_share_and_shrinks_with_n():
    y, s, _ = OOF
    cal = shift_stats.calibrate(s, y)
    hits, ses = 0, {}
    for seed in range(40):
        yt, views = fold_views(400, 0.3, 100 + seed)
        p = cal(views)
        em = shift_stats.em_prior(p, 0.5)
        se = shift_stats.em_se(p, 0.5, em)
        hits += abs(em - yt.mean()) <= 2 * se
        ses.setdefault(400, se)
    assert hits >= 34  # 2 SE: about 95% of 40 draws
    p = cal(fold_views(1600, 0.3, 7)[1])
    assert shift_stats.em_se(p, 0.5, 0.3) == pytest.approx(ses[400] / 2, rel=0.15)


@pytest.mark.parametrize("n", [50, 100, 200, 500])
def test_small_unshifted_sets_keep_the_oof_threshold(n):
    for seed in range(8):
        d, c = auto(0.5, n, 200 + seed)
        assert c.resolved == "oof", c.reason
        assert f"for {n} images" in c.reason


@pytest.mark.parametrize(("share", "move"), [(0.0, 0.0), (0.05, 0.0), (0.0, -1.0), (0.05, -1.0), (0.0, 1.0)])
def test_one_lump_never_gets_share(share, move):
    """All-human and 5%-AI sets, as they are and with every score moved (so the label-shift fit fails too)."""
    for seed in range(3):
        d, c = auto(share, 4000, 300 + seed, move=move)
        assert not c.resolved.startswith("share:"), c.reason
        assert not d.two_lumps()
        assert d.estimate(shift.MIXTURE) is not None  # a mixture was fitted, and rejected as one lump


def test_two_real_lumps_that_moved_get_share():
    y, s, thr = OOF
    _, views = fold_views(4000, 0.5, 9, move=-1.2)  # AI images score more human: the OOF cut labels too few
    d, c = auto(0.5, 4000, 9, move=-1.2)
    assert d.scores_moved() and d.two_lumps()
    assert c.resolved.startswith("share:") and "two lumps" in c.reason
    small = dataclasses.replace(shift.AUTO, share_min_n=5000)
    c2 = shift.choose_threshold("auto", s, y, views.mean(axis=0), thr, "f1", d, small)
    assert c2.resolved == "oof" and "at least 5000 test images" in c2.reason


def test_detail_loss_keeps_oof_and_says_how_to_get_out():
    """AI images that lost their detail score almost as human: the scores moved into one lump, the OOF cut labels
    few AI, and auto keeps it (no score statistic tells this from fewer AI images), but says what share: to
    pass; on this set that share is far better, and on a set whose AI share really fell it would not be."""
    y, s, thr = OOF
    yt, views = fold_views(4000, 0.5, 21, move=-3.0)
    t = views.mean(axis=0)
    d = shift.diagnose(s, y, t, thr, test_views=views)
    c = shift.choose_threshold("auto", s, y, t, thr, "f1", d)
    assert d.scores_moved() and not d.two_lumps()
    assert c.resolved == "oof" and "pass --threshold share:0.5" in c.reason, c.reason
    hinted = shift.choose_threshold("share:0.5", s, y, t, thr, "f1", d).threshold
    assert f1(yt, t >= hinted) > f1(yt, t >= thr) + 0.3
    # a set as it was trained on gets no such hint
    _, c0 = auto(0.5, 4000, 22)
    assert "pass --threshold" not in c0.reason


def test_prior_moves_only_beyond_its_standard_error_and_is_capped():
    d, c = auto(0.2, 4000, 11)
    em = d.estimate(shift.EM)
    assert abs(em - 0.2) < 3 * d.se(shift.EM)
    # 20% AI is odds 1/4, beyond the cap of 1.5x the training odds: moved to 40% only, and said why
    assert c.resolved == "prior:0.4" and "unseen generator" in c.reason
    assert any("unseen generator" in line for line in d.lines())
    free = dataclasses.replace(shift.AUTO, odds_cap=1e9)
    assert shift.auto_mode(d, free)[0].value == pytest.approx(em)
    # the same shift on 60 images is within EM's own error: the OOF threshold stays
    d_small, c_small = auto(0.4, 60, 12)
    assert c_small.resolved == "oof" and "within 3 SE" in c_small.reason


def test_capped_share():
    assert shift.capped_share(0.2, 0.5, 2.0) == pytest.approx(1 / 3)
    assert shift.capped_share(0.9, 0.5, 2.0) == pytest.approx(2 / 3)
    assert shift.capped_share(0.4, 0.5, 2.0) == 0.4


def test_old_records_still_read():
    """A ``<submission>.json`` diagnosis written before the standard errors existed."""
    d, _ = auto(0.5, 500, 13)
    old = {
        k: v for k, v in d.to_dict().items() if k not in ("n_eff_oof", "bic_gain", "separation", "histogram")
    }
    old["estimates"] = [{k: v for k, v in e.items() if k != "se"} for e in old["estimates"]]
    back = shift.ShiftDiagnosis.from_dict(old)
    assert back.ks_critical() >= shift.AUTO.ks_floor and back.lines()
