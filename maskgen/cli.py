"""The ``maskgen`` command line. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import fields
from typing import Any, get_type_hints

import click

from maskgen.methods import METHODS
from maskgen.methods.drfi.scoring import ModelError
from maskgen.methods.drfi.segment import LEVEL_SETS
from maskgen.pipeline import BuildError, BuildOptions, option_flag, run_build
from maskgen.recipe import RecipeError
from maskgen.sources import SOURCES, SourceError
from maskgen.sources.sample import DEFAULT_LABELS, DEFAULT_SAMPLE_SIZE, LABELINGS, MAX_SAMPLE_SIZE
from maskio.clitypes import Finite
from maskio.errors import CheckpointError, KeyValueError, ShardError, describe_os_error, error_line, printable
from maskio.keyvalue import parse_pairs
from maskio.metadata import read_manifest
from maskio.outputs import refuse_protected

# Which source uses which option; anything else given with that source is an error.
SOURCE_OPTIONS = {
    "sample": {"sample_size", "no_photos", "sample_labels"},
    "folder": {"root", "gt", "class_folders"},
    "imagenet": {"root", "gt", "split", "val_labels", "classes"},
    "coco": {"root", "annotations", "categories"},
}
SOURCE_ONLY_OPTIONS = {
    "sample_size",
    "no_photos",
    "sample_labels",
    "root",
    "gt",
    "class_folders",
    "split",
    "val_labels",
    "classes",
    "annotations",
    "categories",
}


def _threshold(value: str) -> float | str:
    if value == "otsu":
        return value
    try:
        t = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number in [0, 1] nor 'otsu'") from None
    if not 0.0 <= t <= 1.0:
        raise click.BadParameter(f"{value} is not in [0, 1]")
    return t


def parse_params(pairs: tuple[str, ...], hint: str = "--param", typed: bool = True) -> dict[str, Any]:
    """``("k=300", "scorer=heuristic")`` -> ``{"k": 300, "scorer": "heuristic"}`` (a usage error
    on a pair without ``=``)."""
    try:
        return parse_pairs(pairs, hint, typed)
    except KeyValueError as exc:
        raise click.UsageError(str(exc)) from None


def source_options(f):
    """The options that choose and configure a source (shared by build and drfi fit)."""
    opts = [
        click.option(
            "--source", type=click.Choice(sorted(SOURCES)), default="sample", help="Where images come from."
        ),
        click.option("--root", type=str, help="Source root folder (folder, imagenet, coco)."),
        click.option("--gt", type=str, help="Ground-truth mask folder, matched by relative path/stem."),
        click.option("--annotations", type=str, help="COCO instances json (coco)."),
        click.option(
            "--categories", type=str, help="Comma-separated COCO category names or ids to keep (coco)."
        ),
        click.option(
            "--split", type=click.Choice(["train", "val"]), help="ImageNet split (imagenet). [default: train]"
        ),
        click.option(
            "--val-labels",
            type=str,
            help="Labels for a flat ImageNet val/ (LOC_val_solution.csv, devkit file).",
        ),
        click.option(
            "--classes",
            type=str,
            help="File of wnids: build only these classes (imagenet; e.g. ImageNet-100).",
        ),
        click.option("--class-folders", is_flag=True, help="First sub-folder is the class label (folder)."),
        click.option(
            "--sample-size",
            type=click.IntRange(1, MAX_SAMPLE_SIZE),  # a plan lists every scene: bounded, not lazy
            help=f"Synthetic scenes in the sample source. [default: {DEFAULT_SAMPLE_SIZE}]",
        ),
        click.option(
            "--no-photos",
            is_flag=True,
            help="Sample source: scenes only, without the 12 scikit-image photos (e.g. a held-out set).",
        ),
        click.option(
            "--sample-labels",
            type=click.Choice(sorted(LABELINGS)),
            help=f"Sample source: label scenes by the object's appearance or its shape. [default: {DEFAULT_LABELS}]",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def source_config(source: str, opts: dict[str, Any], seed: int) -> dict[str, Any]:
    """Map CLI options to the chosen source's constructor arguments."""
    given = {k for k in SOURCE_ONLY_OPTIONS if opts.get(k) not in (None, False, ())}
    extra = given - SOURCE_OPTIONS[source]
    if extra:
        flag = "--" + sorted(extra)[0].replace("_", "-")
        raise click.UsageError(f"{flag} is not used by --source {source}")
    if source != "sample" and not opts.get("root"):
        raise click.UsageError(f"--source {source} needs --root PATH")
    if source == "sample":
        size = opts.get("sample_size") or DEFAULT_SAMPLE_SIZE
        labels = opts.get("sample_labels") or DEFAULT_LABELS
        return {"sample_size": size, "seed": seed, "photos": not opts.get("no_photos"), "labels": labels}
    if source == "folder":
        return {"root": opts["root"], "gt": opts.get("gt"), "class_folders": bool(opts.get("class_folders"))}
    if source == "imagenet":
        return {"root": opts["root"], "split": opts.get("split") or "train", "gt": opts.get("gt"),
                "val_labels": opts.get("val_labels"), "classes": opts.get("classes")}  # fmt: skip
    cats = [c.strip() for c in (opts.get("categories") or "").split(",") if c.strip()]
    return {"root": opts["root"], "annotations": opts.get("annotations"), "categories": cats}


