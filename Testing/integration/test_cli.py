"""Every ``usb`` sub-command, exit codes and one-line errors, with a tiny random-init bundle."""
import re
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from USBLib.core import bundle as bundle_mod
from USBLib.apps.cli import main

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_heal_embed_write_outputs_with_geometry_and_sidecar(tiny_bundle, scan_files, tmp_path, capsys):
    out = tmp_path / "out" / "healed.nii.gz"
    code, stdout, err = run(capsys, "heal", scan_files["image"], "--mask", scan_files["mask"], "-o", out,
                            "--model", tiny_bundle.root, "--device", "cpu", "--seed", "3", "--steps", "2",
                            "--samples", "2", "--uncertainty", tmp_path / "unc.nii.gz", "--prefill", "biharmonic",
                            "--boundary-average")
    assert code == 0, err
    assert stdout.strip() == str(out)
    src, res = nib.load(str(scan_files["image"])), nib.load(str(out))
    np.testing.assert_allclose(res.affine, src.affine, atol=1e-5)
    assert res.get_data_dtype() == src.get_data_dtype() and res.shape == src.shape
    side = json.loads(out.with_name("healed.json").read_text())
    assert side["task"] == "heal" and side["seed"] == 3 and side["settings"]["steps"] == 2
    assert side["settings"]["prefill"] == "biharmonic" and side["output_sha256"] == bundle_mod.sha256_of(out)
    drawn, eroded, grown = side["boundary_masks_voxels"]  # three masks, their edits averaged
    assert side["settings"]["boundary_average"] is True and eroded < drawn < grown
    # how the mask file was read is a setting too (two thresholds of one soft mask give two heals)
    assert side["settings"]["mask_threshold"] is None and side["settings"]["resample_mask"] is False
    assert side["inputs"]["image"]["sha256"] == bundle_mod.sha256_of(scan_files["image"])
    assert {"torch", "monai", "python"} <= set(side["software"])
    assert nib.load(str(tmp_path / "unc.nii.gz")).get_fdata().max() > 0

    code, _, err = run(capsys, "embed", scan_files["image"], "--mask", scan_files["embed"], "-o",
                       tmp_path / "emb.nrrd", "--model", tiny_bundle.root, "--eta", "0.5", "--alpha0", "10", "--k", "1")
    assert code == 0, err
    from USBLib.imaging.io import read_volume

    np.testing.assert_allclose(read_volume(tmp_path / "emb.nrrd").affine, src.affine, atol=1e-5)


def test_a_mask_that_covers_the_rim_heals_without_growth(scan_files, tmp_path, capsys):
    """``--mask-covers-rim`` (a FLAIR-made or dilated mask): the heal grows the mask by 0 mm where the model's
    default grows it by 2; with a non-zero ``--dilation`` it is a one-line error and nothing is written."""
    import phantoms

    model = phantoms.make_bundle(tmp_path / "tiny-local", local=True, name="tiny-local")
    assert model.defaults("heal")["dilation_mm"] == 2.0
    out = tmp_path / "healed.nii.gz"
    code, _, err = run(capsys, "heal", scan_files["image"], "--mask", scan_files["mask"], "-o", out, "--model",
                       model.root, "--quiet", "--mask-covers-rim")
    assert code == 0, err
    assert json.loads(out.with_name("healed.json").read_text())["settings"]["dilation_mm"] == 0.0
    clash = tmp_path / "clash.nii.gz"
    code, _, err = run(capsys, "heal", scan_files["image"], "--mask", scan_files["mask"], "-o", clash, "--model",
                       model.root, "--quiet", "--mask-covers-rim", "--dilation", "2")
    assert code == 2 and err.count("\n") == 1 and "--mask-covers-rim" in err and not clash.exists(), err
    code, _, err = run(capsys, "batch", scan_files["image"].parent, "-o", tmp_path / "derivatives", "--model",
                       model.root, "--mask-covers-rim", "--dilation", "1")  # usb batch: the same option
    assert code == 2 and "--mask-covers-rim" in err and not (tmp_path / "derivatives").exists(), err


