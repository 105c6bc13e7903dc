"""How ``submit --threshold auto`` holds up when the test set is not the training set, at every test size.

Run: ``python bench/bench_shift.py [--smoke] [--cifake [--tar ../shared/data/cifake-dev.tar.gz]] [--threads 1]``.

First, on simulated scores (``bench/shift_sim.py``: the fold-model score model, 20,000 OOF rows), the issue's
test sets: balanced unshifted sets of 50 to 2,000 images drawn 12 times each, all-human and 5%-AI sets, the six
shifted variants (as train, AI 25%, AI 75%, upscaled, blurred, AI 25% + upscaled), 25% AI + upscaled at
shares 10/25/40% and two strengths, an unseen generator (half the AI images scoring like a weaker model's),
and AI images that lost their detail (they score almost as human: ``open`` lines, with the F1 that the
``share:`` auto's reason then names would give). Per variant: mean F1 of ``oof``, of the rule ``auto`` replaced (fixed KS 0.04), of ``auto`` and of
the best threshold in hindsight, auto's worst draw against ``oof`` and the modes it chose; then the goals,
met or missed; then the constants of :class:`aivh_ens.blend.shift.AutoRule` chosen on all variants and,
per variant, the gap under the constants chosen without it (leave one variant out). ``--smoke``: the
smallest sizes, one or two draws, in seconds.

With ``--cifake``, on CIFAKE (Krizhevsky & Hinton 2009; Bird & Lotfi 2024; ``../shared/data/cifake-dev.tar.gz``)
two ``tiny`` runs (test_efficientnet and test_convnext, 5 folds, native 32 px) are trained once and blended;
they are kept under ``--out`` and reused by later calls. The dev test split is then turned into test sets
unlike train:

- AI share 25%, 50% (unchanged) and 75% (label shift);
- every image upscaled 2x and re-saved as JPEG q92; every image halved and scaled back up (blur);
- AI share 25% combined with the upscaling.

Each variant is scored once by ``submit`` (its test scores are cached per run), then every threshold mode is
applied to the same scores. Per variant and mode it prints F1 at the mode's threshold, F1 at the best
threshold in hindsight and the gap; then AUC and the auto mode's gap with ``--adapt-bn``; then the same on the
demo data (``aivh-ens demo-data``), whose test set holds a generator the train set lacks
(``cifake shift: <auto gap> vs <oof gap> = <ratio>x``).

The last line reads ``bench shift: <mean gap of --threshold auto> vs <mean gap of --threshold oof> = <ratio>x``
over the six simulated shifted variants (ratio = oof gap / auto gap; gap = best F1 in hindsight - F1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
from PIL import Image

from aivh_ens.blend.stage import run_blend
from aivh_ens.config import resolve_config
from aivh_ens.infer.submission import DEFAULT_THRESHOLD, oof_blend, submit
from aivh_ens.metrics import best_threshold, f1, roc_auc
from aivh_ens.synth import make_demo_dataset
from aivh_ens.system import set_torch_threads
from aivh_ens.train import run_cv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shift_sim  # noqa: E402

MODES = ("oof", "auto", "share:0.5", "prior:0.5", "share:est", "prior:est")
"""``share:est``: the mixture's estimate of the test AI share; ``prior:est``: the EM estimate (what auto uses)."""


def train(data: Path, work: Path, runs: list[tuple[str, dict]], log: list[str]) -> None:
    """Train the runs (skipping finished ones) and blend them, unless the blend exists."""
    if (work / "runs" / "blend" / "blend.json").is_file():
        return
    for name, kw in runs:
        t0 = time.perf_counter()
        cfg = resolve_config("tiny", name=name, data=str(data), **kw)
        r = run_cv(cfg, work, resume=True, progress=False, log=lambda _m: None)
        log.append(f"trained {name}: OOF F1 {r.oof_metrics['f1']:.4f} in {time.perf_counter() - t0:.0f}s")
        print(log[-1], flush=True)
    b = run_blend(work, trials=100, seed=42)
    log.append(f"blend {b.picked.name}: nested F1 {b.picked.nested_mean:.4f}")
    print(log[-1], flush=True)


