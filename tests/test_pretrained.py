"""Pretrained starts: --pretrained FILE (a state dict), --pretrained imagenet through torchvision's weights API with a
TORCH_HOME cache, and the errors when neither can be had. Nothing is downloaded: the tests write the files."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from training import train
from training.architectures import PretrainedWeightsError, imagenet_cache_file, imagenet_weights
from training.models import Classifier, Detector

ARCH = "mobilenet_v3_small"


def _torchvision_state(name: str = ARCH, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).state_dict()


def test_a_state_dict_file_starts_both_models(tmp_path):
    """A torchvision state dict on disk is loaded into the classifier's and the detector's backbone."""
    state = _torchvision_state()
    path = tmp_path / "mobilenet.pth"
    torch.save(state, path)
    classifier = Classifier(3, ARCH, pretrained=path)
    detector = Detector(2, ARCH, 32, pretrained=str(path))
    torch.testing.assert_close(classifier.features[0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(detector.features[1].block[0][0].weight, state["features.1.block.0.0.weight"])
    assert not torch.equal(Classifier(3, ARCH).features[0][0].weight, state["features.0.0.weight"])


def test_a_state_dict_of_another_architecture_is_refused_clearly(tmp_path):
    """A file that does not fit the backbone names the architecture and what is missing or misshapen."""
    path = tmp_path / "large.pth"
    torch.save(_torchvision_state("mobilenet_v3_large"), path)
    with pytest.raises(PretrainedWeightsError, match=r"does not fit the mobilenet_v3_small backbone: .*another shape"):
        Classifier(3, ARCH, pretrained=path)
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(PretrainedWeightsError, match=r"backbone tensors are missing"):
        Classifier(3, ARCH, pretrained=path)
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        Classifier(3, ARCH, pretrained=tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="not a readable state dict"):
        Classifier(3, ARCH, pretrained=tmp_path / "garbage.pth")


def test_imagenet_reads_the_weights_api_cache_under_torch_home(tmp_path, monkeypatch):
    """--pretrained imagenet loads torchvision's default weights from $TORCH_HOME/hub/checkpoints/<its file name>."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = imagenet_cache_file(ARCH)
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    assert cached.name == imagenet_weights(ARCH).url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    state = _torchvision_state(seed=2)
    torch.save(state, cached)
    classifier = Classifier(3, ARCH, pretrained="imagenet")
    torch.testing.assert_close(classifier.features[0][0].weight, state["features.0.0.weight"])


def test_imagenet_offline_says_which_file_it_needs_and_how_to_do_without(tmp_path, monkeypatch):
    """Without the cached file and without network, the error names the file to copy and --pretrained FILE."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsError) as error:
        Classifier(3, ARCH, pretrained="imagenet")
    message = str(error.value)
    assert str(imagenet_cache_file(ARCH)) in message and "--pretrained FILE" in message and "TORCH_HOME" in message


def test_train_stops_with_the_error_not_a_traceback(tiny_dataset, tmp_path, capsys):
    """The training command turns an unusable --pretrained into `error: ...` (SystemExit) before any step."""
    missing = tmp_path / "missing.pth"
    arguments = [
        "--data",
        str(tiny_dataset),
        "--out",
        str(tmp_path / "run"),
        "--input-size",
        "64",
        "--min-examples",
        "1",
    ]
    args = train.get_args_parser().parse_args([*arguments, "--workers", "0", "--pretrained", str(missing)])
    with pytest.raises(SystemExit, match=r"error: --pretrained .*missing\.pth: no such file"):
        train.main(args)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
