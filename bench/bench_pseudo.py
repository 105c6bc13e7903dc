"""One round of pseudo-labels (``cv --pseudo``) on test sets unlike train, against the same run without it.

Run: ``python bench/bench_pseudo.py [--tar ../shared/data/cifake-dev.tar.gz] [--min-conf 0.95] [--threads 1]``.

It reuses ``bench/bench_shift.py``'s trained runs and test variants (under ``bench/out/shift/``, built on first
use). On CIFAKE (Krizhevsky & Hinton 2009; Bird & Lotfi 2024) for the variants "AI 50% (as train)",
"upscaled 2x + JPEG q92" and "halved and back (blur)", and on the demo data (a generator the train set lacks):

1. the two-run blend's scores of the variant's test images (``submit --proba``) are the pseudo-label source;
2. a data folder joins the train images (linked) and the variant's test images;
3. ``tiny-effnet`` is trained again with ``--pseudo`` and otherwise the same settings;
4. both runs are scored on the variant, each as a one-run blend through ``submit`` with its defaults: F1 at
   the shipped threshold, F1 at the best threshold in hindsight, and AUC (what the ranking gained, apart
   from what the threshold gained).

The last line reads ``bench pseudo: <F1 with> vs <F1 without> = <ratio>x`` on the upscaled variant, at the
shipped threshold. Runs are kept under ``--out`` and reused; the first call trains one run per variant.

``--smoke`` (for the test suite): 40 demo images (``aivh-ens demo-data``) stand in for CIFAKE, the upscaled
variant only, pseudo-labels from 0.6 without class balancing, all in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shift import make_variants, train  # noqa: E402

from aivh_ens.blend.stage import run_blend  # noqa: E402
from aivh_ens.config import resolve_config  # noqa: E402
from aivh_ens.infer.submission import submit  # noqa: E402
from aivh_ens.metrics import best_threshold, f1, roc_auc  # noqa: E402
from aivh_ens.synth import make_demo_dataset  # noqa: E402
from aivh_ens.system import set_torch_threads  # noqa: E402
from aivh_ens.train import run_cv  # noqa: E402
from aivh_ens.train.pseudo import select_pseudo  # noqa: E402

VARIANTS = ("AI 50% (as train)", "upscaled 2x + JPEG q92", "halved and back (blur)")
HEADLINE = "upscaled 2x + JPEG q92"
RUN = "tiny-effnet"
QUIET = dict(progress=False, log=lambda _m: None)


def joined_data(train_dir: Path, test_dir: Path, out: Path) -> Path:
    """A data folder with ``train_dir``'s train table and images and ``test_dir``'s test table and images,
    the image folders as symbolic links."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv",):
        shutil.copyfile(train_dir / name, out / name)
    for name in ("test.csv", "solution.csv"):
        shutil.copyfile(test_dir / name, out / name)
    tops = {p.split("/")[0] for p in pd.read_csv(train_dir / "train.csv")["file_name"]}
    tops |= {p.split("/")[0] for p in pd.read_csv(test_dir / "test.csv")["id"]}
    for top in tops:
        link, src = out / top, (test_dir / top if (test_dir / top).exists() else train_dir / top)
        if not link.exists():
            link.symlink_to(src.resolve(), target_is_directory=True)
    return out