def _unprotected_out(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--out may not name a build's, run's or published dataset's own file (checked before any
    work is done; maskio.outputs)."""
    if value:
        refuse_protected(value, "--out")
    return value


def build_option(name: str) -> Any:
    """``maskgen build``'s click option for a BuildOptions setting: its flag, type, range,
    choices, default and help all come from the field's declaration (maskgen.pipeline)."""
    f = next(f for f in fields(BuildOptions) if f.name == name)
    m, hint, flag = f.metadata, get_type_hints(BuildOptions)[name], option_flag(name)
    if hint is bool:
        decls = [f"{flag}/--no-{flag[2:]}"] if f.default else [flag]
        return click.option(*decls, is_flag=True, default=f.default, help=m["help"])
    if m["choices"] is not None:
        kind: Any = click.Choice(m["choices"])
    elif hint in (int, int | None):
        low = m["ge"] if m["ge"] is not None else None if m["gt"] is None else m["gt"] + 1
        kind = click.IntRange(min=low, max=m["le"])
    else:
        raise TypeError(f"build_option: no click type for {name}: {hint}")
    return click.option(flag, type=kind, default=f.default, help=m["help"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="maskgen-sslmask")
def cli() -> None:
    """Build, check and publish foreground-mask datasets as WebDataset shards."""


@cli.command(epilog="Example: maskgen build --source sample --method center --out out/sample")
@source_options
@click.option("--method", type=click.Choice(sorted(METHODS)), required=True, help="Mask method.")
@click.option("--head", type=str,
              help="Saliency head file for --method deep (from `maskgen deep fit`; default: the shipped one).")  # fmt: skip
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Method parameter, repeatable (drfi: scorer=forest|heuristic|rbd|mr or several joined "
                   "by '+', model=default|unsupervised|FILE, levels=harl|multi|multi6|drfi15, refine=0|1, fusion=auto|uniform|learned, "
                   "sigma=, k=, min_size=; deep: refine=1, precision=auto|fp32|bf16, "
                   "gpu_share=, short_side=; gt: exact=true, quality=Q in (0, 1], seed=).")  # fmt: skip
@click.option(
    "--threshold", default="0.5", callback=lambda c, p, v: _threshold(v), help="Number in [0,1] or 'otsu'."
)
@build_option("fallback")
@build_option("save_saliency")
@click.option("--out", required=True, type=str, help="Output folder.")
@build_option("shard_size")
@build_option("workers")
@click.option(
    "--ray-address", type=str, help="Run on an existing Ray cluster (ADDR:PORT); OUT must be shared storage."
)
@build_option("executor")
@build_option("limit")
@build_option("overwrite")
@build_option("dry_run")
@build_option("image_format")
@build_option("seed")
@build_option("max_pixels")
@build_option("progress")
def build(**kw: Any) -> None:
    """Generate masks for every image of a source and write WebDataset shards plus a report."""
    opts = BuildOptions.from_cli(
        kw,
        source_config=source_config(kw["source"], kw, kw["seed"]),
        method_params={**parse_params(kw["params"]), **({"head": kw["head"]} if kw["head"] else {})},
    )
    run_build(opts)


@cli.command("eval")
@click.argument("out", type=str)
@click.option("--gt", type=str, help="Ground-truth folder (default: the build's own source).")
@click.option("--boxes", type=click.Path(exists=True, dir_okay=False),
              help="Score the masks against object boxes instead (CSV: path,x0,y0,x1,y1 in image pixels, "
                   "e.g. imagenette-224/boxes.csv): box precision, recall and IoU; writes nothing.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="With --boxes: print the scores as JSON.")
def eval_cmd(out: str, gt: str | None, boxes: str | None, as_json: bool) -> None:
    """Recompute report.json and report.html of a finished build from its shards; or score a
    published dataset (hf://datasets/OWNER/NAME, or its snapshot folder) against --gt; or score
    any of them against --boxes."""
    from pathlib import Path

    from maskgen.evaluate import evaluate_build, evaluate_shards
    from maskio.hub import is_hub_spec, snapshot_tars

    if boxes:
        if gt:
            raise click.UsageError("--boxes and --gt score against different truths: give one")
        _eval_boxes(out, boxes, as_json)
        return
    if is_hub_spec(out) or snapshot_tars(Path(out)):
        if not gt:
            raise click.UsageError(
                "a published dataset names no source to find ground truth in: give --gt DIR"
            )
        report = evaluate_shards([out], gt)
    else:
        report = evaluate_build(out, gt)
    fields = ("n_images", "n_with_gt", "miou", "mae", "max_fbeta", "s_measure", "e_measure")
    click.echo(" ".join(f"{k}={report[k]:.4f}" if isinstance(report[k], float) else f"{k}={report[k]}"
                        for k in fields))  # fmt: skip


def _eval_boxes(out: str, boxes: str, as_json: bool) -> None:
    from pathlib import Path

    from maskgen.boxscore import read_box_csv, score_against_boxes
    from maskio.records import resolve_shards

    scores = score_against_boxes([Path(p) for p in resolve_shards([out])], read_box_csv(boxes))
    if as_json:
        click.echo(json.dumps(scores))
        return
    click.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items()))


