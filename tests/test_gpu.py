"""CUDA code paths, checked against the CPU on the same inputs and weights.

Marked `gpu` and left out of the default suite (`pytest -m gpu` runs them on a machine with
CUDA; `benchmarks/gpu_check.sh` runs them with the speed benchmarks on a lent GPU). Nothing
here needs Ray: the core that the actors wrap is what runs on the GPU. Tolerances: the metrics
and the model run in float32 on both devices (NIQE in float64); cuDNN picks other algorithms
than the CPU, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiteacher.config import load_config
from qualiteacher.flat_weights import flatten

# The device under test; QUALITEACHER_TEST_ACCEL=cpu dry-runs these checks (CPU against CPU)
# on a machine without CUDA, so a broken check is found before a GPU is lent.
ACCEL = os.environ.get("QUALITEACHER_TEST_ACCEL", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ACCEL == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device(ACCEL)
DEVICES = {"ref": "cpu", "accel": ACCEL}  # every check runs on both and compares
METRICS = {"brisque": 0.4, "niqe": 0.3, "piqe": 0.3}


def _photos(n: int, size: int) -> torch.Tensor:
    from benchmarks.common import sample_images, to_batch

    return to_batch(sample_images(n, size))


def _model(cfg, seed: int = 0):
    from qualiteacher.models.build import build_model
    from qualiteacher.models.injection import injection_parameters

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # non-zero injection, so the score condition changes the output
        for p in injection_parameters(model).values():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def ensembles(weights_dir):
    from qualiteacher.iqa.ensemble import IQAEnsemble

    return {k: IQAEnsemble(METRICS, weights_dir, d, max_batch_pixels=82944) for k, d in DEVICES.items()}


def test_ensemble_and_block_scores_match_cpu(ensembles):
    x = _photos(4, 192)
    cpu, gpu = ensembles["ref"], ensembles["accel"]
    assert gpu.device.type == ACCEL and all(
        p.device.type == ACCEL for m in gpu.models.values() for p in m.buffers())
    norm_c, norm_g = cpu.normalize(cpu.raw_scores(x)), gpu.normalize(gpu.raw_scores(x.to(CUDA)))
    # On the 0-1 scale the method uses. BRISQUE looks its shape parameter up in a table with
    # 0.001 steps (argmin), so last-bit differences can move it one step: ~1e-4 here.
    gaps = {name: float((norm_g[name] - norm_c[name]).abs().max()) for name in METRICS}
    assert max(gaps.values()) < 1e-3, gaps
    blocks_g = gpu.block_scores(x.to(CUDA), 2)
    torch.testing.assert_close(blocks_g, cpu.block_scores(x, 2), rtol=1e-3, atol=1e-3)
    # Batched blocks (one call for all) equal blocks scored one call each, on the GPU too.
    one_by_one = torch.stack([gpu.block_scores(x[i:i + 1].to(CUDA), 2)[0] for i in range(x.shape[0])])
    torch.testing.assert_close(blocks_g, one_by_one, rtol=1e-4, atol=1e-4)


def test_one_call_per_metric_matches_capped_calls(ensembles):
    """On a GPU the configs score a batch in one call per metric (`iqa.max_batch_pixels`
    {cuda: null}); the same scores as the CPU's cap of one 288 px image per call."""
    x = _photos(6, 288).to(CUDA)
    capped = ensembles["accel"]
    one_call = copy.copy(capped)
    one_call.max_batch_pixels = None
    # On the method's 0-1 scale, as above (batch size changes the rounding: BRISQUE ~1e-4).
    whole, chunked = one_call.normalize(one_call.raw_scores(x)), capped.normalize(capped.raw_scores(x))
    gaps = {name: float((whole[name] - chunked[name]).abs().max()) for name in METRICS}
    assert max(gaps.values()) < 1e-3, gaps
    torch.testing.assert_close(one_call.block_scores(x, 3), capped.block_scores(x, 3), rtol=1e-4, atol=1e-4)


