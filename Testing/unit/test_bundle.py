import json
import shutil

import pytest

import phantoms
from USBLib.core import bundle as bundle_mod
from USBLib.errors import BundleError
from USBLib.core.networks import load_networks


def test_written_bundle_loads_and_builds(tiny_bundle):
    b = bundle_mod.load(tiny_bundle.root)
    assert b.name == "tiny-test" and b.grid_shape == (32, 40, 32) and b.spacing == (5.0, 5.0, 5.0)
    counts = b.parameter_counts()
    assert set(counts) == {"autoencoder", "unet_lesion", "unet_brain"} and all(v > 1000 for v in counts.values())
    import torch

    nets = load_networks(b, torch.device("cpu"))
    assert sum(p.numel() for p in nets["unet_brain"].parameters()) == counts["unet_brain"]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle.root, dst)
    return dst


def test_tampered_weight_is_refused(bundle_copy):
    path = bundle_copy / "unet_brain.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for 'unet_brain.safetensors'"):
        bundle_mod.load(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "template.nii.gz").unlink()
    with pytest.raises(BundleError, match="missing file 'template.nii.gz'"):
        bundle_mod.load(bundle_copy)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(schema_version=99), "schema version 99"),
    (lambda c: c.pop("defaults"), "lacks defaults"),
    (lambda c: c["files"].pop("unet_lesion.safetensors"), "not listed with a sha256"),
    (lambda c: c["model_space"].update(shape=[30, 40, 32]), "not divisible"),
    (lambda c: c["networks"]["autoencoder"].update(evil="os.system"), "unknown hyper-parameters"),
    (lambda c: c.update(model_space=[]), "malformed"),  # hand-edited: a list where an object belongs
    (lambda c: c["model_space"].update(shape=[32, 40, "a"]), "positive whole numbers"),
    (lambda c: c["networks"]["unet_brain"].update(channels=5), "malformed"),
])
def test_bad_bundle_json_is_refused(bundle_copy, edit, message):
    cfg = json.loads((bundle_copy / "bundle.json").read_text())
    edit(cfg)
    (bundle_copy / "bundle.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=message):
        b = bundle_mod.load(bundle_copy)
        import torch

        load_networks(b, torch.device("cpu"))


def test_resolve_by_name_and_default(tiny_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("USB_MODELS", str(tiny_bundle.root.parent))
    assert bundle_mod.resolve("tiny-test") == tiny_bundle.root
    with pytest.raises(BundleError, match="installed: .*tiny-test"):
        bundle_mod.resolve("nope")
    monkeypatch.setattr(bundle_mod, "DEFAULT_POINTER", tmp_path / "DEFAULT")
    with pytest.raises(BundleError, match="no default model is installed"):
        bundle_mod.load(None)
    (tmp_path / "DEFAULT").write_text("tiny-test\n")
    assert bundle_mod.load(None).root == tiny_bundle.root


def test_weights_that_do_not_fit_are_refused(tmp_path):
    nets = json.loads(json.dumps(phantoms.TINY_NETWORKS))
    b = phantoms.make_bundle(tmp_path / "a", networks=nets)
    cfg = json.loads((b.root / "bundle.json").read_text())
    cfg["networks"]["unet_brain"]["channels"] = [16, 64]
    (b.root / "bundle.json").write_text(json.dumps(cfg))
    import torch

    with pytest.raises(BundleError, match="do not fit"):
        load_networks(bundle_mod.load(b.root), torch.device("cpu"))
