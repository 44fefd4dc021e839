"""Slow: the embedded all-MiniLM-L6-v2 on real SST-2 (run with `python -m pytest -m slow`)."""

from __future__ import annotations

import os

import pytest
from transformers import AutoModelForSequenceClassification

from sparsebert.pipeline import DataOptions, train_and_prune
from sparsebert.recipe import load_recipe
from sparsebert.report import sparsity_report

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.slow
def test_minilm_gmp_kd_on_real_sst2(tmp_path):
    data = DataOptions("sst2", SHARED, max_train_samples=1600, max_eval_samples=400, max_seq_length=64)
    teacher = str(tmp_path / "teacher")
    dense = train_and_prune(None, data, load_recipe("finetune"), teacher,
                            training_overrides={"num_train_epochs": 1, "learning_rate": 1e-4})
    assert dense["metrics"]["eval_accuracy"] > 0.7
    # 70%: within this test's budget (50 steps) GMP* to 90% cannot recover and ends at chance
    # (0.52 measured); 70% keeps 0.745 of the dense 0.78. The full-size 90% runs are in
    # bench/results/gmp_sst2.md.
    out = str(tmp_path / "gmp70")
    info = train_and_prune(teacher, data, load_recipe("gmp", ["sparsity=0.7"]), out, teacher_path=teacher,
                           training_overrides={"num_train_epochs": 1, "learning_rate": 1e-4})
    model = AutoModelForSequenceClassification.from_pretrained(out)
    rep = sparsity_report(model)
    assert rep["target_zeros"] == round(0.7 * rep["target_numel"])
    assert info["metrics"]["eval_accuracy"] > 0.6
