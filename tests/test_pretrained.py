"""detector.weights / classifier.weights: local state dicts loaded into the models wff train fits.

The files are saved from randomly initialised networks (torchvision's resnext101_32x8d, this
project's classifier, a 3D-ResNets-PyTorch-named copy of it), so every check compares the
model's tensors with the file's values after loading through the trainer's own functions.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wff.config import PAPER, SMALL
from wff.training.models import build_classifier, build_detector
from wff.training.pretrained import MIN_MATCH, check_pretrained, init_pretrained, summary_line


def _with(profile, kind, path):
    return profile.replace(**{kind: {"weights": str(path)}})


def _hara(state: dict) -> dict:
    """This project's classifier names as 3D-ResNets-PyTorch writes them, wrapped as its checkpoints are."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stem\.0\.", "conv1.", k)
        k = re.sub(r"^stem\.1\.", "bn1.", k)
        k = re.sub(r"^stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", k)
        out["module." + k.replace(".shortcut.", ".downsample.")] = v
    return {"state_dict": out, "arch": "resnext-101", "epoch": 200}


@pytest.fixture(scope="module")
def resnext_file(tmp_path_factory):
    torch.manual_seed(11)
    net = torchvision.models.resnext101_32x8d(weights=None)
    with torch.no_grad():  # BN buffers off their defaults, so loading them is visible
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("w") / "resnext101_32x8d.pth"
    state = net.state_dict()
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def paper_detector():
    torch.manual_seed(0)
    return build_detector(PAPER)