@cli.group()
def drfi() -> None:
    """DRFI tools: fit the region regressor."""


@drfi.command("fit", epilog="Example: maskgen drfi fit --source folder --root photos/ --out drfi.npz")
@source_options
@click.option("--out", required=True, type=str, callback=_unprotected_out, help="Model file to write (.npz).")
@click.option("--labels", type=click.Choice(["auto", "pseudo", "gt"]), default="auto",
              help="Region labels: boundary-prior pseudo labels or ground truth (auto: gt when --gt is given).")  # fmt: skip
@click.option("--levels", type=click.Choice(list(LEVEL_SETS)), default="multi",
              help="Segmentation levels the training regions come from.")  # fmt: skip
@click.option("--fusion", type=click.Choice(["uniform", "learned"]), default="uniform",
              help="learned (with --labels gt): also fit the levels' fusion weights for refine=1 "
                   "(cross-fitted on two halves of the photos) and store them in the model.")  # fmt: skip
@click.option(
    "--rounds",
    type=click.IntRange(min=0),
    default=1,
    help="Self-training rounds after the first fit (pseudo labels).",
)
@click.option("--round-labels", type=click.Choice(["boundary", "masks"]), default="boundary",
              help="How self-training rounds re-label: the boundary rule on the forest's scores, or the "
                   "method's own refined masks (scorer=forest+heuristic refine=1) with DRFI's purity rule.")  # fmt: skip
@click.option("--features", type=click.Choice(["drfi", "drfi+cues"]), default="drfi+cues",
              help="Region descriptor: DRFI's 93 dimensions, or those plus 6 background cues "
                   "(boundary connectivity, manifold ranking).")  # fmt: skip
@click.option("--info", "info", multiple=True, metavar="KEY=VALUE",
              help="Provenance stored in the model's metadata (e.g. data=..., licence=...).")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N images.")
@click.option("--trees", type=click.IntRange(min=1), default=200, help="Trees in the forest.")
@click.option("--min-leaf", type=click.IntRange(min=1), default=5,
              help="Fewest training regions in a leaf: larger makes a smaller, faster forest.")  # fmt: skip