def test_generate_and_generate_from_mask(tiny_bundle, scan_files, tmp_path, capsys):
    code, stdout, err = run(capsys, "generate", "-o", tmp_path / "g.nii.gz", "--mask-out", tmp_path / "m.nii.gz",
                            "--n", "2", "--model", tiny_bundle.root, "--quiet")
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.glob("[gm]_*.nii.gz"))
    assert names == ["g_001.nii.gz", "g_002.nii.gz", "m_001.nii.gz", "m_002.nii.gz"]
    code, _, err = run(capsys, "generate", "-o", tmp_path / "UP.NII.GZ", "--mask-out", tmp_path / "UPM.Nii",
                       "--n", "2", "--model", tiny_bundle.root, "--quiet")
    assert code == 0, err  # numbered outputs keep the suffix as it was typed
    numbered = sorted(p.name for p in tmp_path.glob("UP*") if p.suffix != ".json")
    assert numbered == ["UPM_001.Nii", "UPM_002.Nii", "UP_001.NII.GZ", "UP_002.NII.GZ"]
    assert set(np.unique(nib.load(str(tmp_path / "m_001.nii.gz")).get_fdata())) <= {0.0, 1.0}
    code, _, err = run(capsys, "generate-from-mask", "--mask", scan_files["mask"], "-o", tmp_path / "b.nii.gz",
                       "--reference", scan_files["image"], "--model", tiny_bundle.root, "--lesion-guidance", "2.5")
    assert code == 0, err
    ref = nib.load(str(scan_files["image"]))
    out = nib.load(str(tmp_path / "b.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    settings = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert settings["lesion_guidance"] == 2.5 and settings["lesion_fusion"] is False  # (the fallback: eq. 9)
    code, _, err = run(capsys, "generate-from-mask", "--mask", scan_files["mask"], "-o", tmp_path / "d.nii.gz",
                       "--model", tiny_bundle.root, "--lesion-fusion", "--margin", "5", "--dilation", "1")
    assert code == 0, err
    settings = json.loads((tmp_path / "d.json").read_text())["settings"]
    assert settings["lesion_fusion"] is True and settings["margin_mm"] == 5.0 and settings["dilation_mm"] == 1.0
    code, _, err = run(capsys, "generate-from-mask", "--mask", scan_files["mask"], "-o", tmp_path / "c.nii.gz",
                       "--model", tiny_bundle.root, "--lesion-guidance", "11")
    assert code == 2 and "10" in err  # above the range: refused by the parser
    code, _, err = run(capsys, "generate-from-mask", "--mask", scan_files["mask"], "-o", tmp_path / "e.nii.gz",
                       "--model", tiny_bundle.root, "--resample-mask")
    assert code == 2 and "--resample-mask needs --reference" in err and not (tmp_path / "e.nii.gz").exists()
    ref_img = nib.load(str(scan_files["image"]))
    holes = ref_img.get_fdata().astype(np.float32)
    holes[:2] = np.nan  # voxels without a value (outside an SPM bounding box), away from the mask
    nib.save(nib.Nifti1Image(holes, ref_img.affine), str(tmp_path / "holes.nii.gz"))
    code, _, err = run(capsys, "generate-from-mask", "--mask", scan_files["mask"], "-o", tmp_path / "h.nii.gz",
                       "--reference", tmp_path / "holes.nii.gz", "--model", tiny_bundle.root, "--quiet")
    assert code == 0, err  # accepted as heal accepts it, and they stay without a value
    made = nib.load(str(tmp_path / "h.nii.gz")).get_fdata()
    assert np.isnan(made[:2]).all() and np.isfinite(made[2:]).all()
    for name, data, message in (("all", np.ones(ref_img.shape, np.uint8), "covers"),
                                ("corner", np.pad(np.ones((3, 3, 3), np.uint8),
                                                  [(0, n - 3) for n in ref_img.shape]), "outside the brain")):
        nib.save(nib.Nifti1Image(data, ref_img.affine), str(tmp_path / f"{name}.nii.gz"))
        code, _, err = run(capsys, "generate-from-mask", "--mask", tmp_path / f"{name}.nii.gz", "-o",
                           tmp_path / f"{name}_out.nii.gz", "--reference", scan_files["image"],
                           "--model", tiny_bundle.root, "--quiet")
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_an_output_that_would_take_another_output_s_sidecar_is_refused(tiny_bundle, scan_files, tmp_path, capsys,
                                                                        monkeypatch):
    """healed.nii.gz, then healed.mgz in a later run: one healed.json, which described the first output and was
    silently rewritten for the second (the first left without provenance). Refused before the work; the same name
    again is a rerun and replaces both."""
    heal = ["heal", scan_files["image"], "--mask", scan_files["mask"], "--model", tiny_bundle.root, "--device", "cpu",
            "--steps", "2", "--quiet", "-o"]
    first = tmp_path / "healed.nii.gz"
    assert run(capsys, *heal, first)[0] == 0
    sidecar = json.loads((tmp_path / "healed.json").read_text())
    code, _, err = run(capsys, *heal, tmp_path / "healed.mgz")
    assert code == 2 and "describes" in err and str(first) in err, err
    assert not (tmp_path / "healed.mgz").exists() and json.loads((tmp_path / "healed.json").read_text()) == sidecar
    assert run(capsys, *heal, first)[0] == 0  # a rerun under the same name
    # the sidecar records the path as typed, relative to where that run ran: found from another folder too
    monkeypatch.chdir(tmp_path)
    assert run(capsys, *heal, "out/scan.nii.gz")[0] == 0
    monkeypatch.chdir(tmp_path / "out")
    code, _, err = run(capsys, *heal, "scan.mgz")
    assert code == 2 and "describes" in err, err


def test_info_prints_bundle_facts_as_tables(tiny_bundle, capsys):
    code, stdout, _ = run(capsys, "info", "--model", tiny_bundle.root)
    assert code == 0
    assert "tiny-test (tier test)" in stdout and "32 x 40 x 32 voxels at 5 x 5 x 5 mm" in stdout
    assert "unet_brain" in stdout and "Metrics: none recorded" in stdout
    lines = stdout.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["setting"])
    assert header.split()[1:3] == ["heal", "embed"]
    assert next(line for line in lines if line.split()[:1] == ["alpha0"]).split()[1:3] == ["20", "20"]
    assert "{" not in stdout and "alpha0=" not in stdout  # a table for a person, not Python dicts
    code, stdout, _ = run(capsys, "info", "--model", tiny_bundle.root, "--json")
    assert json.loads(stdout)["name"] == "tiny-test"


def test_info_of_the_shipped_model_shows_the_heal_and_embed_tables(capsys):
    code, stdout, _ = run(capsys, "info")
    assert code == 0
    rows = {line.strip().split("  ")[0]: line.split() for line in stdout.splitlines() if line.startswith("  ")}
    assert {"biharmonic inpainting", "USB (bundle defaults)"} <= set(rows)
    assert 10 < float(rows["biharmonic inpainting"][2]) < 40  # its lesion PSNR in dB, a number in its column
    assert "lesion PSNR dB" in stdout and "location Dice" in stdout and "NCC" in stdout


def test_info_of_a_bundle_with_odd_metrics_or_fields_is_a_description_or_one_line(tiny_bundle, tmp_path, capsys):
    """A bundle.json that is valid JSON with a field missing or of another type: ``usb info`` still describes the
    model (metrics it cannot read are one line), and what a model needs (the latent scale, the file list, the grid)
    is refused by the loader as a one-line error, exit 2; both were internal errors, exit 1."""
    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(tiny_bundle.root, folder)
        config = json.loads((folder / "bundle.json").read_text())
        change(config)
        (folder / "bundle.json").write_text(json.dumps(config))
        return folder

    odd = variant("odd", lambda c: c.update(metrics={"generation": {"unconditional": {"lesions": {"in_tissue": 0.9}},
                                                                     "from_mask": {"dice": None}}},
                                            training=["a list"]))
    code, stdout, err = run(capsys, "info", "--model", odd)
    assert code == 0 and "tiny-test (tier test)" in stdout, err
    assert "does not read" in stdout or "nan" in stdout
    for name, change, message in [
            ("noscale", lambda c: c["latent"].pop("scale_factor"), "scale_factor"),
            ("fileslist", lambda c: c.update(files=list(c["files"])), "'files'"),
            ("shape0", lambda c: c["model_space"].update(shape=[0, 40, 32]), "positive whole numbers"),
            ("defaults", lambda c: c["defaults"].update(generate="x"), "default settings")]:
        code, _, err = run(capsys, "info", "--model", variant(name, change))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)


