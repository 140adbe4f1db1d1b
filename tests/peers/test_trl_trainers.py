"""One real TRL 1.16 GRPOTrainer step and one DPOTrainer step of a tiny random Qwen2 model (CPU, fp32),
with and without ``rlhf_kernels.compat.trl.patch()``: the same logged loss and metrics, and the same
gradients of every parameter (|Δ| ≤ 1e-4·(|g| + max|g|) per tensor), with the fused kernels provably on
the scoring path."""

from __future__ import annotations

import pytest
import torch

from peers.cases import close, grad_close
from peers.tiny_lm import build
from rlhf_kernels.compat import trl as ct

GRAD_TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, trl_peer):
    return build(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused head (only reachable through patch())."""
    calls = []
    original = ct.ChunkedLogProbFunction.apply

    def counting(*args, **kwargs):
        calls.append(args[-1] if len(args) >= 9 else kwargs.get("outputs"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ct.ChunkedLogProbFunction, "apply", staticmethod(counting))
    return calls


def _gradients_callback():
    from transformers import TrainerCallback

    class Gradients(TrainerCallback):
        grads: dict = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {
                name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
            }

    return Gradients()


def _train_one_step(make_trainer, patched: bool):
    if patched:
        ct.patch()
    try:
        torch.manual_seed(0)
        callback = _gradients_callback()
        trainer = make_trainer(callback)
        trainer.train()
        return trainer.state.log_history[0], callback.grads
    finally:
        ct.unpatch()


def _compare(plain, fused):
    logs, grads = plain
    fused_logs, fused_grads = fused
    for key, value in logs.items():
        if isinstance(value, float) and key not in ("step_time", "train_runtime"):
            close(fused_logs[key], value, 1e-5, key)
    assert grads.keys() == fused_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        grad_close(fused_grads[name], grad, GRAD_TOL, name)


def _args(config_cls, tmp_path, **kwargs):
    return config_cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        **kwargs,
    )


def test_grpo_step(tiny_lm, tmp_path, fused_calls):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    path, tokenizer = tiny_lm
    dataset = Dataset.from_dict({"prompt": ["the cat", "a dog ran", "big red", "the mat"]})

    def reward(completions, **kwargs):
        return [float(len(completion)) for completion in completions]

    def make_trainer(callback):
        args = _args(GRPOConfig, tmp_path, num_generations=4, max_completion_length=6, beta=0.1)
        return GRPOTrainer(
            model=str(path),
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )

    plain = _train_one_step(make_trainer, patched=False)
    assert not fused_calls
    fused = _train_one_step(make_trainer, patched=True)
    assert fused_calls and ("log_probs", "entropy") in fused_calls  # the policy's scoring ran on our kernels
    _compare(plain, fused)


def test_dpo_step(tiny_lm, tmp_path, fused_calls):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    path, tokenizer = tiny_lm
    dataset = Dataset.from_dict(
        {
            "prompt": ["the cat", "a dog ran", "big red", "the mat"],
            "chosen": [" sat on mat", " fast", " dog", " ran"],
            "rejected": [" ran slow", " big cat sat", " blue", " small"],
        }
    )

    def make_trainer(callback):
        return DPOTrainer(
            model=str(path),
            args=_args(DPOConfig, tmp_path, beta=0.1),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )

    plain = _train_one_step(make_trainer, patched=False)
    fused = _train_one_step(make_trainer, patched=True)
    # DPO's metrics read mean_logits and is_top1: the extra outputs are computed and logged identically
    assert ("log_probs", "entropy", "mean_logits", "is_top1") in fused_calls
    _compare(plain, fused)