@click.option("--jobs", type=int, default=1,
              help="Threads that build the trees (-1: all cores); the forest is the same for any count.")  # fmt: skip
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
def drfi_fit(**kw: Any) -> None:
    """Fit DRFI's random-forest region regressor and save it (plain arrays, no pickle)."""
    from maskgen.methods.drfi.fit import FitRecipe, fit_drfi
    from maskgen.sources import make_source

    labels = kw["labels"] if kw["labels"] != "auto" else ("gt" if kw["gt"] else "pseudo")
    source = make_source(kw["source"], source_config(kw["source"], kw, kw["seed"]))
    provenance = parse_params(kw["info"], "--info")
    try:
        recipe = FitRecipe(labels=labels, levels=kw["levels"], features=kw["features"], rounds=kw["rounds"],
                           round_labels=kw["round_labels"], fusion=kw["fusion"], limit=kw["limit"],
                           seed=kw["seed"])  # fmt: skip
        forest = fit_drfi(source, kw["source"], recipe, jobs=kw["jobs"], n_estimators=kw["trees"],
                          min_samples_leaf=kw["min_leaf"])  # fmt: skip
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    forest.info.update(provenance)
    forest.save(kw["out"])
    info = forest.info
    click.echo(f"maskgen: wrote {kw['out']}: {forest.roots.size} trees, {forest.left.size} nodes, "
               f"{info['n_train_regions']} training regions from {info['images']} images ({labels} labels)",
               err=True)  # fmt: skip


@cli.group()
def deep() -> None:
    """Deep saliency head: train it on the masks of an earlier build."""


@deep.command(
    "fit",
    epilog="Example: maskgen deep fit --shards out/in1k-drfi --backbone runs/harl --out head.safetensors",
)
@click.option(
    "--shards",
    "shards",
    required=True,
    multiple=True,
    help="A build (or shards) whose masks are the teacher.",
)
@click.option(
    "--backbone", required=True, help="sslmask run, checkpoint/state_dict file, or 'random' (with --arch)."
)
@click.option(
    "--arch", help="Backbone architecture when the checkpoint does not say (resnet18, resnet50, ...)."
)
@click.option(
    "--out-stride", type=click.Choice(["32", "16"]), default="32", help="16 dilates the last stage."
)
@click.option("--out", required=True, type=str, callback=_unprotected_out,
              help="Head file to write (.safetensors).")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option(
    "--short-side",
    type=click.IntRange(min=16),
    default=224,
    help="Training crop size and inference short side.",
)
@click.option("--lr", type=Finite(min=0, min_open=True), default=1e-3)
@click.option(
    "--finetune",
    type=click.Choice(["none", "layer4", "layer3", "all"]),
    default="none",
    help="Backbone stages that train too: layer4, layer3 (+layer4), or all (with BatchNorm statistics).",
)
@click.option(
    "--decoder",
    type=click.Choice(["linear", "aspp"]),
    default="linear",
    help="linear: HARL's 1x1 conv; aspp: a small DeepLabv3-style ASPP decoder.",
)
@click.option("--gt", type=str, help="Ground-truth masks for validation (default: the build's own source's).")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Image folder masks-only --shards were built from (json.path is relative to it).")  # fmt: skip
@click.option(
    "--rounds",
    type=click.IntRange(min=0),
    default=0,
    help="Self-training rounds: re-label the training images with the student, train again.",
)
@click.option(
    "--iou-weight",
    type=Finite(min=0),
    default=0.0,
    help="Add this times a soft-IoU loss (BASNet's) to the class-balanced BCE; 0: BCE alone (HARL's).",
)
@click.option("--info", "info", multiple=True, metavar="KEY=VALUE",
              help="Provenance stored in the head's metadata (e.g. teacher=..., data=...).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=0), default=2, help="DataLoader workers.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
def deep_fit(**kw: Any) -> None:
    """Train the 1x1-conv saliency head (frozen backbone by default) with class-balanced BCE."""
    from maskgen.methods.deep.fit import FitConfig, describe, fit_head

    info = tuple(parse_params(kw.pop("info"), "--info").items())
    cfg = FitConfig(
        **{**kw, "shards": tuple(kw["shards"]), "out_stride": int(kw["out_stride"]), "info": info}
    )
    try:
        result = fit_head(cfg, echo=lambda m: click.echo(m, err=True))
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    click.echo(f"maskgen: wrote {kw['out']} ({describe(result)})", err=True)


@cli.command("pipeline", epilog="Example: maskgen pipeline pipelines/demo.yaml --var out=/tmp/out")
@click.argument("recipe", type=str)
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="Override a recipe variable.")
@click.option("--force", multiple=True, metavar="STAGE", help="Run this stage even if it is complete.")
@click.option("--dry-run", is_flag=True, help="Say which stages would run; run nothing.")
def pipeline_cmd(recipe: str, variables: tuple[str, ...], force: tuple[str, ...], dry_run: bool) -> None:
    """Run a YAML recipe of maskgen/sslmask stages, skipping the complete ones.

    A recipe runs whatever commands it lists, like a Makefile (maskgen, sslmask and torchrun
    under this Python, anything else as written): run only recipes you trust."""
    from maskgen.recipe import load_recipe, run_recipe

    overrides = parse_params(variables, "--var", typed=False)
    loaded = load_recipe(recipe, overrides)
    ran = run_recipe(loaded, force, dry_run, echo=lambda m: click.echo(m, err=True))
    verb = "would run" if dry_run else "ran"
    click.echo(f"pipeline {loaded.name}: {verb} {len(ran)} of {len(loaded.stages)} stages; record {loaded.record}",
               err=True)  # fmt: skip