def test_info_piped_into_a_reader_that_stops_early_is_quiet():
    """``usb info --json | head -1``: the reader closes the pipe before usb writes; that printed 'internal error:
    BrokenPipeError'. No message now; the exit status still says the output did not all get out (a batch piped into
    ``head`` stops part-way)."""
    proc = subprocess.Popen([sys.executable, "-m", "USBLib.apps.cli", "info", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.decode().strip() == "", err.decode()


def _write(path, data, affine=np.eye(4) * 3):
    affine = affine.copy()
    affine[3, 3] = 1
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"), ("corrupt", "cannot read"), ("2d", "3D volume"), ("4d", "3D volume"),
    ("nan", "covers 1 voxel without a value"), ("allnan", "no voxel with a value"), ("constant", "constant"),
    ("empty_mask", "mask is empty"),
    ("nonbinary", "not binary"), ("grid", "different grid"), ("outside", "outside the brain"),
    ("same_path", "same file as input"), ("foreign_sidecar", "USB did not write"),
    ("shared_sidecar", "share one sidecar"), ("negative_seed", "--seed"), ("bad_threads", "USB_THREADS"),
    ("tampered", "checksum mismatch"), ("bad_setting", "strength"),
    ("no_model", "neither a bundle folder"), ("bad_device", "unknown device"), ("no_name", "no name"),
    ("in_model", "inside the model's folder"), ("nan_threshold", "--mask-threshold: must be a number above 0")])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, message, tiny_bundle, scan_files, tmp_path, capsys,
                                                            monkeypatch):
    image, mask = scan_files["image"], scan_files["embed"]
    ref = nib.load(str(image))
    model = tiny_bundle.root
    out = tmp_path / "out.nii.gz"
    extra = []
    if case == "missing":
        image = tmp_path / "nope.nii.gz"
    elif case == "corrupt":
        image = tmp_path / "bad.nii.gz"
        image.write_bytes(b"\x1f\x8bgarbage")
    elif case == "2d":
        image = _write(tmp_path / "2d.nii.gz", np.ones((20, 20), np.float32))
    elif case == "4d":
        image = _write(tmp_path / "4d.nii.gz", np.ones((8, 8, 8, 2), np.float32))
    elif case == "nan":  # a voxel without a value inside the lesion (elsewhere they are kept: test_editor)
        data = ref.get_fdata().astype(np.float32)
        data[tuple(np.argwhere(nib.load(str(mask)).get_fdata() > 0)[0])] = np.nan
        image = _write(tmp_path / "nan.nii.gz", data, ref.affine)
    elif case == "allnan":
        image = _write(tmp_path / "nan.nii.gz", np.full(ref.shape, np.nan, np.float32), ref.affine)
    elif case == "constant":
        image = _write(tmp_path / "c.nii.gz", np.full(ref.shape, 5, np.int16), ref.affine)
    elif case == "empty_mask":
        mask = _write(tmp_path / "m.nii.gz", np.zeros(ref.shape, np.uint8), ref.affine)
    elif case == "nonbinary":
        soft = nib.load(str(mask)).get_fdata().astype(np.float32)
        soft[soft > 0] = np.linspace(0.2, 1.0, int((soft > 0).sum()))  # a probability map: refused, not guessed
        mask = _write(tmp_path / "m.nii.gz", soft, ref.affine)
    elif case == "grid":
        mask = _write(tmp_path / "m.nii.gz", np.ones((10, 10, 10), np.uint8), ref.affine)
    elif case == "outside":
        data = np.zeros(ref.shape, np.uint8)
        data[:3, :3, :3] = 1
        mask = _write(tmp_path / "m.nii.gz", data, ref.affine)
    elif case == "same_path":
        out = image
    elif case == "shared_sidecar":  # out.nii.gz and out.nii: one out.json for both
        extra = ["--uncertainty", str(tmp_path / "out.nii")]
    elif case == "negative_seed":
        extra = ["--seed", "-1"]
    elif case == "bad_threads":
        monkeypatch.setenv("USB_THREADS", "0")
    elif case == "foreign_sidecar":  # a scanner's sidecar where the output's would go
        (tmp_path / "out.json").write_text('{"Modality": "MR", "RepetitionTime": 2.3}')
    elif case == "tampered":
        model = tmp_path / "bundle"
        shutil.copytree(tiny_bundle.root, model)
        with open(model / "autoencoder.safetensors", "r+b") as fh:
            fh.seek(-4, 2)
            fh.write(b"\x00\x01\x02\x03")
    elif case == "bad_setting":
        extra = ["--strength", "2"]
    elif case == "no_model":
        model = tmp_path / "no_such_bundle"
    elif case == "bad_device":
        extra = ["--device", "tpu"]
    elif case == "nan_threshold":  # NaN made every voxel background ("the lesion mask is empty"); 0 every one lesion
        extra = ["--mask-threshold", "nan"]
    elif case == "no_name":  # a file type only: refused before the work, not after it
        out = tmp_path / ".nii.gz"
    elif case == "in_model":  # writing over the bundle's template would break every later run
        model = tmp_path / "bundle"
        shutil.copytree(tiny_bundle.root, model)
        out = model / "template.nii.gz"
        before_model = out.read_bytes()
    before = image.read_bytes() if image.exists() else None
    code, _, err = run(capsys, "embed", image, "--mask", mask, "-o", out, "--model", model, "--quiet", *extra)
    assert code == 2
    assert re.match(r"usb( embed)?: error:", err) and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    if case not in ("same_path", "in_model"):
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    if before is not None:
        assert image.read_bytes() == before  # input untouched
    if case == "foreign_sidecar":
        assert json.loads((tmp_path / "out.json").read_text())["Modality"] == "MR"
    if case == "in_model":
        assert out.read_bytes() == before_model


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "heal")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    code, _, err = run(capsys, "embed", "x.nii.gz", "-o", "y.nii.gz")
    assert code == 2 and "--mask" in err


