"""``maskgen build``: plan shards from a source, run them, then write the build's summary files.

Order of writes, so that a crash at any moment leaves a resumable folder:
1. ``manifest.json`` (the plan and its fingerprint) before any shard;
2. per shard, the tar under a temporary name -> fsync -> rename, then its ``.stats.json``
   the same way (the stats file is the success marker; a tar without one is redone);
3. at the end ``errors.jsonl``, ``index.json``, ``report.json``/``report.html`` and the
   final manifest, each written atomically, all derived from the stats files alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO, get_type_hints

from maskgen import __version__
from maskgen.distribute import ShardJob, run_jobs
from maskgen.groundtruth import GroundTruthLookup
from maskgen.imaging import DEFAULT_MAX_PIXELS
from maskgen.methods import METHODS, SaliencyMethod, make_method
from maskgen.postprocess import EXACT_POSTPROCESS, PostprocessConfig
from maskgen.report import aggregate, describe_runtime, gpu_fallback_shards, throughput, write_build_outputs
from maskgen.sources import ItemRef, Source, SourceError, make_source
from maskgen.worker import BuildSpec
from maskio.atomic import remove_stale_temps, write_json
from maskio.buildlock import LOCK, shared_holders
from maskio.errors import ShardError, error_line
from maskio.metadata import read_manifest, read_shard_stats
from maskio.settings import SettingError, checked, setting
from maskio.shard_format import (
    ERRORS,
    INDEX,
    MANIFEST,
    REPORT_HTML,
    REPORT_JSON,
    SHARD_FORMAT,
    SHARDS_DIR,
    shard_name,
    stats_name,
)

MANIFEST_FORMAT = "maskgen-build-v1"
OUTPUT_NAMES = (MANIFEST, INDEX, REPORT_JSON, REPORT_HTML, ERRORS)


class BuildError(Exception):
    """A problem that stops the whole build; printed as one line."""


IMAGE_FORMATS = ("keep", "jpg", "none")
# the options besides source and method that decide what a build writes: each is part of the
# plan's fingerprint, of the workers' BuildSpec and of the manifest, from this one list
OUTPUT_OPTIONS = ("image_format", "save_saliency", "max_pixels")


@dataclass
class BuildOptions:
    """One build's options (``maskgen build``'s flags, or a Python caller's), checked on creation.

    Each ``setting`` field declares its default, limits and help once: ``__post_init__`` checks
    them, and ``maskgen build`` derives its click option from them (``maskgen.cli.build_option``)."""

    source: str
    source_config: dict[str, Any]
    method: str
    out: str
    method_params: dict[str, Any] = field(default_factory=dict)
    threshold: float | str = 0.5
    fallback: str = setting("center", choices=("center", "keep"),
                            help="For empty (<1%) or full (>99%) masks: use the centre-prior mask, or keep and flag.")  # fmt: skip
    save_saliency: bool = setting(False, help="Also store the soft map as KEY.sal.png.")
    shard_size: int = setting(1000, ge=1, help="Images per shard.")
    workers: int = setting(2, ge=1, help="Local Ray workers (in-flight tasks with --ray-address).")
    ray_address: str | None = None
    executor: str = setting("ray", choices=("ray", "local"),
                            help="'local' runs shards one by one in this process (debugging).")  # fmt: skip
    limit: int | None = setting(None, ge=1, help="Use only the first N images (sorted order).")
    overwrite: bool = setting(False, help="Delete an existing build in OUT and start over.")
    dry_run: bool = setting(False, help="Print the plan and what is already done; write nothing.")
    image_format: str = setting("keep", choices=IMAGE_FORMATS,
                                help="keep: original JPEG bytes when possible; jpg: always re-encode; none: masks only.")  # fmt: skip
    seed: int = setting(0, ge=0, le=2**32 - 1, help="Seed for every random choice (sample scenes, methods).")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, ge=1, help="Decompression-bomb limit (pixels).")
    progress: bool = setting(True, help="Show a progress bar.")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BuildError(
                f"--method {self.method}: unknown method; choose from {', '.join(sorted(METHODS))}"
            )
        hints = _option_hints()
        for f in fields(self):
            if "help" in f.metadata:  # a setting: typed and range-checked as declared
                try:
                    checked(option_flag(f.name), getattr(self, f.name), hints[f.name], f.metadata)
                except SettingError as exc:
                    raise BuildError(str(exc)) from None
        if self.ray_address is not None:
            check_ray_address(self.ray_address)

    @classmethod
    def from_cli(cls, flags: dict[str, Any], **derived: Any) -> BuildOptions:
        """The options from ``maskgen build``'s flags (named as the fields), with ``derived``
        (source_config, method_params) built from the flags that are not fields."""
        names = {f.name for f in fields(cls)} - set(derived)
        return cls(**{k: v for k, v in flags.items() if k in names}, **derived)

    def output_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OUTPUT_OPTIONS}


_RAY_ADDRESS = re.compile(r"(?:ray://)?(\[[0-9a-fA-F:]+\]|[\w.-]+):(\d{1,5})")
RAY_PROBE_S = 5.0


@functools.cache
def _option_hints() -> dict[str, Any]:
    return get_type_hints(BuildOptions)


def option_flag(name: str) -> str:
    """A BuildOptions field's command-line flag: ``shard_size`` -> ``--shard-size``."""
    return "--" + name.replace("_", "-")


