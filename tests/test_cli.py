"""The qat-plugin command, recipes and data modules."""
import glob
import os

import pytest
import torch
import yaml

from qat_plugin.cli import main
from qat_plugin.data import DigitsDataModule, ImageFolderDataModule

# Lightning and torch.export warn a lot on tiny CPU runs; these tests check results, not warnings
pytestmark = pytest.mark.filterwarnings("ignore")
RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml")))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_there_are_recipes():
    names = {os.path.basename(r) for r in RECIPES}
    assert {"quickstart.yaml", "resnet18_w8a8.yaml", "mobilenet_v2_w4a8.yaml", "resnet18_w8a16.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_runs_briefly(recipe, tmp_path):
    cfg = yaml.safe_load(open(recipe))
    ptq = cfg["trainer"]["callbacks"][0]["init_args"].get("ptq")
    if isinstance(ptq, dict) and ptq.get("adaround"):  # AdaRound's 200 iterations per layer are not what runs here
        ptq["adaround"] = {**(ptq["adaround"] if isinstance(ptq["adaround"], dict) else {}),
                           "num_iterations": 2, "rows": 64}
        recipe = str(tmp_path / os.path.basename(recipe))
        yaml.safe_dump(cfg, open(recipe, "w"))
    main(["fit", "--config", recipe, "--trainer.fast_dev_run", "2", "--model.init_args.fp32_warmup_epochs", "0",
          "--report", "false", "--trainer.default_root_dir", str(tmp_path)] + QUIET)


def test_quickstart_main_job_prints_the_table(tmp_path, capsys):
    """A shortened main job: warm-up, calibrate, QAT with annealing, export, ORT check, table."""
    main(["fit", "--config", RECIPES[[os.path.basename(r) for r in RECIPES].index("quickstart.yaml")],
          "--model.init_args.fp32_warmup_epochs", "0", "--trainer.max_steps", "6", "--trainer.max_epochs", "1",
          "--trainer.default_root_dir", str(tmp_path), "--report_dir", str(tmp_path / "export")] + QUIET)
    out = capsys.readouterr().out
    for row in ("FP32", "PTQ", "QAT", "ONNX Runtime (exported file)", "ORT vs simulation", "ONNX size FP32 / INT8",
                "ORT latency FP32 / INT8"):
        assert row in out, row
    assert os.path.exists(tmp_path / "export" / "model.onnx") and os.path.exists(tmp_path / "export" / "report.md")
    assert glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.out.tfevents.*"))


def test_export_and_verify_subcommands_from_a_checkpoint(tmp_path, capsys):
    recipe = str(tmp_path / "r.yaml")
    cfg = yaml.safe_load(open(RECIPES[[os.path.basename(r) for r in RECIPES].index("resnet18_w8a8.yaml")]))
    cfg["model"]["init_args"]["fp32_warmup_epochs"] = 0
    cfg["trainer"].update(max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          limit_val_batches=1)
    yaml.safe_dump(cfg, open(recipe, "w"))
    main(["fit", "--config", recipe, "--report", "false"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    main(["export", recipe, ckpt, "--out_dir", str(tmp_path / "out"), "--prefix", "r18"])
    assert {"r18.onnx", "r18.encodings", "r18_fp32.onnx"} <= set(os.listdir(tmp_path / "out"))
    capsys.readouterr()
    main(["verify", str(tmp_path / "out" / "r18.onnx"), "--n", "16", "--min_sqnr", "30"])
    assert "logit SQNR" in capsys.readouterr().out


def test_bad_recipe_field_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(open(RECIPES[0]))
    cfg["trainer"]["callbacks"][0]["init_args"]["quant_schem"] = "tf"
    yaml.safe_dump(cfg, open(recipe, "w"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe)])
    assert "quant_schem" in capsys.readouterr().err


def test_bad_model_name_suggests(tmp_path):
    from qat_plugin.errors import QuantConfigError
    from qat_plugin.models import ImageClassifier
    with pytest.raises(QuantConfigError, match="Did you mean 'resnet18'"):
        ImageClassifier(model="resnet81")


def test_fp32_checkpoint_is_loaded(tmp_path):
    from qat_plugin.models import ImageClassifier
    a = ImageClassifier(model="resnet18")
    torch.save(a.model.state_dict(), tmp_path / "w.pt")
    b = ImageClassifier(model="resnet18", fp32_checkpoint=str(tmp_path / "w.pt"))
    assert torch.equal(a.model.fc.weight, b.model.fc.weight)


def test_digits_datamodule_shapes():
    dm = DigitsDataModule(image_size=16, channels=1, batch_size=8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and y.dtype == torch.long
    # round(1797 * 0.2) = 359 validation images, 1438 training images
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 359
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 1438


def test_image_folder_datamodule_on_generated_images(tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=16, batch_size=4)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and dm.num_classes == 2
    assert len(dm.val_dataloader().dataset) == 8
    split = ImageFolderDataModule(str(tmp_path / "train"), image_size=8, val_fraction=0.25)
    split.setup()
    assert len(split.val_dataloader().dataset) == 2
    with pytest.raises(FileNotFoundError):
        ImageFolderDataModule(str(tmp_path / "nope"))


def test_ptq_steps_run_once_and_their_report_is_kept(tmp_path, capsys, monkeypatch):
    """A recipe with ptq= runs AdaRound and bias correction once (in the callback, not again on a
    copy for the report), prints the "PTQ + ..." accuracy and AdaRound's table, and saves
    ptq_report.txt (the export after it is another test's: stopped here)."""
    import qat_plugin.ptq.pipeline as pipeline
    from qat_plugin.quantsim import QuantSimModel

    calls = {"adaround": 0, "bias_correction": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pipeline, "apply_adaround", spy("adaround", pipeline.apply_adaround))
    monkeypatch.setattr(pipeline, "correct_bias", spy("bias_correction", pipeline.correct_bias))
    monkeypatch.setattr(QuantSimModel, "export", stop)
    cfg = yaml.safe_load(open(RECIPES[[os.path.basename(r) for r in RECIPES].index("resnet18_w8a8.yaml")]))
    cfg["model"]["init_args"]["fp32_warmup_epochs"] = 0
    cfg["data"]["init_args"]["image_size"] = 16
    qat_args = cfg["trainer"]["callbacks"][0]["init_args"]
    qat_args.update(calibration_batches=1, ptq={"adaround": {"num_iterations": 2, "rows": 64, "progress": False},
                                                "bias_correction": {"progress": False}})
    qat_args.pop("annealing", None)
    cfg["trainer"].update(max_steps=1, max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=1, logger=False, enable_checkpointing=False)
    recipe = tmp_path / "ptq.yaml"
    yaml.safe_dump(cfg, open(recipe, "w"))
    with pytest.raises(Stop):
        main(["fit", "--config", str(recipe), "--report_dir", str(tmp_path / "export")])
    assert calls == {"adaround": 1, "bias_correction": 1}
    out = capsys.readouterr().out
    assert "PTQ + AdaRound + bias correction: " in out and "MSE nearest" in out
    text = open(tmp_path / "export" / "ptq_report.txt").read()
    assert "AdaRound: 21 layers" in text and "bias correction: 21 layers" in text
