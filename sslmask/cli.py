"""The ``sslmask`` command line. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from maskio.atomic import atomic_open
from maskio.clitypes import Finite
from maskio.errors import ShardError, describe_os_error, error_line, printable
from maskio.outputs import refuse_protected
from maskio.records import resolve_shards
from sslmask.checkpoint import CheckpointError
from sslmask.config import MAX_IMAGE_SIZE, ConfigError, available_methods, load_settings
from sslmask.data import dumps, summarize
from sslmask.eval.features import FEATURE_KINDS


def _unprotected_out(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--out may not name a build's, run's or published dataset's own file (checked before any
    work is done; maskio.outputs)."""
    if value:
        refuse_protected(value, "--out")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskgen-sslmask")
def cli() -> None:
    """Mask-aware self-supervised training from maskgen shards."""


@cli.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Image folder masks-only SHARDS were built from: check that every sample's image is there.")  # fmt: skip
def inspect(shards: tuple[str, ...], images: str | None) -> None:
    """Check that SHARDS can be trained on and print what they hold (JSON).

    SHARDS are maskgen build folders, shard files, globs or brace patterns.
    """
    from maskio.hub import download_snapshot, is_hub_spec

    # an hf:// dataset is fetched (or found in the cache) once; everything below reads the folder
    local = {spec: str(download_snapshot(spec)) if is_hub_spec(spec) else spec for spec in shards}
    urls = resolve_shards(list(local.values()))
    summary = summarize(urls)
    published = _published(local)
    if published:
        summary["published"] = published
    if images is not None:
        from maskio.records import index_shards

        records = index_shards(urls, require_masks=False, images=images)
        joined = 0 if records.image_root is None else int((records.image[:, 1] == -1).sum())
        summary.update(images=True, image_root=records.image_root, images_joined=joined)
    click.echo(dumps(summary))


def _published(local: dict[str, str]) -> list[dict]:
    """What each published dataset among the specs says it is (its snapshot folder's
    maskgen.json: method, parameters, source, classes); ``local``: spec -> local path."""
    from maskio.hub import published_manifest, snapshot_tars

    out = []
    for spec, path in local.items():
        if snapshot_tars(Path(path)):
            manifest = published_manifest(Path(path)) or {}
            out.append({"dataset": spec, **{k: manifest.get(k) for k in ("source", "method", "method_params")},
                        "classes": len(manifest.get("class_names") or [])})  # fmt: skip
    return out


@cli.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("--method", required=True, help=f"Training method: {', '.join(available_methods())}.")
@click.option("--out", "run", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--config", "config_file", help="YAML overlay of config keys, or a packaged one (cpu-demo).")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one key, e.g. optim.lr=0.3."
)
@click.option(
    "--resume",
    type=click.Choice(["auto", "never"]),
    default="never",
    show_default=True,
    help="auto: continue from RUN/checkpoint.pt when it exists.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    help="Run seed (data order, augmentations, initialisation); = --set train.seed=N.",
)
@click.option(
    "--deterministic", is_flag=True, help="Deterministic kernels; = --set train.deterministic=true."
)
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Image folder masks-only SHARDS were built from; = --set data.images=DIR.")  # fmt: skip
def train(
    shards, method, run, config_file, overrides, resume, seed, deterministic, print_config, images
) -> None:
    """Pretrain a backbone on SHARDS (maskgen builds, tars, globs, brace patterns).

    Multi-process: torchrun --nproc_per_node N -m sslmask.cli train ...
    """
    from sslmask.engine import train as run_training

    extra = ([f"train.seed={seed}"] if seed is not None else []) + (
        ["train.deterministic=true"] if deterministic else []
    )
    settings = load_settings(method, config_file, [*overrides, *extra])
    if images is not None:  # a path, whatever it looks like (--set would type "2024" as a number)
        settings = settings.replace("data", images=str(Path(images).resolve()))
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(settings.to_config(), sort_keys=False), nl=False)
        return
    ckpt = run_training(list(shards), settings, run, resume=resume == "auto")
    click.echo(f"sslmask: trained {method} -> {ckpt}", err=True)


def _scored_backbone(checkpoint: str, arch: str | None, branch: str):
    """``(backbone, scored branch)`` for an evaluation that loads it itself. ``random`` is drawn
    from seed 0, as `eval knn|linear|retrieval` draw it, so every evaluation of the random
    baseline scores the same network (unseeded, occlusion's clean probe and the linear probe
    disagreed)."""
    import torch

    from sslmask.checkpoint import load_backbone_branch

    torch.manual_seed(0)
    return load_backbone_branch(checkpoint, arch, branch=branch)