def check_ray_address(address: str) -> tuple[str, int] | None:
    """``--ray-address``: ``auto`` (None), or ``[ray://]HOST:PORT`` (its host and port); one
    line otherwise. Syntax only: :func:`probe_ray_address` asks the network."""
    if address == "auto":
        return None
    match = _RAY_ADDRESS.fullmatch(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise BuildError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    return match.group(1).strip("[]"), int(match.group(2))


def probe_ray_address(address: str) -> None:
    """Something answers on ``--ray-address`` within a few seconds; one line otherwise (Ray
    itself retried a dead address for minutes, printing GCS time-outs)."""
    where = check_ray_address(address)
    if where is None:
        return
    host, port = where
    try:
        socket.create_connection((host, port), timeout=RAY_PROBE_S).close()
    except OSError as exc:
        reason = (
            "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        )
        raise BuildError(f"--ray-address {address}: nothing answers there ({reason}); is the cluster "
                         "up (`ray start --head`)?") from None  # fmt: skip


@dataclass
class Plan:
    source: Source
    method: SaliencyMethod  # configured: its resources, batch size and decoding are the plan's
    items: list[ItemRef]
    jobs: list[ShardJob]
    spec: BuildSpec
    fingerprint: str


def make_plan(opts: BuildOptions) -> Plan:
    """List the source and split it into shards; nothing is written."""
    try:
        method = make_method(opts.method, opts.method_params)
        post = (
            EXACT_POSTPROCESS
            if method.exact_masks
            else PostprocessConfig(opts.threshold, fallback=opts.fallback)
        )
    except (ValueError, TypeError) as exc:
        raise BuildError(str(exc)) from None
    try:
        source = make_source(opts.source, opts.source_config)
        items = source.list_items()
    except TypeError as exc:
        raise BuildError(f"--source {opts.source}: {exc}") from None
    if opts.limit is not None:
        items = items[: opts.limit]
    if method.reads_ground_truth and items and all(it.gt is None for it in items):
        raise BuildError(
            f"--method {opts.method}: --source {opts.source} has no ground-truth masks for these "
            "images (folder and imagenet sources take them from --gt DIR)"
        )
    listing = hashlib.sha256()
    for it in items:
        listing.update(f"{it.key}\t{it.path}\t{it.label}\n".encode())
    plan_def = {
        "shard_format": SHARD_FORMAT,
        "source": opts.source,
        "source_config": source.config(),
        "method": opts.method,
        "method_params": method.params,
        "postprocess": asdict(post),
        **opts.output_options(),
        "shard_size": opts.shard_size,
        "items_sha256": listing.hexdigest(),
    }
    fingerprint = hashlib.sha256(json.dumps(plan_def, sort_keys=True).encode()).hexdigest()[:16]
    spec = BuildSpec(
        out_dir=str(Path(opts.out).resolve()),
        source=opts.source,
        source_config=source.config(),
        method=opts.method,
        method_args=METHODS[opts.method].canonical_args(opts.method_params),
        method_params=method.params,
        postprocess=post,
        **opts.output_options(),
        fingerprint=fingerprint,
    )
    jobs = [
        ShardJob(i, items[start : start + opts.shard_size])
        for i, start in enumerate(range(0, len(items), opts.shard_size))
    ]
    return Plan(source, method, items, jobs, spec, fingerprint)


def completed_shards(out: Path, fingerprint: str, n_shards: int) -> set[int]:
    """Shards whose tar and stats exist and whose stats belong to this plan."""
    done = set()
    shards_dir = out / SHARDS_DIR
    for i in range(n_shards):
        stats, tar = shards_dir / stats_name(i), shards_dir / shard_name(i)
        if stats.exists() and tar.exists():
            try:
                if read_shard_stats(stats).get("fingerprint") == fingerprint:
                    done.add(i)
            except (OSError, ShardError):  # unreadable or doctored: the shard is made again
                pass
    return done


def _prepare_out(out: Path, plan: Plan, overwrite: bool) -> None:
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory")
    if overwrite:
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
        for name in OUTPUT_NAMES:
            (out / name).unlink(missing_ok=True)
    elif manifest.exists():
        try:
            old = read_manifest(manifest)
        except (OSError, ShardError) as exc:
            raise BuildError(f"{error_line(exc)}; use --overwrite to start over") from None
        if old.get("fingerprint") != plan.fingerprint:
            raise BuildError(
                f"--out {out}: holds a build with other inputs or options; "
                "use --overwrite to replace it or choose another --out"
            )
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise BuildError(f"--out {out}: not empty and not a maskgen build; choose another folder")
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out / SHARDS_DIR)
    remove_stale_temps(out)


def _git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if res.returncode != 0:
            return None
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command as the user would retype it: ``maskgen ARGS`` whatever launched the process
    (the console script, ``python -m maskgen.cli`` from a recipe, or ``main(argv)``)."""
    return shlex.join(["maskgen", *INVOCATION]) if INVOCATION else shlex.join(sys.argv)


# set by maskgen.cli.main to the arguments it was given
INVOCATION: list[str] = []


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"maskgen": __version__, "python": sys.version.split()[0]}
    for pkg in (
        "numpy",
        "pillow",
        "opencv-contrib-python-headless",
        "scikit-image",
        "pysodmetrics",
        "webdataset",
        "ray",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _manifest(plan: Plan, opts: BuildOptions, old: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "fingerprint": plan.fingerprint,
        "source": opts.source,
        "source_config": plan.source.config(),
        "root": plan.source.root,
        "class_names": plan.source.class_names,
        "method": plan.spec.method,
        "method_params": plan.spec.method_params,
        "task_resources": asdict(plan.method.resources),
        "postprocess": asdict(plan.spec.postprocess),
        "threshold": opts.threshold,
        **opts.output_options(),
        "seed": opts.seed,
        "shard_size": opts.shard_size,
        "limit": opts.limit,
        "n_items": len(plan.items),
        "n_shards": len(plan.jobs),
        "n_samples": None,
        "n_errors": None,
        "complete": False,
        "versions": package_versions(),
        "git_commit": _git_commit(),
        "command": command_line(),
        "runs": list((old or {}).get("runs", [])),
    }


def describe_plan(plan: Plan, done: set[int], opts: BuildOptions, stream: TextIO) -> None:
    resources = plan.method.resources
    todo = len(plan.jobs) - len(done)
    print(
        f"source      {opts.source} ({plan.source.root or 'embedded'}): {len(plan.items)} images", file=stream
    )
    print(f"method      {opts.method} {json.dumps(plan.spec.method_params)} "
          f"(per task: {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU)", file=stream)  # fmt: skip
    print(
        f"shards      {len(plan.jobs)} of up to {opts.shard_size} images -> {opts.out}/{SHARDS_DIR}/",
        file=stream,
    )
    print(f"done        {len(done)} shards already complete, {todo} to build", file=stream)
    where = opts.ray_address or (
        "in-process" if opts.executor == "local" else f"local Ray, {opts.workers} workers"
    )
    print(f"executor    {where}", file=stream)


def run_build(opts: BuildOptions, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) a build; returns the report dict. Raises BuildError/SourceError.

    Progress and the summary go to ``stream`` (stderr by default); a dry run's plan is the
    command's output and goes to stdout.
    """
    stream = stream or sys.stderr
    plan = make_plan(opts)
    out = Path(opts.out)
    if opts.dry_run:
        describe_plan(plan, completed_shards(out, plan.fingerprint, len(plan.jobs)), opts, sys.stdout)
        return {}
    if opts.ray_address is not None:  # the network probe: a real build only, before anything is written
        probe_ray_address(opts.ray_address)
    with build_lock(out):
        return _run_locked(plan, opts, out, stream)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.lock`` exclusively for the whole build (``flock``: the OS releases it when the
    process dies, so a killed build never leaves it held). A second build of the same OUT stops
    with one line naming the first one's process."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BuildError(f"--out {out}: cannot create the build folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:  # readers share the lock, a build holds it alone: which one is it?
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise BuildError(f"--out {out}: another maskgen build (pid {holder}) is writing here; "
                                 "wait for it to finish, then re-run to resume") from None  # fmt: skip
            readers = ", ".join(map(str, shared_holders(out / LOCK))) or "?"
            raise BuildError(f"--out {out}: an sslmask run or evaluation (pid {readers}) is reading it; "
                             "wait for it to finish") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # read by whoever is refused the lock
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_locked(plan: Plan, opts: BuildOptions, out: Path, stream: TextIO) -> dict[str, Any]:
    """The build proper, under the OUT lock: nothing another build wrote can change under it."""
    _prepare_out(out, plan, opts.overwrite)
    done = set() if opts.overwrite else completed_shards(out, plan.fingerprint, len(plan.jobs))
    old_manifest = read_manifest(out / MANIFEST) if (out / MANIFEST).exists() else None
    manifest = _manifest(plan, opts, old_manifest)
    write_json(out / MANIFEST, manifest)

    todo = [job for job in plan.jobs if job.index not in done]
    started = time.time()
    failures: list[str] = []
    n_processed = 0
    resources = plan.method.resources
    bar = _progress(sum(len(j.items) for j in todo), opts.progress, stream)
    if todo:
        outcomes = run_jobs(
            plan.spec,
            todo,
            opts.workers,
            opts.ray_address,
            opts.executor,
            (resources.num_cpus, resources.num_gpus),
        )
        for outcome in outcomes:
            job_items = len(plan.jobs[outcome.index].items)
            if outcome.error:
                failures.append(f"shard {outcome.index}: {outcome.error}")
            else:
                n_processed += job_items
            if bar is not None:
                bar.update(job_items)
    if bar is not None:
        bar.close()
    seconds = time.time() - started
    remove_stale_temps(out / SHARDS_DIR)  # left by attempts killed mid-write (lost Ray node, ...)

    manifest["runs"].append({
        "started": started,
        "seconds": round(seconds, 3),
        "shards_built": len(todo) - len(failures),
        "images": n_processed,
        "workers": opts.workers,
        "executor": opts.executor if not opts.ray_address else f"ray:{opts.ray_address}",
        "command": command_line(),
    })  # fmt: skip
    if failures:
        write_json(out / MANIFEST, manifest)
        raise BuildError(
            f"{len(failures)} shard(s) failed ({failures[0]}); completed shards are kept, re-run to resume"
        )
    agg = aggregate(out, len(plan.jobs))
    manifest.update(n_samples=agg.n_samples, n_errors=agg.n_errors, ran_on=agg.ran_on(), complete=True)
    write_json(out / MANIFEST, manifest)
    report = write_build_outputs(
        out, manifest, agg, throughput(manifest), gt_of=GroundTruthLookup(plan.source, items=plan.items)
    )
    _summary(report, agg, out, stream)
    if report["n_images"] == 0 and report["n_errors"] > 0:  # outputs kept: report.html says why
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(agg.errors_by_reason.items()))
        raise BuildError(f"{out}: every one of the {report['n_errors']} images was skipped ({skipped}); "
                         f"the build holds no sample (report: {out / REPORT_HTML})")  # fmt: skip
    return report