def test_ctrl_c_leaves_no_output(tiny_bundle, scan_files, tmp_path, capsys, monkeypatch):
    from USBLib.editor import editor as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Editor, "_edit", interrupted)
    out = tmp_path / "o.nii.gz"
    code, _, err = run(capsys, "heal", scan_files["image"], "-o", out, "--model", tiny_bundle.root)
    assert code == 130 and "cancelled" in err and not out.exists()


def test_internal_failure_exits_1_without_traceback(tiny_bundle, scan_files, tmp_path, capsys, monkeypatch):
    from USBLib.editor import editor as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline.Editor, "_edit", broken)
    code, _, err = run(capsys, "heal", scan_files["image"], "-o", tmp_path / "o.nii.gz", "--model", tiny_bundle.root)
    assert code == 1 and "internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_demo_without_default_model_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bundle_mod, "DEFAULT_POINTER", tmp_path / "DEFAULT")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 2 and "no default model is installed" in err
    assert not (tmp_path / "demo").exists()


def test_demo_runs_on_sample_with_given_model(tiny_bundle, tmp_path, capsys):
    code, stdout, err = run(capsys, "demo", "-o", tmp_path / "demo", "--model", tiny_bundle.root, "--quiet")  # -o: as heal's
    assert code == 0, err
    for name in ("sample_healed.nii.gz", "sample_embedded.nii.gz", "montage.png", "closeup.png", "sample_healed.json"):
        assert (tmp_path / "demo" / name).is_file()
    assert "montage" in stdout and "closeup" in stdout
    from PIL import Image

    assert Image.open(tmp_path / "demo" / "montage.png").size[0] > 300
    assert Image.open(tmp_path / "demo" / "closeup.png").size[1] > 200  # two rows of lesion close-ups