def test_detector_backbone_takes_the_resnext101_file(resnext_file, paper_detector):
    path, state = resnext_file
    model = paper_detector
    fpn_before = model.backbone.fpn.inner_blocks[0][0].weight.clone()
    assert not torch.equal(model.backbone.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    report = init_pretrained(model, "detector", _with(PAPER, "detector", path))

    body = model.backbone.body
    assert torch.equal(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(body.layer3[17].conv2.conv.weight, state["layer3.17.conv2.weight"])  # DCN wraps the 3x3 conv
    assert torch.equal(body.layer4[0].downsample[1].running_mean, state["layer4.0.downsample.1.running_mean"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
    assert torch.count_nonzero(body.layer2[0].conv2.offset.weight) == 0  # offsets stay zero: a regular conv at start
    assert torch.equal(model.backbone.fpn.inner_blocks[0][0].weight, fpn_before)  # FPN has no pretrained source

    rgb = state["conv1.weight"]  # (64, 3, 7, 7)
    assert body.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(body.conv1.weight, rgb.sum(dim=1, keepdim=True))
    grey = torch.rand(1, 1, 32, 32)
    assert torch.allclose(F.conv2d(grey, body.conv1.weight, stride=2, padding=3),
                          F.conv2d(grey.expand(1, 3, 32, 32), rgb, stride=2, padding=3), atol=1e-5)

    pretrainable = [k for k in model.state_dict() if k.startswith("backbone.body.") and ".offset." not in k]
    assert report["loaded"] == report["expected"] == len(pretrainable)
    assert report["missing"] == [] and report["shape_mismatch"] == []
    assert sorted(report["unexpected"]) == ["fc.bias", "fc.weight"]
    assert "summed" in report["first_conv"]
    assert f"{len(pretrainable)}/{len(pretrainable)} tensors loaded, 0 missing, 2 unused" in summary_line("detector", report)


def test_wrong_detector_files_are_refused(tmp_path, paper_detector):
    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet18)
    with pytest.raises(ValueError, match=r"resnet18\.pth: not the detector's architecture: \d+ of its \d+ tensors match") as e:
        init_pretrained(paper_detector, "detector", _with(PAPER, "detector", resnet18))
    assert "layer1: 2, layer2: 2" in str(e.value)  # says what the file holds

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.randn(64, 3, 7, 7), tensor)
    with pytest.raises(ValueError, match=r"tensor\.pt: holds a Tensor of shape \(64, 3, 7, 7\), not a state dict"):
        init_pretrained(paper_detector, "detector", _with(PAPER, "detector", tensor))

    text = tmp_path / "weights.txt"
    text.write_text("conv1.weight 0.1 0.2\n")
    with pytest.raises(ValueError, match=r"weights\.txt: not a PyTorch state dict file"):
        init_pretrained(paper_detector, "detector", _with(PAPER, "detector", text))
    with pytest.raises(FileNotFoundError, match="absent.pth: no such file"):
        init_pretrained(paper_detector, "detector", _with(PAPER, "detector", tmp_path / "absent.pth"))


def test_small_detector_backbone_refuses_resnext_weights(resnext_file, tiny_profile):
    from test_models import fake_patients

    from wff.training.engine import fit_detector

    with pytest.raises(ValueError, match="fit only detector.backbone=resnext101_dcn"):
        init_pretrained(build_detector(SMALL), "detector", _with(SMALL, "detector", resnext_file[0]))
    with pytest.raises(ValueError, match="fit only detector.backbone=resnext101_dcn"):  # fit_detector loads after building
        fit_detector(fake_patients(2), _with(tiny_profile, "detector", resnext_file[0]), epochs=1)


def test_small_classifier_from_its_own_layout_through_the_trainer_check(tmp_path):
    torch.manual_seed(1)
    source = build_classifier(SMALL).state_dict()
    path = tmp_path / "small_classifier.pt"
    torch.save(source, path)
    profile = _with(SMALL, "classifier", path)
    lines = []
    reports = check_pretrained(profile, lines.append)  # what run_training calls before any fit
    assert set(reports) == {"classifier"} and len(lines) == 1
    assert reports["classifier"]["loaded"] == reports["classifier"]["expected"] == len(source) - 2  # all but fc
    assert reports["classifier"]["unexpected"] == [] and reports["classifier"]["first_conv"] == "as in the file"

    torch.manual_seed(2)
    model = build_classifier(SMALL)
    init_pretrained(model, "classifier", profile)  # what fit_classifier calls after building
    for name, value in model.state_dict().items():
        assert torch.equal(value, source[name]), name  # fc too: same shape


def test_paper_classifier_from_a_kinetics_style_file(tmp_path):
    torch.manual_seed(3)
    source = build_classifier(PAPER).state_dict()
    rgb = dict(source)
    rgb["stem.0.weight"] = torch.randn(64, 3, 7, 7, 7)
    rgb["fc.weight"], rgb["fc.bias"] = torch.randn(400, 2048), torch.randn(400)  # Kinetics head
    path = tmp_path / "resnext-101-kinetics.pth"
    torch.save(_hara(rgb), path)

    torch.manual_seed(4)
    model = build_classifier(PAPER)
    fc_before = model.fc.weight.clone()
    report = init_pretrained(model, "classifier", _with(PAPER, "classifier", path))
    state = model.state_dict()
    assert torch.equal(state["stages.2.22.conv2.weight"], source["stages.2.22.conv2.weight"])
    assert torch.equal(state["stages.3.0.shortcut.1.running_var"], source["stages.3.0.shortcut.1.running_var"])
    assert torch.allclose(state["stem.0.weight"], rgb["stem.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.fc.weight, fc_before)  # 400 classes: the head stays new
    assert report["loaded"] == report["expected"] == len(source) - 2 and report["missing"] == []
    assert report["shape_mismatch"] == ["fc.weight (400, 2048) -> fc.weight (2, 2048)", "fc.bias (400,) -> fc.bias (2,)"]

    small = tmp_path / "small.pt"
    torch.save(build_classifier(SMALL).state_dict(), small)
    with pytest.raises(ValueError, match=rf"small\.pt: not the classifier's architecture: \d+ of its \d+ tensors match \(need {MIN_MATCH:.0%}"):
        init_pretrained(model, "classifier", _with(PAPER, "classifier", small))


def test_weights_default_to_none_and_set_parses_a_path():
    from wff.cli import apply_overrides

    assert SMALL.detector.weights is None and PAPER.classifier.weights is None
    profile = apply_overrides(PAPER, ("detector.weights=/data/resnext101_32x8d.pth", "classifier.weights=k.pth"))
    assert profile.detector.weights == "/data/resnext101_32x8d.pth" and profile.classifier.weights == "k.pth"
    assert check_pretrained(SMALL, print) == {}


def test_fit_classifier_starts_from_the_file(tmp_path, tiny_profile):
    """fit_classifier loads classifier.weights after building: at lr 0 one step leaves the file's convolutions."""
    from test_models import fake_patients

    from wff.training.engine import fit_classifier

    profile = tiny_profile.replace(classifier={"batch_size": 4, "lr": 0.0}, train={"max_steps": 1})
    torch.manual_seed(5)
    source = build_classifier(profile).state_dict()
    path = tmp_path / "tiny_classifier.pt"
    torch.save(source, path)
    model = fit_classifier(fake_patients(2), _with(profile, "classifier", path), epochs=1, seed=0)
    state = model.state_dict()
    convs = [k for k in source if k.endswith("weight") and source[k].dim() == 5]
    assert convs and all(torch.equal(state[k], source[k]) for k in convs)


def test_run_training_refuses_a_wrong_file_before_reading_the_dataset(tmp_path):
    from wff.training.train import run_training

    text = tmp_path / "classifier.txt"
    text.write_text("not weights\n")
    with pytest.raises(ValueError, match=r"classifier\.weights=.*classifier\.txt: not a PyTorch state dict file"):
        run_training(tmp_path / "no-dataset", tmp_path / "out", _with(SMALL, "classifier", text))
