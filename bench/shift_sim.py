"""Simulated test sets for ``bench_shift.py``: how ``--threshold auto`` does against ``oof`` at every size.

Scores come from a model of what ``cv`` and ``submit`` make: each image has a logit N(+-MU, SD_IMG) by class;
each of K fold models adds its own N(0, SD_FOLD). An OOF row is scored by one fold model; a test row by all K
(its views), and ``submit`` cuts their average. The OOF set (20,000 rows, balanced) is fixed; the OOF
threshold is its exact best. Shifts act on the image logits:

- ``share``: the AI share of the test set (label shift);
- ``move``: upscaling: AI logits fall by ``move``, human logits by ``move / 4`` (AI images score more human);
- ``blur``: every logit scaled by ``blur`` (the classes drift together);
- ``weak``: that share of the AI images comes from a generator the models never saw, scoring like a weaker
  model's (logit mean ``WEAK_MU``);
- detail loss (``move`` = ``DETAIL_MOVE``): AI images that lost the detail the models look for (blur) score
  almost as human: one lump, which no score statistic tells from fewer AI images.

Each variant is drawn several times; every draw is diagnosed once (``diagnose``), and each rule of a grid of
:class:`aivh_ens.blend.shift.AutoRule` constants is then applied to the same diagnoses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aivh_ens.blend.shift import (
    AUTO,
    AutoRule,
    ShiftDiagnosis,
    ThresholdMode,
    auto_mode,
    diagnose,
    prior_threshold,
    share_threshold,
)
from aivh_ens.metrics import best_threshold, f1

MU, SD_IMG, SD_FOLD, K, WEAK_MU = 2.0, 1.0, 1.0, 5, 0.5
"""Class logit means +-2 and these spreads give an OOF F1 near 0.92 and AUC near 0.975, like the CIFAKE
``tiny`` blend's (0.93)."""
DETAIL_MOVE = 3.5
"""AI logits fall by 3.5 (human ones by 0.9): test AUC near 0.8, one lump, the OOF cut labelling 5-15% AI, as on
CIFAKE's test images halved and scaled back up (AUC 0.78, OOF cut 15.5% AI of 50%)."""


@dataclass(frozen=True)
class Variant:
    """One kind of test set: ``n`` images, AI share ``share``, drawn ``draws`` times, shifted as above."""

    name: str
    group: str  # unshifted | one-class | shifted | small (shifted, few images) | combo | unseen | detail
    n: int
    share: float
    draws: int
    move: float = 0.0
    blur: float = 1.0
    weak: float = 0.0


def views(
    rng: np.random.Generator, n: int, share: float, v: Variant | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), scores (K, n)): exactly ``round(share * n)`` AI images, in random order."""
    y = np.zeros(n, dtype=np.int8)
    y[: round(share * n)] = 1
    y = rng.permutation(y)
    mean = np.where(y == 1, MU, -MU)
    if v is not None and v.weak:
        weak = (y == 1) & (rng.random(n) < v.weak)
        mean = np.where(weak, WEAK_MU, mean)
    if v is not None:
        mean = (mean - np.where(y == 1, v.move, v.move / 4)) * v.blur
    z = mean + rng.normal(0, SD_IMG, n)
    return y, 1 / (1 + np.exp(-(z[None] + rng.normal(0, SD_FOLD, (K, n)))))


def oof_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, OOF scores, OOF threshold): each row scored by the one fold model that did not train on it."""
    y, p = views(np.random.default_rng(seed), n, 0.5)
    s = p[np.arange(n) % K, np.arange(n)]
    return y, s, best_threshold(y, s)[0]