@cli.command(
    "publish", epilog="Example: maskgen publish out/in1k --repo me/in1k-drfi-masks --masks-only --dry-run"
)
@click.argument("out", type=str)
@click.option("--repo", required=True, help="Hub dataset repo, ORG/NAME.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--masks-only", is_flag=True, help="Publish masks and metadata without image bytes.")
@click.option("--revision", help="Branch to commit to (created if missing).")
@click.option("--license", "license_id", help="Card licence id (default: from the source; ImageNet: other).")
@click.option("--dry-run", is_flag=True, help="Stage and validate the exact folder; upload nothing.")
@click.option("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
@click.option(
    "--files-per-commit",
    type=click.IntRange(min=1),
    default=50,
    help="Files per commit (resume granularity).",
)
def publish_cmd(
    out, repo, private, masks_only, revision, license_id, dry_run, endpoint, files_per_commit
) -> None:
    """Publish a finished build to the Hugging Face Hub with a generated dataset card."""
    import json

    from maskgen.publish.stage import stage
    from maskgen.publish.upload import upload
    from maskgen.publish.validate import validate_card, validate_shards

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        raise click.UsageError(f"--repo {repo!r}: expected ORG/NAME")
    staged = stage(out, repo, masks_only, license_id)
    click.echo(
        f"maskgen: staged {len(staged.files)} files ({staged.n_shards} shards) in {staged.folder}", err=True
    )
    if dry_run:
        meta = validate_card(staged.folder / "README.md")
        manifest = read_manifest(staged.folder / "maskgen.json")
        loaded = validate_shards(staged.folder, manifest, masks_only)
        click.echo(json.dumps({"staged": str(staged.folder), "files": staged.files, "card": meta, "loader": loaded},
                              indent=2))  # fmt: skip
        return
    result = upload(
        staged, repo, private, revision, endpoint, files_per_commit, echo=lambda m: click.echo(m, err=True)
    )
    click.echo(f"maskgen: published {result.files} files in {result.commits} commits: {result.url}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every expected failure into one line."""
    prog = "maskgen"
    from maskgen import pipeline

    pipeline.INVOCATION[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=argv, prog_name=prog, standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return 130
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else prog
        click.echo(f"{where}: error: {printable(exc.format_message())}", err=True)
        return exc.exit_code
    except (
        BuildError,
        SourceError,
        ModelError,
        RecipeError,
        ShardError,
        CheckpointError,
        MemoryError,
    ) as exc:
        click.echo(f"{prog}: error: {error_line(exc)}", err=True)
        return 1
    except OSError as exc:  # a full disk, an unwritable --out, a vanished file
        click.echo(f"{prog}: error: {printable(describe_os_error(exc))}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo(
            f"{prog}: interrupted; completed shards are kept, run the same command to resume", err=True
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
