"""Checkpoint format: roundtrips, weights-only loading, atomic writes, backbone loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiteacher.checkpoint import (
    CheckpointError,
    load_restorer,
    load_training_state,
    read_model_file,
    save_model_file,
    save_training_state,
)
from qualiteacher.config import ModelConfig
from qualiteacher.method.ema import EMA
from qualiteacher.models.build import build_model


def tiny_cfg(condition: bool = True, arch: str = "nafnet") -> ModelConfig:
    return ModelConfig(arch=arch, width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1],
                       score_condition=condition)


def perturbed(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def only_files(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("arch", ["nafnet", "unet"])
def test_model_file_roundtrip(tmp_path, arch):
    cfg = tiny_cfg(arch=arch)
    model = perturbed(cfg)
    path = save_model_file(tmp_path / "m.pt", model, cfg, extra={"steps": 3, "final_loss": 0.5, "task": "haze"})
    loaded, loaded_cfg = load_restorer(path)
    assert loaded_cfg == cfg
    assert not loaded.training
    assert_same_weights(model, loaded)
    raw = torch.load(path, weights_only=True)  # the plain weights-only loader reads it
    assert raw["format"] == "qualiteacher-model/1" and raw["steps"] == 3 and raw["task"] == "haze"
    assert read_model_file(path)["final_loss"] == 0.5
    assert only_files(tmp_path) == ["m.pt"]  # no temp files left


def test_extra_must_be_plain(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(TypeError, match="extra values"):
        save_model_file(tmp_path / "m.pt", build_model(cfg), cfg, extra={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="reserved"):
        save_model_file(tmp_path / "m.pt", build_model(cfg), cfg, extra={"model": "x"})
    assert only_files(tmp_path) == []


class Arbitrary:
    """Unpickling this needs code execution, which weights_only must refuse."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_object_is_refused(tmp_path):
    cfg = tiny_cfg()
    path = tmp_path / "evil.pt"
    torch.save({"format": "qualiteacher-model/1", "model": build_model(cfg).state_dict(),
                "model_config": cfg.model_dump(mode="json"), "payload": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_restorer(path)


def test_garbage_and_foreign_files_name_the_path(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_restorer(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a QualiTeacher checkpoint"):
        load_restorer(foreign)
    with pytest.raises(CheckpointError, match="expected a model .pt file"):
        load_restorer(tmp_path)  # a folder with none of the known layouts
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_restorer(tmp_path / "missing.pt")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    old = perturbed(cfg, seed=1)
    path = save_model_file(tmp_path / "m.pt", old, cfg)

    def half_then_crash(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_model_file(path, perturbed(cfg, seed=2), cfg)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path / "run", student_state={}, ema_state={}, optimizer_state={},
                            step=1, teacher_version=0, model_cfg=cfg)
    monkeypatch.undo()
    assert only_files(tmp_path) == ["m.pt", "run"]
    assert only_files(tmp_path / "run") == []
    loaded, _ = load_restorer(path)
    assert_same_weights(old, loaded)


def make_training_state(directory, cfg: ModelConfig, seed: int = 3):
    student = perturbed(cfg, seed=seed)
    ema = EMA(student, decay=0.5)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    loss = student(torch.rand(2, 3, 16, 16), torch.tensor([3.0, 7.0])).abs().mean()
    loss.backward()
    opt.step()
    ema.update(student)
    save_training_state(directory, student_state=student.state_dict(),
                                    ema_state=ema.state_dict(), optimizer_state=opt.state_dict(),
                                    step=12, teacher_version=4, model_cfg=cfg)
    return student, ema, opt, directory


def test_training_state_roundtrip(tmp_path):
    cfg = tiny_cfg()
    directory = tmp_path / "ckpt"
    student, ema, opt, _ = make_training_state(directory, cfg)
    assert only_files(directory) == ["meta.json", "state.pt"]
    assert json.loads((directory / "meta.json").read_text()) == {
        "format": "qualiteacher-state/1", "step": 12, "teacher_version": 4}
    torch.load(directory / "state.pt", weights_only=True)  # plain weights-only load works
    state = load_training_state(directory)
    assert state["step"] == 12 and state["teacher_version"] == 4 and state["model_config"] == cfg

    opt2 = torch.optim.Adam(build_model(cfg).parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    ema2 = EMA(build_model(cfg), decay=0.9)
    ema2.load_state_dict(state["ema"])
    assert ema2.decay == 0.5 and ema2.step == 1

    s_model, _ = load_restorer(directory, prefer="student")
    t_model, _ = load_restorer(directory, prefer="teacher")
    assert_same_weights(student, s_model)
    assert_same_weights(ema.teacher, t_model)


def test_run_folder_layouts(tmp_path, monkeypatch):
    from qualiteacher.run_dir import TRAIN_RUN_NAME, RunDir

    cfg = tiny_cfg()
    # The train job's layout, run from another folder with a relative --run-dir: its
    # summary.json names the newest Ray Train checkpoint, and the run folder loads it.
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    older = make_training_state(run / "ray_train" / TRAIN_RUN_NAME / "checkpoint_000000", cfg, seed=1)[-1]
    os.utime(older, (1, 1))  # newest by mtime, as Ray Train writes them
    student, *_ = make_training_state(run / "ray_train" / TRAIN_RUN_NAME / "checkpoint_000001", cfg)
    newest = RunDir(Path("run")).latest_checkpoint()
    assert newest == run / "ray_train" / TRAIN_RUN_NAME / "checkpoint_000001"
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(newest)}))
    assert_same_weights(student, load_restorer(Path("run"))[0])

    other = tmp_path / "run2"
    other.mkdir()
    save_model_file(other / "final.pt", student, cfg)
    (other / "summary.json").write_text(json.dumps({"checkpoint": "final.pt", "steps": 5}))
    assert_same_weights(student, load_restorer(other)[0])


def test_ddp_prefixed_student_state_loads(tmp_path):
    cfg = tiny_cfg()
    student = perturbed(cfg)
    wrapped = {f"module.{k}": v for k, v in student.state_dict().items()}
    save_training_state(tmp_path, student_state=wrapped, ema_state={"teacher": student.state_dict()},
                        optimizer_state={}, step=0, teacher_version=0, model_cfg=cfg)
    assert_same_weights(student, load_restorer(tmp_path)[0])


def test_unconditioned_file_into_conditioned_model(tmp_path):
    plain_cfg, cond_cfg = tiny_cfg(condition=False), tiny_cfg(condition=True)
    backbone = perturbed(plain_cfg)
    path = save_model_file(tmp_path / "backbone.pt", backbone, plain_cfg)
    model, used_cfg = load_restorer(path, model_cfg=cond_cfg)
    assert used_cfg.score_condition and hasattr(model, "score_injection")
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        reference = backbone.eval()(x)
        for score in (2.0, 7.0):  # zero-init injection: outputs equal the backbone's
            assert torch.equal(model(x, score), reference)
    with pytest.raises(CheckpointError, match="width"):
        load_restorer(path, model_cfg=cond_cfg.model_copy(update={"width": 16}))


def test_cli_restore_weights_picks_student_or_ema_teacher(tmp_path):
    """`qualiteacher restore --weights teacher` restores with the EMA teacher of a training
    state, the default with the student; the two differ, so each output names its source."""
    from qualiteacher.pipelines.cli import main

    from qualiteacher.imageio import read_image, write_png

    cfg = tiny_cfg()
    directory = tmp_path / "ckpt"
    student, ema, _, _ = make_training_state(directory, cfg)
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    rng = np.random.default_rng(0)
    write_png(in_dir / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    x = torch.from_numpy(read_image(in_dir / "a.png")).permute(2, 0, 1)[None].float() / 255
    outputs = {}
    for weights, model in (("student", student), ("teacher", ema.teacher)):
        out_dir = tmp_path / weights
        assert main(["restore", "--checkpoint", str(directory), "--weights", weights, "--score", "5",
                     str(in_dir), str(out_dir)]) == 0
        outputs[weights] = read_image(out_dir / "a.png")
        with torch.no_grad():
            expected = (model.eval()(x, 5.0).clamp(0, 1)[0].permute(1, 2, 0) * 255).round().byte().numpy()
        assert np.abs(outputs[weights].astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(outputs["student"], outputs["teacher"])