def variants(smoke: bool) -> list[Variant]:
    """The issue's Measure section: small unshifted sets, one-class and 5% sets, the six shifted variants,
    25% AI + upscaled at three shares and two strengths, and the unseen generator."""
    sizes, draws, n = ((50, 100), 2, 400) if smoke else ((50, 100, 200, 500, 2000), 12, 4000)
    d = 1 if smoke else 4
    out = [Variant(f"unshifted N={k}", "unshifted", k, 0.5, draws) for k in sizes]
    out += [
        Variant(f"all human N={n}", "one-class", n, 0.0, d),
        Variant("all human N=200", "one-class", 200, 0.0, d),
        Variant(f"AI 5% N={n}", "one-class", n, 0.05, d),
        Variant("AI 5% N=500", "one-class", 500, 0.05, d),
        Variant(f"as train N={n}", "shifted", n, 0.5, d),
        Variant("AI 25%", "shifted", n, 0.25, d),
        Variant("AI 75%", "shifted", n, 0.75, d),
        Variant("upscaled", "shifted", n, 0.5, d, move=1.5),
        Variant("blurred", "shifted", n, 0.5, d, blur=0.6),
        Variant("AI 25% + upscaled", "shifted", n, 0.25, d, move=1.5),
    ]
    out += [
        Variant(f"upscaled N={k}", "small", k, 0.5, draws, move=1.5)
        for k in (sizes if smoke else (100, 200, 500))
    ]
    for share in (0.1, 0.25, 0.4):
        for move in (0.75, 1.5):
            out.append(Variant(f"AI {share:.0%} + up {move:g}", "combo", n, share, d, move=move))
    out += [
        Variant("unseen gen (half AI weak)", "unseen", n, 0.5, d, weak=0.5),
        Variant("unseen gen, AI 25%", "unseen", n, 0.25, d, weak=0.5),
        Variant("AI lose detail", "detail", n, 0.5, d, move=DETAIL_MOVE),
        Variant("AI 25%, lose detail", "detail", n, 0.25, d, move=DETAIL_MOVE),
    ]
    return out


@dataclass(frozen=True)
class Draw:
    """One drawn test set: labels, the averaged scores ``submit`` cuts, its diagnosis and best F1."""

    y: np.ndarray
    t: np.ndarray
    diag: ShiftDiagnosis
    best: float


def draw_all(
    vs: Sequence[Variant], oof: tuple[np.ndarray, np.ndarray, float], seed: int
) -> dict[str, list[Draw]]:
    """Every variant's draws, each diagnosed once against the OOF set."""
    y0, s0, thr = oof
    out: dict[str, list[Draw]] = {}
    for i, v in enumerate(vs):
        rng = np.random.default_rng([seed, i])
        out[v.name] = []
        for _ in range(v.draws):
            y, p = views(rng, v.n, v.share, v)
            t = p.mean(axis=0)
            d = diagnose(s0, y0, t, thr, test_views=p)
            out[v.name].append(Draw(y, t, d, best_threshold(y, t)[1] if y.any() else 0.0))
    return out


def old_rule(d: ShiftDiagnosis) -> ThresholdMode:
    """The rule this one replaces: fixed KS 0.04 and snap 0.02, the mixture trusted whenever scores moved."""
    em, mix = d.estimates[0].share, d.estimates[2].share
    if d.ks_label_shift <= 0.04 or mix is None:
        if em is None or abs(em - d.train_share) <= 0.02:
            return ThresholdMode("oof")
        return ThresholdMode("prior", float(np.clip(em, 0.01, 0.99)))
    return ThresholdMode("share", float(np.clip(mix, 0.01, 0.99)))


class Scorer:
    """F1 of a mode on a draw, with the OOF sweeps of ``prior:`` cached (they depend on P alone)."""

    def __init__(self, oof: tuple[np.ndarray, np.ndarray, float]) -> None:
        self.y, self.s, self.thr = oof
        self._prior: dict[float, float] = {}

    def threshold(self, m: ThresholdMode, t: np.ndarray) -> float:
        if m.kind == "prior":
            p = round(float(m.value or 0.5), 4)
            if p not in self._prior:
                self._prior[p] = prior_threshold(self.s, self.y, p)
            return self._prior[p]
        return share_threshold(t, float(m.value or 0.5)) if m.kind == "share" else self.thr

    def run(self, draws: dict[str, list[Draw]], rule: AutoRule | None) -> dict[str, dict[str, np.ndarray]]:
        """Per variant: F1 of ``oof``, of auto under ``rule`` (None: :func:`old_rule`), the best F1, the share
        auto labels AI, and the modes it chose."""
        out = {}
        for name, ds in draws.items():
            rows = []
            for dr in ds:
                m = old_rule(dr.diag) if rule is None else auto_mode(dr.diag, rule)[0]
                thr = self.threshold(m, dr.t)
                rows.append(
                    (f1(dr.y, dr.t >= self.thr), f1(dr.y, dr.t >= thr), dr.best, np.mean(dr.t >= thr), m.kind,
                     f1(dr.y, dr.t >= share_threshold(dr.t, float(self.y.mean())))),
                )  # fmt: skip
            cols = list(zip(*rows, strict=True))
            keys = ("oof", "auto", "best", "ai", "mode", "train_share")
            out[name] = {k: np.array(c) for k, c in zip(keys, cols, strict=True)}
        return out


