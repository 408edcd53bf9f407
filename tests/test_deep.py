"""--method deep: the head's prediction, the head file, fit -> save -> build."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskgen.cli import main
from maskgen.methods.deep.fit import balanced_bce, saliency_loss, soft_iou_loss
from maskgen.methods.deep.model import HeadFileError, SaliencyNet, load_head, predict_maps, save_head
from maskio.records import index_shards
from sslmask.backbones import build_backbone


def _net(seed=0):
    torch.manual_seed(seed)
    net = SaliencyNet(build_backbone("resnet_tiny", 16))
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
    return net.eval()


def test_prediction_matches_a_manual_forward():
    net = _net()
    image = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    got = predict_maps(net, [image], short_side=40)[0]
    # by hand: resize the short side to 40 (80x50 -> 64x40), normalise, trunk, 1x1 conv as a
    # weighted channel sum, sigmoid, bilinear back to 50x80
    small = np.asarray(Image.fromarray(image).resize((64, 40), Image.BILINEAR)).astype(np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((small - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        feats = net.backbone(x)[0]
        logits = (feats * net.head.weight[0, :, 0, 0][:, None, None]).sum(0)
        prob = torch.sigmoid(
            F.interpolate(logits[None, None], size=(50, 80), mode="bilinear", align_corners=False)
        )
    assert got.shape == (50, 80) and got.dtype == np.float32
    np.testing.assert_allclose(got, prob[0, 0].numpy(), atol=1e-5)


def test_batched_prediction_equals_one_image_at_a_time_and_bf16_stays_close():
    net = _net()
    rng = np.random.default_rng(1)
    # three images that resize to one shape (a batch of 3) and two of other shapes
    sizes = [(50, 80), (50, 80), (100, 160), (64, 64), (70, 40)]
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
    batched = predict_maps(net, images, short_side=40, max_batch=2)
    for image, got in zip(images, batched, strict=True):
        alone = predict_maps(net, [image], short_side=40)[0]
        assert got.shape == image.shape[:2]
        np.testing.assert_allclose(got, alone, atol=1e-5)
    half = predict_maps(net, images, short_side=40, precision="bf16")
    for a, b in zip(batched, half, strict=True):
        assert np.abs(a - b).max() < 0.05  # bfloat16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="precision"):
        predict_maps(net, images, short_side=40, precision="fp8")


def test_channels_last_head_on_cpu_gives_the_contiguous_maps_in_fp32_and_bf16():
    """The CUDA layout (issue 43), run on CPU: the network and its input in channels_last."""
    import copy

    from maskgen.methods.deep.model import memory_format_of, prepare_for_device

    net = _net()
    nhwc = prepare_for_device(copy.deepcopy(net), "cpu", channels_last=True)
    assert memory_format_of(nhwc) == torch.channels_last and memory_format_of(net) == torch.contiguous_format
    assert memory_format_of(prepare_for_device(copy.deepcopy(net), "cpu")) == torch.contiguous_format
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in [(50, 80), (50, 80), (64, 64)]]
    for precision, atol in (("fp32", 1e-5), ("bf16", 0.05)):
        plain = predict_maps(net, images, short_side=40, precision=precision)
        for a, b in zip(plain, predict_maps(nhwc, images, short_side=40, precision=precision), strict=True):
            np.testing.assert_allclose(a, b, atol=atol)


def test_deep_method_on_cpu_asks_for_no_gpu_and_records_its_precision(tmp_path):
    from maskgen.methods import make_method

    save_head(_net(), tmp_path / "h.safetensors", {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    method = make_method("deep", {"head": str(tmp_path / "h.safetensors")})
    assert method.resources.num_gpus == 0.0 and method.batch_size == 8 and not method.decodes_jpeg
    assert method.params["precision"] == "auto" and method.params["short_side"] == 48
    assert method._net is None and method.runtime_params() == {}  # weights load in the worker, lazily
    method.predict([np.zeros((40, 50, 3), np.uint8)])
    assert method.runtime_params() == {"device": "cpu", "dtype": "fp32"}
    with pytest.raises(ValueError, match="gpu_share"):
        make_method("deep", {"head": str(tmp_path / "h.safetensors"), "gpu_share": 0})


def test_deep_plan_on_a_gpu_host_asks_for_a_gpu_share_without_loading_weights(tmp_path, monkeypatch):
    from maskgen.methods import make_method

    save_head(_net(), tmp_path / "h.safetensors", {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    method = make_method("deep", {"head": str(tmp_path / "h.safetensors"), "gpu_share": 0.5})
    assert method.resources.num_gpus == 0.5 and method.batch_size == 64 and method.decodes_jpeg
    assert method._net is None  # planning read the head's metadata only
    assert not make_method("deep", {"head": str(tmp_path / "h.safetensors"), "refine": 1}).decodes_jpeg


def test_deep_refine_is_drfis_region_refinement_of_the_networks_map(tmp_path):
    from maskgen.methods import make_method
    from maskgen.methods.drfi.refine import refine_on_image
    from maskgen.sources.synthetic import render_scene

    head = str(tmp_path / "h.safetensors")
    save_head(_net(), head, {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    plain, refined = make_method("deep", {"head": head}), make_method("deep", {"head": head, "refine": "1"})
    images = [render_scene(0, i)[0] for i in range(2)]
    for image, raw, got in zip(images, plain.predict(images), refined.predict(images), strict=True):
        np.testing.assert_allclose(got, refine_on_image(raw, image), atol=1e-6)
    assert "refine" not in plain.params  # earlier builds keep their parameters (and resume)
    assert refined.params["refine"] is True and refined.params["backend"] in ("opencv", "skimage")
    with pytest.raises(ValueError, match="backend"):
        make_method("deep", {"head": head, "refine": "1", "backend": "gpu"})


def test_device_decoding_matches_the_workers_decoding_up_to_rounding():
    from conftest import gradient_rgb, jpeg_bytes

    from maskgen.imaging import decode_image
    from maskgen.methods.deep.model import JpegDecodeError, predict_maps_encoded

    net = _net()
    rng = np.random.default_rng(2)
    jpegs = [jpeg_bytes(gradient_rgb(*hw, seed=i)) for i, hw in enumerate([(90, 120), (90, 120), (70, 50)])]
    array = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # a file the worker decoded (a PNG, say)
    inputs = [jpegs[0], array, jpegs[1], jpegs[2]]
    got = predict_maps_encoded(net, inputs, short_side=40)
    expected = predict_maps(net, [decode_image(j).rgb for j in jpegs[:1]] + [array]
                            + [decode_image(j).rgb for j in jpegs[1:]], short_side=40)  # fmt: skip
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert np.abs(g - e).max() < 0.05 and np.abs(g - e).mean() < 0.01  # resize/IDCT rounding
    np.testing.assert_allclose(got[1], expected[1], atol=0.02)  # no decoder involved: only the resize
    with pytest.raises(JpegDecodeError, match="truncated"):
        predict_maps_encoded(net, [jpegs[0][:-300]], short_side=40)


def test_build_with_device_decoding_keeps_jpegs_and_records_bad_ones(tmp_path):
    from test_bad_inputs import BAD, GOOD

    from maskio.shard_format import decode_gray_png

    root = tmp_path / "images"
    root.mkdir()
    for name, (data, _) in {**GOOD, **BAD}.items():
        (root / name).write_bytes(data)
    head = str(tmp_path / "h.safetensors")
    save_head(_net(), head, {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    samples = {}
    for decode in ("pil", "device"):
        out = tmp_path / decode
        assert main(["build", "--source", "folder", "--root", str(root), "--method", "deep", "--head", head,
                     "--param", f"decode={decode}", "--save-saliency", "--out", str(out), "--executor", "local",
                     "--no-progress"]) == 0  # fmt: skip
        errors = {e["path"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
        assert {p: (e["stage"], e["reason"]) for p, e in errors.items()} == {
            name: ("decode", reason) for name, (_, reason) in BAD.items()
        }
        samples[decode] = {}
        for tar in sorted((out / "shards").glob("*.tar")):
            members = _members(tar)
            for name, data in members.items():
                if name.endswith(".json"):
                    key = name[: -len(".json")]
                    samples[decode][json.loads(data)["path"]] = {
                        k.split(".", 1)[1]: v for k, v in members.items() if k.split(".", 1)[0] == key
                    }
    assert set(samples["device"]) == set(samples["pil"]) == set(GOOD)
    for name, (data, shape) in GOOD.items():
        dev, pil = samples["device"][name], samples["pil"][name]
        if name in ("good_rgb.jpg", "gray.jpg"):  # plain JPEGs: kept byte for byte, decoded by the method
            assert dev["jpg"] == pil["jpg"] == data
        assert json.loads(dev["json"])["method_params"]["decode"] == "device"
        sal_dev, sal_pil = (decode_gray_png(x["sal.png"]).astype(int) for x in (dev, pil))
        assert sal_dev.shape == shape and np.abs(sal_dev - sal_pil).mean() < 3  # of 255


def test_head_file_round_trip_and_errors(tmp_path):
    net = _net()
    save_head(net, tmp_path / "h.safetensors", {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    loaded, meta = load_head(tmp_path / "h.safetensors")
    assert meta == {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48, "decoder": "linear"}
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(loaded(x), net(x))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(HeadFileError, match="bad.safetensors: not a safetensors head file"):
        load_head(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HeadFileError, match="not a maskgen deep head"):
        load_head(tmp_path / "other.safetensors")


@pytest.mark.parametrize("out_stride", [16, 32])
def test_aspp_head_round_trips_and_its_rates_follow_the_stride(tmp_path, out_stride):
    torch.manual_seed(0)
    net = SaliencyNet(build_backbone("resnet_tiny", out_stride), decoder="aspp").eval()
    rates = [b[0].dilation[0] for b in net.head.branches]
    assert rates == ([1, 6, 12, 18] if out_stride == 16 else [1, 3, 6, 9])
    x = torch.randn(2, 3, 64, 96)
    assert net(x).shape == (2, 1, 64 // out_stride, 96 // out_stride)
    path = tmp_path / "aspp.safetensors"
    save_head(net, path, {"arch": "resnet_tiny", "out_stride": out_stride, "short_side": 64})
    loaded, meta = load_head(path)
    assert meta["decoder"] == "aspp"
    torch.testing.assert_close(loaded(x), net(x))


def test_a_head_file_whose_tensors_do_not_fit_its_metadata_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_head(_net(), tmp_path / "h.safetensors", {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    tensors = load_file(str(tmp_path / "h.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "as_aspp.safetensors"), {**meta, "decoder": '"aspp"'})
    with pytest.raises(HeadFileError, match="do not fit resnet_tiny with the aspp decoder"):
        load_head(tmp_path / "as_aspp.safetensors")
    tensors["head.weight"] = torch.zeros(1, 3, 1, 1)
    save_file(tensors, str(tmp_path / "bad_shape.safetensors"), meta)
    with pytest.raises(HeadFileError, match="bad_shape.safetensors: tensors do not fit"):
        load_head(tmp_path / "bad_shape.safetensors")


def test_epoch_batches_never_end_with_a_single_sample():
    from maskgen.methods.deep.fit import epoch_batches

    assert [len(b) for b in epoch_batches(list(range(33)), 16, 0)] == [16, 17]
    assert [len(b) for b in epoch_batches(list(range(34)), 16, 0)] == [16, 16, 2]
    assert epoch_batches([5], 16, 3) == [[(3, 5)]]
    assert sorted(i for b in epoch_batches(list(range(33)), 16, 1) for _, i in b) == list(range(33))


def test_finetune_choices_train_the_named_stages_and_the_head():
    from maskgen.methods.deep.fit import trainable_parameters

    net = _net()
    names = {id(p): n for n, p in net.named_parameters()}
    for finetune, stages in [("none", set()), ("layer4", {"layer4"}), ("layer3", {"layer3", "layer4"}),
                             ("all", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})]:  # fmt: skip
        trained = {names[id(p)] for p in trainable_parameters(net, finetune)}
        assert "head.weight" in trained
        assert {n.split(".")[1] for n in trained if n.startswith("backbone.")} == stages


def test_balanced_bce_weights_each_class_by_the_others_share():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # positives weigh 3/4, negatives 1/4 (the positive share): a slow sum over pixels
    w = [0.75, 0.25, 0.25, 0.25]
    terms = [-(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))
             for z, t in zip(logits[0].tolist(), target[0].tolist(), strict=True)]  # fmt: skip
    expected = sum(wi * ti for wi, ti in zip(w, terms, strict=True)) / sum(w)
    assert float(balanced_bce(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_soft_iou_loss_is_one_minus_each_images_soft_iou_averaged():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 7, generator=g) * 3
    target = (torch.rand(3, 1, 5, 7, generator=g) > 0.6).float()
    expected = []
    for z, t in zip(logits.tolist(), target.tolist(), strict=True):  # one image at a time, pixel by pixel
        inter = union = 1.0  # the +1 smoothing
        for zr, tr in zip(z[0], t[0], strict=True):
            for zi, ti in zip(zr, tr, strict=True):
                p = 1 / (1 + np.exp(-zi))
                inter += p * ti
                union += p + ti - p * ti
        expected.append(1 - inter / union)
    assert float(soft_iou_loss(logits, target)) == pytest.approx(np.mean(expected), rel=1e-5)
    # a confident right map costs nothing, a confident wrong one nearly everything
    assert float(soft_iou_loss((target * 2 - 1) * 50, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_iou_loss((1 - target * 2) * 50, target)) > 0.9
    # the fit's loss: HARL's balanced BCE alone by default, plus the weighted IoU term on request
    assert float(saliency_loss(logits, target)) == float(balanced_bce(logits, target))
    both = float(balanced_bce(logits, target)) + 0.5 * float(soft_iou_loss(logits, target))
    assert float(saliency_loss(logits, target, iou_weight=0.5)) == pytest.approx(both, rel=1e-6)


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_fit_save_build_round_trip_is_deterministic(sample_build, tmp_path, capsys):
    head = tmp_path / "head.safetensors"
    assert main(["deep", "fit", "--shards", str(sample_build), "--backbone", "random", "--arch", "resnet_tiny",
                 "--out", str(head), "--epochs", "2", "--short-side", "48", "--batch-size", "8",
                 "--workers", "0"]) == 0  # fmt: skip
    assert "val mIoU vs teacher" in capsys.readouterr().err
    _, meta = load_head(head)
    assert meta["epoch"] == 2 and meta["short_side"] == 48 and meta["samples"] == 38
    # the sample source has ground truth: the teacher's validation mIoU against it is the mean
    # of the IoUs the build recorded for the same held-out samples (the first tenth of fit's
    # seeded permutation) that have ground truth
    records = index_shards([str(sample_build)], require_masks=True)
    val = np.random.default_rng(0).permutation(len(records))[:4]
    recorded = {}
    for tar in sorted((sample_build / "shards").glob("*.tar")):
        for name, data in _members(tar).items():
            if name.endswith(".json"):
                recorded[name[: -len(".json")]] = json.loads(data)["iou"]
    with_gt = [recorded[records.names[i]] for i in val if recorded[records.names[i]] is not None]
    assert meta["val_with_gt"] == len(with_gt) > 0  # the photos have none
    assert meta["teacher_miou_vs_gt"] == pytest.approx(np.mean(with_gt))
    assert 0.0 <= meta["val_miou_vs_gt"] <= 1.0
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["build", "--source", "sample", "--sample-size", "6", "--no-photos", "--method", "deep",
                     "--head", str(head), "--out", str(out), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
        outs.append(out / "shards" / "maskgen-000000.tar")
    a, b = _members(outs[0]), _members(outs[1])
    assert a == b  # byte-identical samples on CPU
    assert {n.split(".", 1)[1] for n in a} == {"jpg", "mask.png", "cls", "json"}
    meta0 = json.loads(a["scenes__000000.json"])
    assert meta0["method"] == "deep" and meta0["method_params"]["arch"] == "resnet_tiny"


def test_relabel_writes_the_students_post_processed_masks(sample_build, tmp_path):
    from maskgen.methods.deep.crops import TeacherCrops
    from maskgen.methods.deep.fit import relabel
    from maskgen.postprocess import PostprocessConfig, binarize

    records = index_shards([str(sample_build)], require_masks=True)
    dataset = TeacherCrops(records, 32, seed=0)
    net = _net()
    new = relabel(net, dataset, [1, 4], short_side=40, device="cpu", path=tmp_path / "m.png")
    assert new.files[-1] == str(tmp_path / "m.png") and len(new.files) == len(records.files) + 1
    np.testing.assert_array_equal(new.mask[0], records.mask[0])  # not relabelled: unchanged
    relabelled = TeacherCrops(new, 32, seed=0)
    for i in (1, 4):
        image = np.asarray(relabelled.image(i))
        expected = binarize(predict_maps(net, [image], 40)[0], PostprocessConfig()).mask > 0
        np.testing.assert_array_equal(relabelled.mask(i), expected)


def test_teacher_crops_move_image_and_mask_together_and_repeat_per_seed(tmp_path):
    """A crop of an image whose left half is white and masked: the mask follows the pixels
    (up to colour jitter, which keeps white brighter than black), and the same (epoch, index)
    gives the same crop in any process."""
    from maskgen.methods.deep.crops import TeacherCrops
    from maskio.records import Records

    image = np.zeros((60, 80, 3), np.uint8)
    image[:, :40] = 255
    mask = np.zeros((60, 80), np.uint8)
    mask[:, :40] = 255
    files = []
    for name, arr in (("i.png", image), ("m.png", mask)):
        Image.fromarray(arr).save(tmp_path / name)
        files.append(str(tmp_path / name))
    whole = lambda fid: [fid, -1, 0]  # noqa: E731 -- a whole-file record
    records = Records(
        files, np.array([whole(0)] * 2), np.array([whole(1)] * 2), np.array([-1, -1]), ["a", "b"]
    )
    crops = TeacherCrops(records, 24, seed=3)
    for epoch, index in [(0, 0), (0, 1), (1, 0), (2, 1)]:
        img, m = crops[epoch, index]
        assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and m.shape == (1, 24, 24)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        grey, fg = img.float().mean(0), m[0] > 0.5
        if 0 < fg.sum() < fg.numel():  # both halves in the crop: the masked one is the bright one
            assert grey[fg].mean() > grey[~fg].mean()
            assert ((grey > (grey[fg].mean() + grey[~fg].mean()) / 2) == fg).float().mean() > 0.9
        again = crops[epoch, index]
        assert torch.equal(again[0], img) and torch.equal(again[1], m)
    assert not torch.equal(crops[0, 0][0], crops[1, 0][0])  # another epoch, another crop


def test_self_training_round_is_recorded_in_the_head(sample_build, tmp_path, capsys):
    head = tmp_path / "head.safetensors"
    assert main(["deep", "fit", "--shards", str(sample_build), "--backbone", "random", "--arch", "resnet_tiny",
                 "--out", str(head), "--epochs", "1", "--rounds", "1", "--short-side", "32", "--decoder", "aspp",
                 "--iou-weight", "0.5", "--batch-size", "16", "--workers", "0"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "round 0/1 epoch 1/1" in err and "round 1/1 epoch 1/1" in err
    meta = load_head(head)[1]
    assert meta["round"] == 1 and meta["decoder"] == "aspp" and meta["iou_weight"] == 0.5
    assert main(["deep", "fit", "--shards", str(sample_build), "--backbone", "random", "--arch", "resnet_tiny",
                 "--out", str(tmp_path / "h2.safetensors"), "--iou-weight", "-1"]) != 0  # fmt: skip
    assert "Invalid value for '--iou-weight'" in capsys.readouterr().err  # the option type, before any work


def test_deep_without_head_uses_the_shipped_one(tmp_path):
    from maskgen.methods.deep.method import DEFAULT_HEAD

    meta = load_head(DEFAULT_HEAD)[1]
    assert meta["teacher"] and meta["data"] and meta["licence"]  # its provenance travels with it
    assert DEFAULT_HEAD.stat().st_size < 8 * 2**20
    out = tmp_path / "o"
    assert main(["build", "--method", "deep", "--sample-size", "2", "--limit", "2", "--out", str(out),
                 "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    params = json.loads((out / "manifest.json").read_text())["method_params"]
    assert params["head"] == DEFAULT_HEAD.name and params["arch"] == meta["arch"]


def test_deep_without_a_usable_head_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "h.safetensors").write_bytes(b"junk")
    assert main(["build", "--method", "deep", "--head", str(tmp_path / "h.safetensors"), "--out",
                 str(tmp_path / "o2"), "--executor", "local"]) != 0  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a safetensors head file" in err[0]