def one_run_project(base: Path, out: Path) -> Path:
    """A work dir holding only run ``RUN`` of ``base`` (linked), so it can be blended and submitted alone."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "oof").mkdir(exist_ok=True)
    if not (out / "runs" / RUN).exists():
        (out / "runs" / RUN).symlink_to((base / "runs" / RUN).resolve(), target_is_directory=True)
    shutil.copyfile(base / "oof" / f"{RUN}.csv", out / "oof" / f"{RUN}.csv")
    shutil.copytree(base / "folds", out / "folds", dirs_exist_ok=True)
    return out


def score(work: Path, data: Path, tag: str) -> dict[str, float]:
    """A one-run blend of ``work`` submitted on ``data``: F1 at the shipped threshold, best F1, AUC."""
    if not (work / "runs" / "blend" / "blend.json").is_file():
        run_blend(work, trials=20, seed=42)
    out = work / "subs" / f"{tag}.csv"
    out.parent.mkdir(exist_ok=True)
    r = submit(work, data=data, out=out, proba=True, **QUIET)
    p = pd.read_csv(r.proba, dtype={"id": str}).merge(
        pd.read_csv(data / "solution.csv", dtype={"id": str}), on="id"
    )
    sub = pd.read_csv(out, dtype={"id": str}).merge(p[["id", "label"]], on="id", suffixes=("_pred", ""))
    y, s = p["label"].to_numpy(), p["prob"].to_numpy()
    return {"f1": f1(y, sub["label_pred"].to_numpy()), "best": best_threshold(y, s)[1], "auc": roc_auc(y, s),
            "mode": r.choice.resolved}  # fmt: skip


def pseudo_round(base: Path, test_data: Path, train_dir: Path, out: Path, kw: dict) -> dict:
    """The blend's test scores -> a pseudo run of ``RUN`` -> scores with and without pseudo-labels."""
    proba = base / "subs" / f"proba_{out.name}.csv"
    proba.parent.mkdir(exist_ok=True)
    submit(base, data=test_data, out=proba.with_name(f"sub_{out.name}.csv"), proba=True, **QUIET)
    shutil.copyfile(proba.with_name(f"sub_{out.name}_proba.csv"), proba)
    data = joined_data(train_dir, test_data, out / "data")
    r = pseudo_run(proba, data, test_data, out / "with", kw)
    return r | {"without": score(one_run_project(base, out / "without"), test_data, "test")}


def pseudo_run(proba: Path, data: Path, test_data: Path, work: Path, kw: dict) -> dict:
    """Run ``RUN`` trained with pseudo-labels from ``proba``, scored on ``test_data``: its scores, the rows
    used (and the share of them that is right), and the minutes its training took."""
    t0 = time.perf_counter()
    cfg = resolve_config("tiny", name=RUN, data=str(data), pseudo=str(proba), **kw)
    run_cv(cfg, work, resume=True, **QUIET)
    minutes = (time.perf_counter() - t0) / 60
    rows = json.loads((work / "runs" / RUN / "config.json").read_text())["pseudo"]["rows"]
    sol = pd.read_csv(test_data / "solution.csv", dtype={"id": str}).set_index("id")
    train = pd.read_csv(data / "train.csv")["label"].to_numpy()
    used = select_pseudo(pd.read_csv(work / "runs" / RUN / "pseudo.csv", dtype={"id": str}), cfg, train)
    right = float((used["label"].to_numpy() == sol.loc[used["id"], "label"].to_numpy()).mean())
    return {"with": score(work, test_data, "test"), "rows": rows, "right": right, "n_test": len(sol),
            "minutes": minutes}  # fmt: skip


def print_rows(results: dict[str, dict]) -> None:
    head = f"{'variant':<28}{'pseudo rows (AI/human, right)':>32}  {'F1 shipped':>17}  {'best F1':>17}  {'AUC':>17}"
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        a, b = r["without"], r["with"]
        rows = f"{r['rows']['ai'] + r['rows']['human']}/{r['n_test']} ({r['rows']['ai']}/{r['rows']['human']}, {r['right']:.1%})"
        cells = "  ".join(f"{a[k]:.4f} -> {b[k]:.4f}" for k in ("f1", "best", "auc"))
        print(f"{name:<28}{rows:>32}  {cells}   [{r['minutes']:.1f} min; cut {a['mode']} -> {b['mode']}]")