def _progress(total: int, enabled: bool, stream: TextIO):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="maskgen build", file=stream, smoothing=0.1)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _summary(report: dict[str, Any], agg, out: Path, stream: TextIO) -> None:
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(agg.errors_by_reason.items())) or "none"
    print(f"maskgen: {report['n_images']} images -> {out}/{SHARDS_DIR}/ ({agg.n_shards} shards); "
          f"skipped {report['n_errors']} ({skipped})", file=stream)  # fmt: skip
    if report.get("n_with_gt"):
        print(f"maskgen: vs ground truth on {report['n_with_gt']} images: mIoU {_fmt(report['miou'])}, "
              f"MAE {_fmt(report['mae'])}, max F-beta {_fmt(report['max_fbeta'])}, "
              f"S {_fmt(report['s_measure'])}, E {_fmt(report['e_measure'])}", file=stream)  # fmt: skip
    fallbacks = {k: n for k, n in sorted(agg.status_counts.items()) if k.startswith("fallback:")}
    if fallbacks:  # a mask replaced by the centre prior is not the method's: said, and loudly when most are
        share = sum(fallbacks.values()) / max(report["n_images"], 1)
        print(f"maskgen: {'warning: ' if share >= 0.5 else ''}{sum(fallbacks.values())} of {report['n_images']} "
              f"masks were empty or full and replaced by the centre prior "
              f"({', '.join(f'{n} {k}' for k, n in fallbacks.items())}; --fallback keep keeps them)",
              file=stream)  # fmt: skip
    if report.get("ran_on"):
        print(f"maskgen: ran on {describe_runtime(report)}", file=stream)
    if gpu_fallback_shards(report):
        print(f"maskgen: warning: each task asked Ray for {report['task_resources']['num_gpus']:g} GPU, "
              f"but {gpu_fallback_shards(report)} shard(s) ran on the CPU (no CUDA in the worker)",
              file=stream)  # fmt: skip
    ips = report.get("images_per_second")
    print(f"maskgen: report {out / REPORT_HTML}" + (f"; {ips:.1f} images/s" if ips else ""), file=stream)


__all__ = ["BuildError", "BuildOptions", "SourceError", "make_plan", "run_build"]