def grid(smoke: bool) -> list[AutoRule]:
    """The constants the bench chooses (the rest are conventions): the least test size for ``share:``, the
    cap on ``prior:``'s move, the standard errors an estimate must clear, and whether ``share:`` needs EM or
    BBSE to agree, and whether ``prior:`` needs the mixture to agree. The default :data:`AUTO` comes first, so that ties go to it."""
    mins, caps, zs = (
        ((0, 200), (1.5, 1e9), (2.0,))
        if smoke
        else ((0, 100, 200, 500, 1000), (1.0, 1.5, 2.0, 3.0, 1e9), (1.5, 2.0, 3.0))
    )
    return [AUTO] + [
        dataclasses.replace(AUTO, share_min_n=m, odds_cap=c, z=z, share_agree=a, prior_agree_mixture=b)
        for m in mins
        for c in caps
        for z in zs
        for a in (False, True)
        for b in (True, False)
    ]


def loss(res: dict[str, dict[str, np.ndarray]], names: Sequence[str]) -> float:
    """What a rule is chosen by, the goals as one number over ``names``: the mean gap to the best F1, plus
    ten times the mean F1 lost to ``oof`` beyond 0.01 (the goal no variant may miss)."""
    gap = [np.mean(res[n]["best"] - res[n]["auto"]) for n in names]
    lost = [max(0.0, float(np.mean(res[n]["oof"] - res[n]["auto"])) - 0.01) for n in names]
    return float(np.mean(gap) + 10 * np.mean(lost))


def lovo(
    results: list[dict[str, dict[str, np.ndarray]]], names: Sequence[str]
) -> tuple[int, dict[str, tuple[float, float]]]:
    """The rule chosen on every variant (its index) and, per variant, its gap to the best F1 under that
    rule (in sample) and under the rule chosen without it (leave one variant out)."""
    best_all = int(np.argmin([loss(r, names) for r in results]))
    out = {}
    for n in names:
        rest = [m for m in names if m != n]
        k = int(np.argmin([loss(r, rest) for r in results]))
        out[n] = tuple(float(np.mean(r[n]["best"] - r[n]["auto"])) for r in (results[best_all], results[k]))
    return best_all, out


def _modes(kinds: np.ndarray) -> str:
    names, counts = np.unique(kinds, return_counts=True)
    return " ".join(f"{n} {c}" for n, c in zip(names, counts, strict=True))


def print_variants(vs: Sequence[Variant], new: dict, old: dict) -> None:
    """One row per variant: mean F1 of oof, the old rule, auto, best; auto's worst draw against oof; modes."""
    head = (f"{'variant':<28}{'N':>6}{'AI':>5}{'draws':>6}{'best':>8}{'oof':>8}{'old':>8}{'auto':>8}"
            f"{'auto-oof':>10}{'worst':>8}  auto modes / old modes")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for v in vs:
        r, o = new[v.name], old[v.name]
        if v.share == 0:  # no AI image: F1 is 0 at any threshold; the share labelled AI says more
            print(f"{v.name:<28}{v.n:>6}{v.share:>5.0%}{v.draws:>6}   share labelled AI: oof {np.mean(r['oof_ai']):.3f}"
                  f", old {np.mean(o['ai']):.3f}, auto {np.mean(r['ai']):.3f}  {_modes(r['mode'])} / {_modes(o['mode'])}")  # fmt: skip
            continue
        diff = r["auto"] - r["oof"]
        print(f"{v.name:<28}{v.n:>6}{v.share:>5.0%}{v.draws:>6}{r['best'].mean():>8.4f}{r['oof'].mean():>8.4f}"
              f"{o['auto'].mean():>8.4f}{r['auto'].mean():>8.4f}{diff.mean():>+10.4f}{diff.min():>+8.3f}  "
              f"{_modes(r['mode'])} / {_modes(o['mode'])}")  # fmt: skip


