"""Restoration quality: QualiTeacher against its stage-1 teacher and the Colabator-style baseline.

    python -m experiments.quality --tasks haze [--budget configs/quality_budget.yaml]         [--out runs/quality] [--set train.steps=400 ...] [--fast]

For each task (snow, rain, haze, lowlight, underwater; ``--tasks all`` for the five):

1. the sets are made once from the bundled photos (``make_task_sets``): a paired synthetic
   set, an unpaired "real" set with shifted degradation ranges, and a held-out test set of
   the "real" domain whose ground truth is hidden from training;
2. the stage-1 teacher is pretrained once on the paired set (``pretrain.pt``), and both
   students start from that same file (``pretrain.checkpoint``);
3. QualiTeacher (``train.mode=qualiteacher``) and the baseline (``Config.as_baseline()``)
   train under the same budget: the same config, steps, seed and data, each in its own run
   folder, Ray namespace and embedded Redis;
4. the test inputs are evaluated (PSNR / SSIM against the hidden ground truth, the NR
   ensemble on 0-10) as they are (degraded input), restored by the stage-1 teacher at score
   7, by the baseline student, and by the QualiTeacher student at score 7;
5. the QualiTeacher student restores the test set at every condition of the sweep (0..7)
   and the Spearman correlation between condition and mean NR ensemble of the output is
   the controllability score.

Targets (the paper's claims, reported whatever they come out as): QualiTeacher at score 7
above its teacher and above the baseline in PSNR on hidden ground truth and in NR ensemble
on at least 4 of the 5 tasks; controllability Spearman >= 0.9. A task is "won" when all
four comparisons are won.

Writes ``report.md``, ``results.json`` and PNG plots (controllability curves, per-task
bars, a before/after grid per task) into the report folder (default ``runs/quality``; the
run folders go under ``<out>/<task>/``). The last line printed is

    RESULT quality_tasks_won <n> tasks target 4

The budget is a config file (default ``configs/quality_budget.yaml``) plus ``--set``
overrides; a GPU is used when CUDA is available (``train.use_gpu=true`` is added unless
``--set train.use_gpu=...`` says otherwise). ``--fast`` is a tiny budget (the smoke model,
a few steps, a reduced sweep) that only shows that the script works: its numbers mean
nothing.
"""