def test_a_heal_with_an_empty_mask_exits_2_and_writes_nothing(tiny_bundle, scan_files, tmp_path, capsys):
    """``--mask`` that marks no lesion: refused, not a whole-brain heal (which is what leaving out ``--mask`` asks)."""
    ref = nib.load(str(scan_files["image"]))
    mask = _write(tmp_path / "m.nii.gz", np.zeros(ref.shape, np.uint8), ref.affine)
    code, _, err = run(capsys, "heal", scan_files["image"], "--mask", mask, "-o", tmp_path / "out.nii.gz",
                       "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and err.strip() == "usb: error: the lesion mask is empty: there is no lesion to heal (without " \
        "a mask a heal edits the whole brain)"
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "out.json").exists()


def test_demo_into_a_file_is_refused_before_the_work(tiny_bundle, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "demo", "-o", tmp_path / "afile", "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and "it is a file, not a folder" in err and err.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "x"
    # a folder where one of its files goes: refused before the work too (it failed after both edits)
    import USBLib.editor.editor as editor_module

    (tmp_path / "demo" / "montage.png").mkdir(parents=True)

    def never(*args, **kwargs):
        raise AssertionError("the demo started its work")

    monkeypatch.setattr(editor_module.Editor, "heal", never)
    code, _, err = run(capsys, "demo", "-o", tmp_path / "demo", "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and "montage.png: it is a folder" in err and err.count("\n") == 1


def test_a_command_whose_later_output_cannot_be_written_leaves_none_of_its_outputs(tiny_bundle, tmp_path, capsys,
                                                                                   monkeypatch):
    """``generate --n 2`` writes four files: when the third cannot be written (a full disk, here simulated), the two
    already written go too, with their sidecars, and the command says so with exit 2."""
    import USBLib.apps.cli as cli
    from USBLib.errors import OutputError

    real, calls = cli.write_result, []

    def failing_third(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OutputError(f"cannot write {path}: No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cli, "write_result", failing_third)
    new = tmp_path / "new" / "folders"  # made by the first writes: gone with them
    code, _, err = run(capsys, "generate", "-o", new / "g.nii.gz", "--mask-out", new / "m.nii.gz",
                       "--n", "2", "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and "No space left" in err and len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_console_script_runs_as_a_process(tiny_bundle):
    proc = subprocess.run([sys.executable, "-m", "USBLib.apps.cli", "info", "--model", str(tiny_bundle.root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "tiny-test" in proc.stdout
    # a bad input is refused before the engine (torch: seconds to import) loads
    run = "import sys; from USBLib.apps.cli import main; code = main(sys.argv[1:]); print('torch' in sys.modules); " \
          "sys.exit(code)"
    proc = subprocess.run([sys.executable, "-c", run, "heal", "missing.nii.gz", "-o", "x.nii.gz",
                           "--model", str(tiny_bundle.root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "usb: error: input image file not found: missing.nii.gz"
    assert proc.stdout.strip() == "False"


def test_an_nhdr_output_may_not_replace_the_data_file_of_an_nhdr_input(tiny_bundle, scan_files, tmp_path, capsys):
    """``scan.nhdr`` whose data file is ``healed.raw.gz``: ``-o healed.nhdr`` writes ``healed.raw.gz`` too, and the
    input would then read as the healed scan. Refused before the work, the input's files untouched."""
    from USBLib.imaging.io import write_volume

    ref = nib.load(str(scan_files["image"]))
    header = write_volume(tmp_path / "scan.nhdr", np.asarray(ref.dataobj), ref.affine)
    (tmp_path / "scan.raw.gz").rename(tmp_path / "healed.raw.gz")
    header.write_text(header.read_text().replace("data file: scan.raw.gz", "data file: healed.raw.gz"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, _, err = run(capsys, "heal", header, "--mask", scan_files["mask"], "-o", tmp_path / "healed.nhdr",
                       "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and "would replace" in err and "healed.raw.gz, the data file of input" in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_no_abbreviated_option_a_numbered_name_and_a_too_long_name_are_refused_in_one_line(tiny_bundle, scan_files,
                                                                                           tmp_path, capsys):
    """`generate --mask M` was read as `--mask-out M` (argparse's abbreviations) and replaced the user's mask with a
    generated one; `generate -o sub/.nii.gz --n 2` wrote '_001.nii.gz' (the no-name check ran after numbering); a
    name too long for the file system was an internal error (exit 1)."""
    mask = scan_files["mask"]
    before = mask.read_bytes()
    code, _, err = run(capsys, "generate", "--mask", mask, "--mask-out", tmp_path / "m.nii.gz", "-o",
                       tmp_path / "g.nii.gz", "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and "unrecognized arguments: --mask" in err and mask.read_bytes() == before, err
    code, _, err = run(capsys, "generate", "-o", tmp_path / "sub" / ".nii.gz", "--mask-out", tmp_path / "m.nii.gz",
                       "--n", "2", "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and "has a file type but no name" in err and not (tmp_path / "sub").exists(), err
    long = tmp_path / ("x" * 300 + ".nii.gz")
    code, _, err = run(capsys, "embed", scan_files["image"], "--mask", scan_files["embed"], "-o", long,
                       "--model", tiny_bundle.root, "--quiet")
    assert code == 2 and err.startswith("usb: error: cannot write") and err.count("\n") == 1, err