def goals(vs: Sequence[Variant], r: dict) -> list[str]:
    """The issue's goals, each met or missed by how much."""
    scored = [v for v in vs if v.share > 0]
    lost = {v.name: float(np.mean(r[v.name]["oof"] - r[v.name]["auto"])) for v in scored}
    worst_v = max(lost, key=lost.get)
    unsh = [v for v in vs if v.group == "unshifted"]
    u_mean = min(float(np.mean(r[v.name]["auto"] - r[v.name]["oof"])) for v in unsh)
    u_draw = min(float(np.min(r[v.name]["auto"] - r[v.name]["oof"])) for v in unsh)
    six = [v.name for v in vs if v.group == "shifted"]
    gaps = [float(np.mean(r[n]["best"] - r[n]["auto"])) for n in six]
    lumps = sum(int(np.sum(r[v.name]["mode"] == "share")) for v in vs if v.group == "one-class")

    def verdict(ok: bool, text: str) -> str:
        return f"{'met   ' if ok else 'MISSED'} {text}"

    return [
        verdict(lost[worst_v] <= 0.01, f"no variant's mean F1 more than 0.01 below oof: worst {-lost[worst_v]:+.4f} ({worst_v})"),
        verdict(u_mean >= -0.003, f"unshifted sets, every size: mean F1 >= oof - 0.003: worst size {u_mean:+.4f}"),
        verdict(u_draw >= -0.03, f"unshifted sets: no draw loses more than 0.03: worst draw {u_draw:+.4f}"),
        verdict(np.mean(gaps) <= 0.01 and max(gaps) <= 0.02,
                f"six shifted variants: mean gap <= 0.01, max <= 0.02: mean {np.mean(gaps):.4f}, max {max(gaps):.4f}"),
        verdict(lumps == 0, f"one-lump sets (all human, 5% AI) never get share: {lumps} draws did"),
    ] + [
        f"open   {v.name}: auto {np.mean(r[v.name]['auto']):.4f} ({_modes(r[v.name]['mode'])}), best "
        f"{np.mean(r[v.name]['best']):.4f}; share:<training share>, which auto's reason then names, "
        f"{np.mean(r[v.name]['train_share']):.4f}"
        for v in vs if v.group == "detail"
    ]  # fmt: skip


def report(smoke: bool) -> tuple[float, float]:
    """Print the simulated study; returns auto's and oof's mean gap to the best F1 over the six variants."""
    import time

    t0 = time.perf_counter()
    oof = oof_set(4000 if smoke else 20000, seed=0)
    vs = variants(smoke)
    draws = draw_all(vs, oof, seed=1)
    sc = Scorer(oof)
    new, old = sc.run(draws, AUTO), sc.run(draws, None)
    for name, ds in draws.items():
        new[name]["oof_ai"] = np.array([np.mean(d.t >= sc.thr) for d in ds])
    print(f"== simulated test sets (OOF {len(oof[0])} rows, F1 {f1(oof[0], oof[1] >= oof[2]):.4f}; {AUTO})")
    print_variants(vs, new, old)
    print("\n" + "\n".join(goals(vs, new)))
    rules = grid(smoke)
    results = [sc.run(draws, r) for r in rules]
    names = [v.name for v in vs if v.share > 0]
    k, gaps = lovo(results, names)
    print(
        f"\n== leave one variant out over {len(rules)} rules (share_min_n, odds_cap, z, share_agree, prior_agree_mixture)"
    )
    c = rules[k]
    print(f"chosen on all variants: share_min_n={c.share_min_n}, odds_cap={c.odds_cap:g}, z={c.z:g}, "
          f"share_agree={c.share_agree}, prior_agree_mixture={c.prior_agree_mixture}")  # fmt: skip
    print(f"{'variant':<28}{'in-sample gap':>15}{'LOVO gap':>10}")
    for n, (a, b) in gaps.items():
        print(f"{n:<28}{a:>15.4f}{b:>10.4f}")
    ins, out = np.mean([g[0] for g in gaps.values()]), np.mean([g[1] for g in gaps.values()])
    print(f"{'mean':<28}{ins:>15.4f}{out:>10.4f}")
    print(f"loss (mean gap + 10 x mean F1 lost to oof beyond 0.01): chosen {loss(results[k], names):.4f}, "
          f"the default AutoRule {loss(new, names):.4f}; the goals under the chosen constants:")  # fmt: skip
    print("\n".join(goals(vs, results[k])))
    print(f"simulated study: {time.perf_counter() - t0:.0f}s")
    six = [v.name for v in vs if v.group == "shifted"]
    gap = lambda key: float(np.mean([np.mean(new[n]["best"] - new[n][key]) for n in six]))  # noqa: E731
    return gap("auto"), gap("oof")