def smoke(args: argparse.Namespace) -> None:
    """``--smoke``: demo data for CIFAKE in a temporary folder, the headline variant, no demo part."""
    args.shift_out = Path(tempfile.mkdtemp(prefix="bench-pseudo-smoke-"))
    args.out = args.shift_out / "pseudo"
    make_demo_dataset(args.shift_out / "cifake-dev", n=40, n_test=40)
    args.variants, args.demo_n, args.min_conf, args.balance, args.second_round = (
        HEADLINE,
        0,
        0.6,
        False,
        False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--tar", type=Path, default=here.parents[1] / "shared/data/cifake-dev.tar.gz")
    ap.add_argument("--shift-out", type=Path, default=here / "out" / "shift", help="bench_shift's folder")
    ap.add_argument("--out", type=Path, default=here / "out" / "pseudo")
    ap.add_argument("--min-conf", type=float, default=0.95)
    ap.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True, help="--pseudo-balance")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated CIFAKE variants")
    ap.add_argument("--demo-n", type=int, default=2000, help="demo train images (0: skip the demo data)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--second-round", action="store_true", help="one more round on the upscaled variant")
    ap.add_argument("--smoke", action="store_true", help="tiny demo data, one variant (see above)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
    if args.threads:
        set_torch_threads(args.threads)
    shift, log = args.shift_out, []
    src = shift / "cifake-dev"
    if not (src / "solution.csv").is_file():
        if not args.tar.is_file():
            raise SystemExit(f"bench pseudo needs CIFAKE's dev set: no {args.tar}; pass --tar PATH")
        import tarfile

        shift.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.tar) as t:
            t.extractall(shift, filter="data")
    kw = dict(model="test_efficientnet", img_size=32, epochs=4, folds=5)
    base = shift / "cifake-work"
    train(src, base, [(RUN, kw), ("tiny-convnext", dict(kw, model="test_convnext"))], log)
    variants = make_variants(src, shift / "variants")
    tag = f"c{args.min_conf:g}" + ("" if args.balance else "-nobal")
    pl = dict(pseudo_min_conf=args.min_conf, pseudo_balance=args.balance)
    results = {}
    if args.demo_n:
        demo = shift / "demo"
        if not (demo / "data" / "solution.csv").is_file():
            make_demo_dataset(demo / "data", n=args.demo_n, force=True)
        dkw = dict(model="test_efficientnet", group="pairs")
        train(
            demo / "data",
            demo / "work",
            [(RUN, dkw), ("tiny-convnext", dict(dkw, model="test_convnext"))],
            log,
        )
        name = "demo (unseen generator)"
        results[name] = pseudo_round(demo / "work", demo / "data", demo / "data", args.out / tag / "demo",
                                     {**dkw, **pl})  # fmt: skip
    for name in filter(None, args.variants.split(",")):
        slug = variants[name].name
        results[name] = pseudo_round(base, variants[name], src, args.out / tag / slug, {**kw, **pl})
        print(f"done: {name}", flush=True)
    print(
        f"\n== one round of --pseudo (min conf {args.min_conf}, balance {args.balance}) on {RUN}: without -> with"
    )
    print_rows(results)
    if args.second_round and HEADLINE in results:
        out = args.out / tag / variants[HEADLINE].name
        r2 = pseudo_run(out / "with" / "subs" / "test_proba.csv", out / "data", variants[HEADLINE], out / "round2",
                        {**kw, **pl})  # fmt: skip
        print(f"second round on {HEADLINE} (pseudo-labels from the first round's run):")
        print_rows({HEADLINE: r2 | {"without": results[HEADLINE]["with"]}})
    if HEADLINE in results:
        a, b = results[HEADLINE]["without"]["f1"], results[HEADLINE]["with"]["f1"]
        print(f"bench pseudo: {b:.4f} vs {a:.4f} = {b / max(a, 1e-9):.3f}x")
    if args.smoke:
        shutil.rmtree(args.shift_out)


if __name__ == "__main__":
    main()
