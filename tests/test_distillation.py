"""Label-free QAT by distillation: the loss, the Distiller in a plain loop, ImageClassifier in
Lightning without labels, and unlabeled image folders."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qat_plugin import QuantConfigError, QuantSimModel
from qat_plugin.callbacks import QuantizationAwareTraining
from qat_plugin.data import DigitsDataModule, ImageFolderDataModule
from qat_plugin.distillation import Distiller, distillation_loss, frozen_teacher
from qat_plugin.models import ImageClassifier

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
              pytest.mark.filterwarnings("ignore:.*left in float.*"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*")]


class TinyNet(nn.Module):
    """Importable by class path (``test_distillation.TinyNet``) for ImageClassifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_loss_is_scaled_kl_in_float64(temperature):
    s, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    p = F.softmax(t / temperature, 1)
    ref = (p * (p.log() - F.log_softmax(s / temperature, 1))).sum(1).mean() * temperature**2
    torch.testing.assert_close(distillation_loss(s, t, temperature).double(), ref, rtol=1e-6, atol=1e-7)
    assert float(distillation_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-6)
    y = torch.randint(0, 5, (8,))
    with_task = distillation_loss(s, t, temperature, targets=y, task_weight=0.5)
    torch.testing.assert_close(with_task.double(), ref + 0.5 * F.cross_entropy(s, y), rtol=1e-6, atol=1e-7)
    with pytest.raises(QuantConfigError, match="temperature"):
        distillation_loss(s, t, 0.0)


def test_distiller_without_labels_lowers_kl_of_a_quantized_student():
    """Given a W4A8 sim of a network and its frozen FP32 teacher, a few label-free SGD steps on
    the distillation loss lower the KL, and the teacher does not move."""
    net = TinyNet().eval()
    x = torch.randn(64, 3, 8, 8)
    sim = QuantSimModel(net, x[:8], default_param_bw=4, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x))
    distiller = Distiller(net, temperature=2.0)
    teacher_state = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        before = float(distiller.loss(sim.model(x), x))
    for _ in range(30):
        loss = distiller.loss(sim.model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(distiller.loss(sim.model(x), x))
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, teacher_state[k]) for k, v in distiller.teacher.state_dict().items())


def test_frozen_teacher_of_a_sim_is_its_fp32_twin():
    net = TinyNet().eval()
    x = torch.randn(4, 3, 8, 8)
    sim = QuantSimModel(net, x, default_param_bw=4, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x))
    teacher = frozen_teacher(sim.model)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(sim.model(x), net(x), atol=1e-3)  # the student stays quantized


def test_image_classifier_distills_without_labels_in_lightning(tmp_path):
    """Given training batches without labels, ImageClassifier(distillation=...) with the QAT
    callback trains on the teacher's outputs; the teacher is outside the checkpointed state."""
    torch.manual_seed(0)
    model = ImageClassifier("test_distillation.TinyNet", lr=0.01, distillation={"temperature": 4.0})
    dm = DigitsDataModule(image_size=8, batch_size=32, labels=False)
    qat = QuantizationAwareTraining(quant_scheme="tf", default_param_bw=4, calibration_batches=2)
    trainer = pl.Trainer(max_steps=4, callbacks=[qat], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path)
    first = next(iter(dm.train_dataloader()))
    assert len(first) == 1  # images only
    trainer.fit(model, datamodule=dm)
    assert model.distiller is not None and trainer.callback_metrics["train_kd_loss"] >= 0
    assert not any(k.startswith("distiller") or "teacher" in k for k in model.state_dict())
    with pytest.raises(QuantConfigError, match="no labels"):
        ImageClassifier("test_distillation.TinyNet").training_step((first[0],), 0)
    with pytest.raises(QuantConfigError, match="Did you mean 'temperature'"):
        ImageClassifier("test_distillation.TinyNet", distillation={"temprature": 2.0})


def test_unlabeled_image_folder_gives_images_only(tmp_path):
    from PIL import Image

    (tmp_path / "any").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 10), (i * 40, 10, 200)).save(tmp_path / ("any" if i else ".") / f"im{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2, unlabeled=True)
    batches = list(dm.train_dataloader())
    assert [len(b) for b in batches] == [1, 1] and batches[0][0].shape == (2, 3, 8, 8)
    assert sum(b[0].shape[0] for b in batches) == 3