def _features(checkpoint: str, arch: str | None, branch: str, train_spec, val_spec, image_size: int,
              batch_size: int, workers: int):  # fmt: skip
    """``((train_feats, train_labels, val_feats, val_labels), scored branch)``."""
    from sslmask.eval.features import labelled_features

    return labelled_features(
        checkpoint, arch, train_spec, val_spec, image_size, batch_size, workers, branch=branch
    )


def _report(kind: str, checkpoint: str, branch: str | None, ytr, yva, out_file: str | None, **fields) -> None:
    _emit({"eval": kind, "checkpoint": checkpoint, "branch": branch, "train": len(ytr), "val": len(yva),
           **fields}, out_file)  # fmt: skip


BRANCH_HELP = ("Which trunk of a run: auto (the method's protocol: DINO/SCFS the teacher, others the online "
               "network), online (student, query) or momentum (teacher, key, target).")  # fmt: skip


def _apply(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn


def _backbone_options(fn):
    """--checkpoint and --arch: which frozen backbone an evaluation reads."""
    return _apply(fn, [
        click.option("--checkpoint", required=True, help="Run folder, checkpoint or state_dict file, or 'random'."),
        click.option("--arch", help="Backbone of a bare state_dict or of 'random' (else read or inferred)."),
        click.option("--branch", default="auto", show_default=True, help=BRANCH_HELP),
    ])  # fmt: skip


def _loader_options(fn):
    """Image size, batch, workers and the JSON output every evaluation shares."""
    return _apply(fn, [
        click.option("--image-size", type=click.IntRange(16, MAX_IMAGE_SIZE), default=224, show_default=True,
                     help="Centre-crop size (localisation: the resize side)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True),
        click.option("--out", "out_file", type=click.Path(dir_okay=False), callback=_unprotected_out,
                     help="Write the result JSON here too."),  # fmt: skip
    ])  # fmt: skip


IMAGES_HELP = "Image folder the masks-only shards of {} were built from (json.path is relative to it)."


def _image_option(split: str):
    """``--images`` (for --train or --data) or ``--val-images`` (for --val): where the images of
    masks-only shards are (a published masks-only dataset plus your own copy of its images)."""
    flag = "--val-images" if split == "val" else "--images"
    return click.option(flag, flag[2:].replace("-", "_"), type=click.Path(exists=True, file_okay=False),
                        help=IMAGES_HELP.format(f"--{split}"))  # fmt: skip


def _eval_options(fn):
    """A backbone, a labelled training split, a labelled validation split, the loader options."""
    return _apply(fn, [
        _backbone_options,
        click.option("--train", "train_spec", required=True, multiple=True, help="Labelled shards or class folders."),
        click.option("--val", "val_spec", required=True, multiple=True, help="Labelled shards or class folders."),
        _image_option("train"),
        _image_option("val"),
        _loader_options,
    ])  # fmt: skip


def _reads_builds(fn):
    """Hold the builds an evaluation reads (``--train``, ``--val``, ``--data``) against a
    rebuild for as long as it runs; refused in one line while a build is writing one. Each
    split reaches the command as a ``DataSpec`` carrying its ``--images`` folder."""
    import functools

    from maskio.buildlock import reading_builds
    from maskio.records import DataSpec

    @functools.wraps(fn)
    def wrapper(**kwargs):
        images, val_images = kwargs.pop("images", None), kwargs.pop("val_images", None)
        for name, root in (("train_spec", images), ("data_spec", images), ("val_spec", val_images)):
            if name in kwargs:
                kwargs[name] = DataSpec(tuple(kwargs[name]), root)
        specs = [*kwargs.get("train_spec", ()), *kwargs.get("val_spec", ()), *kwargs.get("data_spec", ())]
        with reading_builds(specs):
            return fn(**kwargs)

    return wrapper


def _emit(result: dict, out_file: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out_file, "w") as fh:  # a full disk: one line naming the file, no temp left
            fh.write(text + "\n")
    click.echo(text)


@cli.group(name="eval")
def eval_group() -> None:
    """Evaluate a frozen backbone (k-NN, linear probe, retrieval, occlusion, localisation)."""


@eval_group.command()
@_reads_builds
@_eval_options
@click.option("--k", "ks", multiple=True, type=click.IntRange(min=1), default=(10, 20, 30), show_default=True)
@click.option("--temperature", type=Finite(min=0, min_open=True), default=0.07, show_default=True)
def knn(
    checkpoint, arch, branch, train_spec, val_spec, image_size, batch_size, workers, out_file, ks, temperature
) -> None:
    """Weighted k-NN accuracy (DINO protocol: cosine, exp(sim/T) votes)."""
    from sslmask.eval.knn import knn_eval

    (ftr, ytr, fva, yva), scored = _features(
        checkpoint, arch, branch, train_spec, val_spec, image_size, batch_size, workers
    )
    if max(ks) > len(ytr):  # every sample votes: said, and recorded as k_used in the result
        click.echo(f"note: --k {max(ks)} is more than the {len(ytr)} samples of --train; those k use all "
                   f"{len(ytr)} (k_used in the result)", err=True)  # fmt: skip
    result = knn_eval(ftr, ytr, fva, yva, tuple(ks), temperature)
    _report("knn", checkpoint, scored, ytr, yva, out_file, temperature=temperature, accuracy=result)


@eval_group.command()
@_reads_builds
@_eval_options
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--lr", type=Finite(min=0, min_open=True), default=0.1, show_default=True)
def linear(
    checkpoint, arch, branch, train_spec, val_spec, image_size, batch_size, workers, out_file, epochs, lr
) -> None:
    """Linear probe on frozen, centre-crop features (top-1/top-5 at the last epoch)."""
    from sslmask.eval.linear import linear_probe

    (ftr, ytr, fva, yva), scored = _features(
        checkpoint, arch, branch, train_spec, val_spec, image_size, batch_size, workers
    )
    result = linear_probe(ftr, ytr, fva, yva, epochs=epochs, lr=lr)
    _report("linear", checkpoint, scored, ytr, yva, out_file, epochs=epochs, accuracy=result)


@eval_group.command()
@_reads_builds
@_backbone_options
@click.option(
    "--data", "data_spec", required=True, multiple=True, help="One labelled split: shards or class folders."
)
@_image_option("data")
@click.option("--features", "kind", type=click.Choice(FEATURE_KINDS), default="backbone", show_default=True,
              help="Pooled backbone feature (CLS/GAP), grid mean, or a run's predictor output.")  # fmt: skip
@_loader_options
def retrieval(checkpoint, arch, branch, data_spec, kind, image_size, batch_size, workers, out_file) -> None:
    """Leave-one-out retrieval on one split: Rank-1, Rank-5 and mAP (LoDisc's protocol)."""
    from sslmask.eval.features import split_features
    from sslmask.eval.retrieval import retrieval_metrics

    feats, labels, scored = split_features(
        checkpoint, arch, data_spec, image_size, kind, batch_size, workers, branch
    )
    result = {"eval": "retrieval", "checkpoint": checkpoint, "branch": scored, "features": kind,
              "images": len(labels)}  # fmt: skip
    metrics = retrieval_metrics(feats, labels)
    if metrics["queries"] == 0:  # every class has one image: nothing to retrieve, not a score of 0
        raise ShardError(f"{data_spec[0]}: no image has another of its class; retrieval needs two per class")
    _emit({**result, **metrics}, out_file)


@eval_group.command()
@_reads_builds
@_eval_options
@click.option(
    "--ratios",
    type=Finite(0, 1),
    multiple=True,
    default=(0.25, 0.5, 0.75),
    show_default=True,
    help="Random occlusion: fractions of the grid's cells hidden.",
)
@click.option(
    "--thetas",
    type=Finite(0, 1),
    multiple=True,
    default=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    show_default=True,
    help="Attention occlusion: hide the heatmap above each threshold.",
)
@click.option(
    "--grid", type=click.IntRange(1, 256), default=7, show_default=True, help="Random occlusion grid side."
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Seed of the random occlusions.",
)
@click.option("--probe", "probe_schedule", type=click.Choice(["segas", "cosine"]), default="segas", show_default=True,
              help="The clean probe: SegAS's (60 epochs, lr 5.0, /10 at 30, 40, 50, raw features) or "
                   "`eval linear`'s (100 epochs, cosine from 0.1, standardised features).")  # fmt: skip
def occlusion(checkpoint, arch, branch, train_spec, val_spec, image_size, batch_size, workers, out_file, ratios,
              thetas, grid, seed, probe_schedule) -> None:  # fmt: skip
    """Top-1 of a linear head trained on clean images, under random, attention and (when VAL has
    maskgen masks) foreground / background occlusion (SegAS's protocol)."""
    import torch

    from sslmask.eval.features import labelled_splits
    from sslmask.eval.occlusion import conditions, occlusion_eval

    if grid > image_size:
        raise click.UsageError(
            f"--grid {grid}: more cells than the {image_size} px image has pixels per side"
        )
    train, val = labelled_splits(train_spec, val_spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, scored = _scored_backbone(checkpoint, arch, branch)
    backbone = backbone.to(device)
    plan = conditions(backbone, ratios, thetas, grid, seed, saliency=val.mask is not None)
    loader = {"batch_size": batch_size, "workers": workers, "device": device}
    result = occlusion_eval(backbone, train, val, image_size, plan, loader, probe_schedule)
    if val.mask is None:
        result["saliency"] = f"skipped: {val_spec[0]} has no masks"
    _report(
        "occlusion",
        checkpoint,
        scored,
        train.labels,
        val.labels,
        out_file,
        grid=grid,
        seed=seed,
        probe=probe_schedule,
        top1=result,
    )


@eval_group.command()
@_reads_builds
@_backbone_options
@click.option(
    "--train", "train_spec", multiple=True, help="Labelled shards or class folders for the probe (CAM)."
)
@click.option(
    "--val", "val_spec", required=True, multiple=True, help="Shards or class folders to localise in."
)
@_image_option("train")
@_image_option("val")
@click.option(
    "--boxes", help="CUB root or bounding_boxes.txt, ImageNet val XML folder, or LOC_val_solution.csv."
)
@click.option("--gt-masks", type=click.Path(exists=True, file_okay=False), help="Ground-truth mask folder.")
@click.option("--agnostic", is_flag=True, help="Class-agnostic heatmap (channel mean); no probe, no labels.")
@click.option("--threshold", type=Finite(0, 1), default=0.2, show_default=True, help="Of the max.")
@click.option("--iou", "iou_min", type=Finite(0, 1), default=0.5, show_default=True)
@_loader_options
def localization(checkpoint, arch, branch, train_spec, val_spec, boxes, gt_masks, agnostic, threshold, iou_min,
                 image_size, batch_size, workers, out_file) -> None:  # fmt: skip
    """GT-known and Top-1 localisation from CAMs of a linear probe, or class-agnostic
    localisation (--agnostic), against boxes or ground-truth masks (SegAS's protocol)."""
    import torch

    from maskio.records import align_labels, index_any
    from sslmask.eval.linear import fit_linear
    from sslmask.eval.localization import (
        localization_eval,
        match_boxes,
        read_boxes,
        record_keys,
        resized_features,
    )

    if bool(boxes) == bool(gt_masks):
        raise click.UsageError("give exactly one of --boxes and --gt-masks")
    if not agnostic and not train_spec:
        raise click.UsageError("--train is needed for class activation maps (or use --agnostic)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, scored = _scored_backbone(checkpoint, arch, branch)
    backbone = backbone.to(device)
    val = index_any(val_spec)
    matched = match_boxes(record_keys(val), read_boxes(boxes, gt_masks))
    if not any(matched):
        raise ShardError(f"{val_spec[0]}: no sample matches a box of {boxes or gt_masks}")
    probe = None
    if not agnostic:
        train = index_any(train_spec)
        for spec, records in ((train_spec, train), (val_spec, val)):
            if not records.labelled:
                raise ShardError(f"{spec[0]}: some samples have no class label; use --agnostic")
        val = align_labels(train, val, str(val_spec[0]))
        ftr, ytr = resized_features(backbone, train, image_size, batch_size, workers, device)
        probe = fit_linear(ftr, ytr, torch.unique(torch.cat([ytr, torch.as_tensor(val.labels)])))
    options = {"image_size": image_size, "threshold": threshold, "iou": iou_min, "batch_size": batch_size,
               "workers": workers, "device": device}  # fmt: skip
    result = localization_eval(backbone, val, matched, probe, options)
    _emit({"eval": "localization", "checkpoint": checkpoint, "branch": scored,
           "mode": "agnostic" if agnostic else "cam", "threshold": threshold,
           "preprocessing": f"resize to {image_size} x {image_size}, no crop (probe and test)", **result},
          out_file)  # fmt: skip


@cli.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Backbone .pt file.")
@click.option("--branch", default="auto", show_default=True, help=BRANCH_HELP)
def export(run, out_file, branch) -> None:
    """Write RUN's backbone as a bare torchvision-named state_dict."""
    from sslmask.export import export_backbone

    info = export_backbone(run, out_file, branch)
    click.echo(
        f"sslmask: wrote {out_file} ({info['branch']} branch, {info['tensors']} tensors, "
        f"{info['parameters']} parameters, step {info['step']})",
        err=True,
    )


def main(argv: list[str] | None = None) -> int:
    from sslmask.engine import TrainingError

    try:
        cli.main(args=argv, prog_name="sslmask", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("sslmask: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        click.echo(
            f"{ctx.command_path if ctx else 'sslmask'}: error: {printable(exc.format_message())}", err=True
        )
        return exc.exit_code
    except (ShardError, ConfigError, CheckpointError, TrainingError, MemoryError) as exc:
        click.echo(f"sslmask: error: {error_line(exc)}", err=True)
        return 1
    except OSError as exc:  # a full disk, an unwritable --out, a vanished file
        click.echo(f"sslmask: error: {printable(describe_os_error(exc))}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