def _subset(sol: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Rows of ``sol`` keeping every row of the larger class needed and sub-sampling the other to ``share`` AI."""
    ai, hu = sol[sol.label == 1], sol[sol.label == 0]
    rng = np.random.default_rng(seed)
    if share < 0.5:
        ai = ai.iloc[rng.permutation(len(ai))[: round(len(hu) * share / (1 - share))]]
    elif share > 0.5:
        hu = hu.iloc[rng.permutation(len(hu))[: round(len(ai) * (1 - share) / share)]]
    return pd.concat([ai, hu]).sort_index()


def _resave(src: Path, dst: Path, kind: str) -> None:
    img = Image.open(src).convert("RGB")
    w, h = img.size
    if kind == "up2x":
        img.resize((2 * w, 2 * h), Image.BICUBIC).save(dst, "JPEG", quality=92)
    else:  # halved and back up: a blur
        img.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR).save(
            dst, "JPEG", quality=95
        )


def make_variants(src: Path, out: Path) -> dict[str, Path]:
    """The test variants as data folders (test.csv, solution.csv, images), built once."""
    sol = pd.read_csv(src / "solution.csv", dtype={"id": str})
    plan = {
        "AI 50% (as train)": (0.5, None),
        "AI 25%": (0.25, None),
        "AI 75%": (0.75, None),
        "upscaled 2x + JPEG q92": (0.5, "up2x"),
        "halved and back (blur)": (0.5, "blur"),
        "AI 25% + upscaled": (0.25, "up2x"),
    }
    dirs = {}
    for name, (share, kind) in plan.items():
        d = out / name.replace(" ", "_").replace("%", "").replace("(", "").replace(")", "").replace("+", "")
        dirs[name] = d
        if (d / "test.csv").is_file():
            continue
        rows = _subset(sol, share, seed=1)
        for i in rows["id"]:
            (d / i).parent.mkdir(parents=True, exist_ok=True)
            if kind is None:
                os.link(src / i, d / i)  # a hard link: the bytes, inside the variant folder
            else:
                _resave(src / i, d / i, kind)
        rows[["id", "label"]].to_csv(d / "solution.csv", index=False)
        rows[["id"]].to_csv(d / "test.csv", index=False)
    return dirs


def evaluate(work: Path, name: str, data: Path, adapt_bn: str = "off") -> dict[str, object]:
    """Every mode's F1 on one variant, from one submit's cached scores (``adapt_bn``: off, on or auto)."""
    out = work / "subs" / f"{name.replace(' ', '_').replace('%', '')}_bn-{adapt_bn}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    r = submit(work, data=data, out=out, proba=True, threshold="oof", adapt_bn=adapt_bn, progress=False,
               log=lambda _m: None)  # fmt: skip
    p = pd.read_csv(r.proba, dtype={"id": str})
    y = p.merge(pd.read_csv(data / "solution.csv", dtype={"id": str}), on="id")["label"].to_numpy()
    s = p["prob"].to_numpy()
    import json

    doc = json.loads((work / "runs" / "blend" / "blend.json").read_text())
    oof_s, oof_y, _ = oof_blend(work, doc)
    d = r.diagnosis  # submit's own: the test scores one fold model per run at a time against the OOF scores
    assert d is not None
    em, mix = d.estimates[0].share, d.estimates[2].share
    from aivh_ens.blend.shift import choose_threshold

    best = best_threshold(y, s)[1]
    row: dict[str, object] = {
        "variant": name,
        "true": y.mean(),
        "auc": roc_auc(y, s),
        "best": best,
        "diag": d,
        "adapted": r.adapted_bn,
    }
    for mode in MODES:
        m = mode.replace("share:est", f"share:{mix or 0.5:.4f}").replace("prior:est", f"prior:{em:.4f}")
        c = choose_threshold(m, oof_s, oof_y, s, float(doc["threshold"]), "f1", d)
        row[mode] = (f1(y, s >= c.threshold), c.resolved)
    return row


def scale_gap(work: Path, oof_dir: Path) -> list[str]:
    """Per run, on the test set scored last: the KS distance between its OOF probabilities (one model, one
    view per row) and its test scores averaged over the fold models as probabilities vs as logits."""
    from aivh_ens.blend.core import blend
    from aivh_ens.blend.shift import ks_distance, logits

    lines = []
    for cache in sorted(work.glob("runs/*/test/hflip*.csv")):
        if "adabn" in cache.name:
            continue
        run = cache.parts[-3]
        df = pd.read_csv(cache)
        P = df[[c for c in df.columns if c.startswith("fold")]].to_numpy().T  # (K, N)
        oof = pd.read_csv(oof_dir / f"{run}.csv")["prob"].to_numpy()
        w = np.ones(len(P))
        ks_p, ks_l = (ks_distance(blend(P, w, sp), oof) for sp in ("prob", "logit"))
        med = [float(np.median(np.abs(logits(x)))) for x in (oof, blend(P, w, "prob"), blend(P, w, "logit"))]
        lines.append(
            f"  {run} ({cache.name}): KS OOF vs test {ks_p:.3f} averaging folds as probabilities, {ks_l:.3f} as "
            f"logits; median |logit| OOF {med[0]:.2f}, test {med[1]:.2f} / {med[2]:.2f}"
        )
    return lines


def print_table(rows: list[dict], title: str) -> dict[str, float]:
    """The modes' F1 and gaps per variant; returns each mode's mean gap (and ``"auto F1"``, its mean F1)."""
    print(f"\n== {title}")
    head = f"{'variant':<26}{'AI':>5}{'AUC':>7}{'best F1':>9}" + "".join(f"{m:>18}" for m in MODES)
    print(head + "\n" + "-" * len(head))
    gaps: dict[str, list[float]] = {m: [] for m in MODES}
    for r in rows:
        cells = ""
        for m in MODES:
            f, _ = r[m]
            gaps[m].append(r["best"] - f)
            cells += f"{f:>10.4f} ({r['best'] - f:.3f})"
        print(f"{r['variant']:<26}{r['true']:>5.0%}{r['auc']:>7.3f}{r['best']:>9.4f}{cells}")
    means = {m: float(np.mean(g)) for m, g in gaps.items()}
    print(f"{'mean gap':<47}" + "".join(f"{v:>18.4f}" for v in means.values()))
    print(f"{'max gap':<47}" + "".join(f"{max(gaps[m]):>18.4f}" for m in MODES))
    means["auto F1"] = float(np.mean([r["auto"][0] for r in rows]))
    used = ", ".join(r["variant"] for r in rows if r["adapted"]) or "none"
    print(f"mean F1 of --threshold auto: {means['auto F1']:.4f}; AdaBN used on: {used}")
    for r in rows:
        d = r["diag"]
        est = ", ".join(f"{e.share:.2f}" if e.share is not None else "n/a" for e in d.estimates)
        print(f"  {r['variant']:<26} pred share {d.predicted_share:.2f}, KS {d.ks:.3f} / {d.ks_label_shift:.3f} "
              f"(after re-weighting), estimates EM/BBSE/mixture {est}; auto -> {r['auto'][1]}")  # fmt: skip
    return means


def cifake(args: argparse.Namespace) -> None:
    """The trained CIFAKE variants and the demo data (``--cifake``)."""
    if args.threads:
        set_torch_threads(args.threads)
    out, log = args.out, []
    if not args.tar.is_file() and not (out / "cifake-dev" / "solution.csv").is_file():
        raise SystemExit(
            f"bench shift needs CIFAKE's dev set: no {args.tar}; pass --tar PATH/cifake-dev.tar.gz"
        )
    out.mkdir(parents=True, exist_ok=True)
    src = out / "cifake-dev"
    if not (src / "solution.csv").is_file():
        with tarfile.open(args.tar) as t:
            t.extractall(out, filter="data")
    kw = dict(img_size=args.img_size, epochs=args.epochs, folds=5)
    work = out / "cifake-work"
    train(src, work, [("tiny-effnet", dict(model="test_efficientnet", **kw)),
                      ("tiny-convnext", dict(model="test_convnext", **kw))], log)  # fmt: skip
    variants = make_variants(src, out / "variants")
    rows, gap_lines = [], []
    for name, d in variants.items():
        rows.append(evaluate(work, name, d))
        if not gap_lines:  # the unshifted variant: how far fold averaging moves the score scale
            gap_lines = scale_gap(work, work / "oof")
    means = print_table(rows, f"CIFAKE dev test split, {len(variants)} variants (gap = best F1 - F1)")
    print("score scale on the unshifted test set:\n" + "\n".join(gap_lines))
    if not args.no_adapt_bn:
        on = print_table(
            [evaluate(work, n, d, "on") for n, d in variants.items()],
            "--adapt-bn on (BatchNorm statistics re-estimated on every test set)",
        )
        auto = print_table(
            [evaluate(work, n, d, "auto") for n, d in variants.items()],
            "--adapt-bn auto, the default (re-estimated when the diagnosis finds the scores moved)",
        )
        print(
            f"mean F1 of --threshold auto: adapt-bn off {means['auto F1']:.4f}, on {on['auto F1']:.4f}, "
            f"auto {auto['auto F1']:.4f}"
        )
    if args.demo_n:
        demo = out / "demo"
        if not (demo / "data" / "solution.csv").is_file():
            make_demo_dataset(demo / "data", n=args.demo_n, force=True)
        train(demo / "data", demo / "work", [("tiny-effnet", dict(model="test_efficientnet", group="pairs")),
                                             ("tiny-convnext", dict(model="test_convnext", group="pairs"))], log)  # fmt: skip
        for bn in ("off", "auto"):
            name = "demo test (unseen generator)"
            print_table([evaluate(demo / "work", name, demo / "data", bn)], f"demo data, --adapt-bn {bn}")
    default = DEFAULT_THRESHOLD
    print(
        f"\nmean gap to the best F1 over the CIFAKE variants, --adapt-bn off: {default} (the default) vs oof"
    )
    print(
        f"cifake shift: {means[default]:.4f} vs {means['oof']:.4f} = {means['oof'] / max(means[default], 1e-4):.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the smallest simulated sizes, one or two draws")
    ap.add_argument("--cifake", action="store_true", help="also train on CIFAKE and score its variants")
    ap.add_argument(
        "--tar", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifake-dev.tar.gz"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "shift")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--demo-n", type=int, default=2000, help="demo train images (0: skip the demo data)")
    ap.add_argument("--no-adapt-bn", action="store_true", help="skip the --adapt-bn on/auto tables")
    args = ap.parse_args()
    auto_gap, oof_gap = shift_sim.report(args.smoke)
    if args.cifake:
        cifake(args)
    print(
        f"\nmean gap to the best F1 over the six simulated shifted variants: {DEFAULT_THRESHOLD} (the default) vs oof"
    )
    print(f"bench shift: {auto_gap:.4f} vs {oof_gap:.4f} = {oof_gap / max(auto_gap, 1e-4):.2f}x")


if __name__ == "__main__":
    main()
