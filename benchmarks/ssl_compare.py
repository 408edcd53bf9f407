"""Every method vs a random-initialised backbone at equal budget: k-NN and linear accuracy.

    python benchmarks/ssl_compare.py --train out/demo --val out/demo-val --seeds 0 1 2 \\
        [--config cpu-demo] [--set train.epochs=20 ...] [--image-size 96] [--out runs/compare] \\
        [--methods dino scfs scfs-a=scfs:scfs.mask_mode=key ...]

Trains each method once per seed with the same config (only `method` differs; a --set for
a section a method lacks, e.g. dino.out_dim for BYOL, is left out for it). A variant is
``LABEL=METHOD:KEY=VALUE:...``, the method with those sets on top. It evaluates the
backbone each method's reference evaluates (``--branches auto``: DINO's and SCFS's teacher,
the online network otherwise; ``--branches online momentum`` scores both trunks as two rows,
``LABEL@online`` and ``LABEL@momentum``) with `sslmask eval`'s k-NN (k = 20, T = 0.07) and
linear probe on the held-out set, and `sslmask eval retrieval`'s leave-one-out Rank-1/5 and mAP within the held-out set
(backbone features; LoDisc's rows retrieve with its normalised predictor output, as its own
``validate`` does, with the backbone CLS figures beside them as ``rank1_cls`` ...), and prints
per-seed numbers and medians. --val may be a class-folder tree (Imagenette, Caltech-101).
SegAS's evaluations on request: ``--occlusion`` fits SegAS's own probe (60 epochs, lr 5.0) and
adds its clean top-1 and its top-1 with half of a 7 x 7 grid hidden and with the foreground /
background of --val's masks hidden (`sslmask eval occlusion`); ``--loc-val BUILD --loc-masks
DIR`` adds class-agnostic localisation against ground-truth masks (`sslmask eval localization
--agnostic`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sslmask.config import RunSettings, default_config, load_settings
from sslmask.engine import train
from sslmask.eval.features import labelled_features, split_features
from sslmask.eval.knn import knn_eval
from sslmask.eval.linear import linear_probe
from sslmask.eval.retrieval import retrieval_metrics

COLUMNS = {"knn20": "k-NN k=20", "linear": "linear", "rank1": "Rank-1", "rank5": "Rank-5", "mAP": "mAP"}
EXTRA_COLUMNS = {
    "occ_clean": "occ clean",
    "occ_rand50": "occ rand .5",
    "occ_fg": "occ fg",
    "occ_bg": "occ bg",
    "loc": "loc",
}


def segas_evaluations(checkpoint: str, arch: str, args, seed: int, branch: str = "auto") -> dict[str, float]:
    """Occlusion (random 0.5, foreground, background) and class-agnostic localisation."""
    import torch

    from maskio.records import index_any
    from sslmask.checkpoint import load_backbone
    from sslmask.eval.features import labelled_splits
    from sslmask.eval.localization import boxes_from_masks, localization_eval, match_boxes, record_keys
    from sslmask.eval.occlusion import conditions, occlusion_eval

    torch.manual_seed(seed)
    backbone = load_backbone(checkpoint, arch, branch=branch)
    loader = {"batch_size": 128, "workers": 2, "device": "cpu"}
    out: dict[str, float] = {}
    if args.occlusion:
        bank, val = labelled_splits(args.bank or args.train, args.val)
        plan = conditions(backbone, (0.5,), (), 7, seed, saliency=val.mask is not None)
        plan.pop("attention")
        occ = occlusion_eval(backbone, bank, val, args.image_size, plan, loader)
        out["occ_clean"] = occ["clean"]  # the occlusion probe's own clean top-1 (SegAS's schedule)
        out["occ_rand50"] = occ["random"]["0.5"]
        if "saliency" in occ:
            out["occ_fg"], out["occ_bg"] = occ["saliency"]["foreground"], occ["saliency"]["background"]
    if args.loc_val:
        records = index_any(args.loc_val)
        boxes = match_boxes(record_keys(records), boxes_from_masks(Path(args.loc_masks)))
        options = {"image_size": args.image_size, "threshold": 0.2, "iou": 0.5, **loader}
        out["loc"] = localization_eval(backbone, records, boxes, None, options)["loc"]
    return out


SHARED = ("data", "model", "optim", "ema", "train", "monitor")  # sections every method has


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """``"scfs-a=scfs:scfs.mask_mode=key"`` -> ``("scfs-a", "scfs", ["scfs.mask_mode=key"])``;
    a plain ``"dino"`` is its own label with no sets."""
    label, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else (spec, "", spec)
    method, *sets = rest.split(":")
    return label, method, sets


def variant_config(spec: str, config: str | None, overrides: list[str], seed: int) -> tuple[str, RunSettings]:
    """The label and settings of one row: the overrides whose section the method has, then its own."""
    label, method, sets = parse_variant(spec)
    sections = set(default_config(method))
    mine = [o for o in overrides if o.split(".")[0] in sections]
    return label, load_settings(method, config, [*mine, *sets, f"train.seed={seed}"])


def evaluate(checkpoint: str, arch: str, train_spec, val_spec, size: int, seed: int,
             branch: str = "auto", retrieval: str = "backbone") -> dict[str, float]:  # fmt: skip
    """k-NN and linear probe on the backbone; retrieval on ``retrieval`` features (LoDisc's
    ``validate`` retrieves with its normalised predictor output, so its rows use
    ``predictor`` and give the backbone's CLS retrieval beside it as ``*_cls``)."""
    (ftr, ytr, fva, yva), _ = labelled_features(checkpoint, arch, train_spec, val_spec, size, seed=seed,
                                                branch=branch)  # fmt: skip
    knn = knn_eval(ftr, ytr, fva, yva, ks=(20,))["k=20"]["top1"]
    lin = linear_probe(ftr, ytr, fva, yva)["top1"]
    ret = retrieval_metrics(fva, yva)
    row = {"knn20": knn, "linear": lin, "rank1": ret["rank1"], "rank5": ret["rank5"], "mAP": ret["mAP"]}
    if retrieval != "backbone":
        feats, labels, _ = split_features(checkpoint, arch, val_spec, size, retrieval, branch=branch)
        own = retrieval_metrics(feats, labels)
        row.update({f"{k}_cls": row[k] for k in ("rank1", "rank5", "mAP")})
        row.update({k: own[k] for k in ("rank1", "rank5", "mAP")})
    return row


# what each method's own validation retrieves with (LoDisc: main.py validate -> inference())
RETRIEVAL_FEATURES = {"lodisc": "predictor"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="+", required=True, help="training shards (masks); also the k-NN bank")
    ap.add_argument("--bank", nargs="+", help="labelled memory bank / probe training set (default: --train)")
    ap.add_argument("--val", nargs="+", required=True)
    ap.add_argument("--config", default="cpu-demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--methods", nargs="+", default=["byol", "harl", "dino", "mocov2", "mocov3"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--occlusion", action="store_true", help="also occluded top-1 (SegAS)")
    ap.add_argument("--loc-val", nargs="+", help="a build to localise in (class-agnostic, SegAS)")
    ap.add_argument("--loc-masks", help="ground-truth masks of --loc-val")
    ap.add_argument("--branches", nargs="+", default=["auto"], choices=["auto", "online", "momentum"],
                    help="which trunk(s) of each run to score (auto: the method's protocol)")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ssl_compare_"))
    bank = args.bank or args.train
    suffix = (lambda b: "") if args.branches == ["auto"] else (lambda b: f"@{b}")
    labels = [parse_variant(m)[0] + suffix(b) for m in args.methods for b in args.branches]
    rows: dict[str, list[dict[str, float]]] = {"random": [], **{label: [] for label in labels}}
    for seed in args.seeds:
        arch = None
        for spec in args.methods:
            label, cfg = variant_config(spec, args.config, args.overrides, seed)
            arch = cfg.model.arch
            run = out / f"{label}-seed{seed}"
            t0 = time.perf_counter()
            train(args.train, cfg, run, resume=True)
            minutes = (time.perf_counter() - t0) / 60
            for branch in args.branches:
                kind = RETRIEVAL_FEATURES.get(cfg.method, "backbone")
                row = evaluate(str(run), arch, bank, args.val, args.image_size, seed, branch, kind)
                row.update(segas_evaluations(str(run), arch, args, seed, branch))
                rows[label + suffix(branch)].append(row)
                print(json.dumps({"method": label, "branch": branch, "seed": seed, **row,
                                  "train_min": round(minutes, 1)}), flush=True)  # fmt: skip
        rows["random"].append(evaluate("random", arch, bank, args.val, args.image_size, seed))
        rows["random"][-1].update(segas_evaluations("random", arch, args, seed))
        print(json.dumps({"method": "random", "seed": seed, **rows["random"][-1]}), flush=True)
    print(f"\nmedian over seeds {args.seeds} (top-1 %, held-out set)")
    columns = {**COLUMNS, **{k: v for k, v in EXTRA_COLUMNS.items() if k in rows["random"][0]}}
    print(f"{'backbone':<16}" + "".join(f"{c:>12}" for c in columns.values()))
    for name, results in rows.items():
        print(f"{name:<16}" + "".join(f"{statistics.median(r[k] for r in results):>12.1f}" for k in columns))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
