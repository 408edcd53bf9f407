"""The dataset card: Hub metadata (YAML front matter) and a body rendered from
``maskgen/templates/dataset_card.md`` (Jinja2, as report.html: ``maskgen.templating``)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from maskgen.templating import template

# licence metadata per source; ImageNet-derived data is "other" with ImageNet's terms
LICENSES: dict[str, dict[str, str]] = {
    "imagenet": {
        "license": "other",
        "license_name": "imagenet-terms-of-access",
        "license_link": "https://image-net.org/download.php",
    },
    "coco": {"license": "cc-by-4.0"},
    "sample": {
        "license": "other",
        "license_name": "apache-2.0-and-scikit-image-data",
        "license_link": "https://github.com/scikit-image/scikit-image/blob/main/skimage/data/README.txt",
    },
    "folder": {"license": "unknown"},
}
SOURCE_DATASETS = {
    "imagenet": ["imagenet-1k"],
    "coco": ["coco"],
    "sample": ["original"],
    "folder": ["original"],
}
GATING = (
    "The images in this dataset are ImageNet's. By requesting access you agree to ImageNet's "
    "terms of access (https://image-net.org/download.php): non-commercial research and "
    "educational use only."
)


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` samples."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):  # fmt: skip
        if n < limit:
            return name
    return "10M<n<100M"


def card_metadata(
    manifest: dict[str, Any], repo: str, masks_only: bool, license_id: str | None
) -> dict[str, Any]:
    source = manifest["source"]
    meta: dict[str, Any] = dict(LICENSES.get(source, {"license": "unknown"}))
    if license_id:
        meta = {"license": license_id}
    meta.update(
        {
            "pretty_name": pretty_name(manifest, masks_only),
            "task_categories": ["image-segmentation"],
            "tags": ["webdataset", "saliency", "foreground-mask", "self-supervised-learning", "maskgen"],
            "size_categories": [size_category(int(manifest["n_samples"]))],
            "source_datasets": SOURCE_DATASETS.get(source, ["original"]),
            "configs": [
                {"config_name": "default", "data_files": [{"split": "train", "path": "data/train/*.tar"}]}
            ],
        }
    )
    if source == "imagenet" and not masks_only and not license_id:
        meta["extra_gated_prompt"] = GATING
        meta["extra_gated_fields"] = {
            "I agree to use the images for non-commercial research only": "checkbox"
        }
    return meta


def pretty_name(manifest: dict[str, Any], masks_only: bool) -> str:
    kind = "masks" if masks_only else "images and masks"
    return f"{manifest['source']} {manifest['method']} foreground {kind} (maskgen)"


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def quality_table(report: dict[str, Any]) -> str:
    if not report.get("n_with_gt"):
        return "The source has no ground-truth masks, so no quality numbers are reported."
    keys = ("miou", "dataset_iou", "mae", "max_fbeta", "s_measure", "e_measure", "weighted_f")
    head = "| images with GT | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 1)
    row = f"| {report['n_with_gt']} | " + " | ".join(_fmt(report.get(k)) for k in keys) + " |"
    return "\n".join(
        [head, sep, row, "", "mIoU at the build's threshold; the other metrics follow PySODMetrics."]
    )


def render_card(
    manifest: dict[str, Any],
    report: dict[str, Any],
    repo: str,
    masks_only: bool,
    license_id: str | None = None,
) -> str:
    meta = card_metadata(manifest, repo, masks_only, license_id)
    fields = ["| `KEY.jpg` | the image (original bytes when they were JPEG) |"] if not masks_only else []
    fields.append("| `KEY.mask.png` | the binary foreground mask, 8-bit 0/255, the image's size |")
    if manifest.get("save_saliency"):
        fields.append("| `KEY.sal.png` | the soft saliency map, 8-bit |")
    if manifest.get("class_names"):
        fields.append("| `KEY.cls` | the class index (ASCII) |")
    fields.append("| `KEY.json` | per-sample metadata |")
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    images_note = (
        "This is a **masks-only** release: no image bytes are included. Join the masks with your own "
        "copy of the source images by `json.path`."
        if masks_only
        else ("The images are included; their licence is the source's (see the metadata above).")
    )
    extra = []
    if manifest["source"] == "sample":
        extra.append("- The sample source is synthetic scenes with exact masks plus 12 scikit-image photos.")
    values = {
        "pretty_name": meta["pretty_name"],
        "summary": (
            f"Foreground (saliency) masks for {manifest['n_samples']} images of the `{manifest['source']}` "
            f"source, made by `maskgen` with the `{manifest['method']}` method, as WebDataset shards."
        ),
        "source": manifest["source"],
        "n_images": manifest["n_samples"],
        "n_classes": f", {len(manifest['class_names'])} classes" if manifest.get("class_names") else "",
        "method": manifest["method"],
        "method_params": f"`{json.dumps(manifest.get('method_params') or {}, sort_keys=True)}`",
        "threshold": f"threshold {manifest.get('threshold')}",
        "command": manifest.get("command") or "—",
        "versions": versions or "—",
        "git_commit": manifest.get("git_commit") or "—",
        "images_note": images_note,
        "quality": quality_table(report),
        "fields": "\n".join(fields),
        "repo": repo,
        "last_shard": f"{max(int(manifest['n_shards']) - 1, 0):06d}",
        "local_name": repo.split("/")[-1],
        "extra_limitations": "\n".join(extra),
    }
    body = template("dataset_card.md").render(values)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n{body}"