def test_reward_and_its_gradient_match_cpu(ensembles):
    x = _photos(2, 128)
    grads, values = {}, {}
    for key, ensemble in ensembles.items():
        xd = x.clone().to(DEVICES[key]).requires_grad_(True)
        q = ensemble.reward(xd)
        q.sum().backward()
        values[key], grads[key] = q.detach().cpu(), xd.grad.cpu()
    assert torch.isfinite(grads["accel"]).all() and grads["accel"].abs().sum() > 0
    torch.testing.assert_close(values["accel"], values["ref"], rtol=1e-3, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(grads["accel"].flatten(), grads["ref"].flatten(), dim=0)
    assert cos > 0.999, float(cos)


def test_teacher_pseudo_labels_match_cpu():
    from qualiteacher.services.teacher import TeacherWorker

    cfg = load_config(REPO / "configs/quickstart.yaml")
    weights = flatten(_model(cfg).state_dict())
    images = (_photos(3, 96).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    out = {}
    for use_gpu in (False, True):
        teacher = TeacherWorker(cfg.model.model_dump(mode="json"), weights, 1, use_gpu=use_gpu)
        assert teacher.device.type == (ACCEL if use_gpu else "cpu")
        out[use_gpu] = teacher.label(images)
    pls_c, finite_c, version_c = out[False]
    pls_g, finite_g, version_g = out[True]
    assert pls_g.shape == pls_c.shape == (3, 3, 96, 96, 3) and version_g == version_c == 1
    assert finite_g.all() and (finite_g == finite_c).all()
    # uint8 PLs: rounding may move a value by one level where float results differ by ~1e-6.
    assert np.abs(pls_g.astype(int) - pls_c.astype(int)).max() <= 1


def test_student_step_on_gpu_matches_cpu(ensembles, monkeypatch):
    """The whole step of the student worker (pixel, Eq. 8, Eq. 9 with the real offline reward)."""
    from qualiteacher.method.bank_batch import BankBatch
    from qualiteacher.models.injection import injection_snapshot
    from qualiteacher.student_step import StepContext, step_losses

    crop = 96
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      [f"data.crop_size={crop}", "loss.preference.warmup_steps=0", "loss.perceptual_weight=0"])
    g = torch.Generator().manual_seed(3)
    photos = _photos(3, crop)
    batch = BankBatch(
        x=photos,
        pl=(photos[:, None] + 0.05 * torch.randn(3, 3, 3, crop, crop, generator=g)).clamp(0, 1),
        weights=0.5 + torch.rand(3, 3, 1, crop, crop, generator=g),
        level=torch.tensor([[7.0, 5.5, 3.0], [6.0, 4.0, 2.5], [4.5, 7.0, 7.0]]),
        mask=torch.tensor([[True, True, True], [True, True, True], [True, False, False]]),
        label_mask=torch.tensor([[True, True, True], [True, True, True], [True, False, False]]),
    )

    class Paired:
        def sample_batch(self, n, size, rng):
            return photos[:2], batch.pl[:2, 0]

    base = _model(cfg)
    results = {}
    # The student's own convolutions in exact float32 here: this checks that the step computes
    # the same function on both devices. (In training the GPU keeps PyTorch's TF32 default.)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for key, device in DEVICES.items():
        model = copy.deepcopy(base).to(device)
        initial = injection_snapshot(model)
        ctx = StepContext(device=torch.device(device), rng=np.random.default_rng(0),
                          gen=torch.Generator().manual_seed(5), reward=ensembles[key].reward,
                          initial_injection=initial)
        losses = step_losses(cfg, model, Paired(), batch.to(device), ctx, step=1)
        losses["total"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[key] = ({k: float(v.detach()) for k, v in losses.items()}, grads.cpu())
    (loss_c, grad_c), (loss_g, grad_g) = results["ref"], results["accel"]
    assert {"pixel", "pref_rank", "pref_anchor", "consistency"} <= set(loss_g)
    # BRISQUE's table lookup (argmin over 0.001 steps) can land one step apart on the two
    # devices: rewards then differ by ~1e-4, and Eq. 8 / 9 terms with them.
    for name, value in loss_c.items():
        assert loss_g[name] == pytest.approx(value, rel=2e-3, abs=5e-4), name
    assert torch.isfinite(grad_g).all()
    cos = torch.nn.functional.cosine_similarity(grad_g, grad_c, dim=0)
    assert cos > 0.999, float(cos)


def test_scorer_worker_on_gpu_gates_the_same_entries(weights_dir, redis_server):
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.scorer import ScorerWorker

    from tests.redis_fixtures import unique_prefix

    photos = (_photos(6, 192).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pls = photos.reshape(2, 3, 192, 192, 3)  # two images, three PLs each
    entries = {}
    for key, device in DEVICES.items():
        prefix = unique_prefix()
        cfg = load_config(REPO / "configs/smoke.yaml", [f"iqa.device={device}", "drop.enabled=false",
                                                         f"redis.prefix={prefix}"])
        scorer = ScorerWorker(cfg.model_dump(mode="json"), redis_server.url)
        assert scorer.ensemble.device.type == device
        report = scorer.process(["a", "b"], pls, np.ones(2, bool), 1)
        assert report["admitted"] == 6, report
        bank = MemoryBank(redis_server.client(), prefix, 3)
        entries[key] = {i: [(e.label_id, e.ensemble, list(e.weights.values)) for e in bank.entries(i)]
                           for i in ("a", "b")}
        assert bank.check_invariants() == []
        bank.clear()
    for image_id in ("a", "b"):
        for (lc, sc, wc), (lg, sg, wg) in zip(entries["ref"][image_id], entries["accel"][image_id]):
            assert lg == lc and sg == pytest.approx(sc, abs=1e-2)  # 0-10 scale
            np.testing.assert_allclose(wg, wc, rtol=1e-3, atol=1e-3)


def test_pretrain_and_restore_on_gpu(tmp_path):
    from qualiteacher.pipelines.pretrain import pretrain
    from qualiteacher.pipelines.restore import restore_folder

    from qualiteacher.data.degradations import degrade
    from qualiteacher.imageio import read_image, write_png

    rng = np.random.default_rng(0)
    photos = (_photos(4, 96).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    dirs = {name: tmp_path / name for name in ("in", "gt", "out_cpu", "out_gpu")}
    for d in dirs.values():
        d.mkdir()
    for i, clean in enumerate(photos):
        write_png(dirs["gt"] / f"{i}.png", clean)
        write_png(dirs["in"] / f"{i}.png", degrade(clean, "haze", rng, "paired"))
    cfg = load_config(REPO / "configs/smoke.yaml", [f"train.use_gpu={ACCEL == 'cuda'}", "pretrain.steps=3", "pretrain.batch_size=2"])
    lines: list[str] = []
    model_path = pretrain(cfg, dirs["in"], dirs["gt"], tmp_path / "pretrain.pt", log=lines.append)
    assert model_path.is_file() and any(f"device {ACCEL}" in line for line in lines), lines
    for device, out in (("cpu", dirs["out_cpu"]), (ACCEL, dirs["out_gpu"])):
        results = restore_folder(model_path, dirs["in"], out, score=7.0, device=device)
        assert all(error is None for _, error in results), results
    for i in range(len(photos)):
        a = read_image(dirs["out_cpu"] / f"{i}.png").astype(int)
        b = read_image(dirs["out_gpu"] / f"{i}.png").astype(int)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("name", ["iqa_throughput", "student_throughput"])
def test_speed_benchmarks_run_on_gpu(name, capsys, weights_dir):
    import importlib

    from benchmarks.common import parse_result

    module = importlib.import_module(f"benchmarks.{name}")
    value = module.main(["--fast", "--device", ACCEL])
    out = capsys.readouterr().out
    assert f"device {ACCEL}" in out
    assert parse_result(out.strip().splitlines()[-1]).value == pytest.approx(value, rel=1e-3)
