"""lumireg.train.losses: the MI loss is the kernel op, with the sign and units it states."""

import importlib

import torch

from lumireg.kernels import mutual_information
from lumireg.train.losses import mi_loss
from lumireg.train.losses import mutual_information as training_mutual_information


def _pair(rng, dtype=torch.float32):
    fixed = torch.rand(2, 1, 6, 7, 8, generator=rng, dtype=dtype)
    return fixed, 0.5 * fixed + 0.5 * torch.rand(fixed.shape, generator=rng, dtype=dtype)


def test_mi_loss_is_minus_the_kernel_op_in_nats(rng):
    fixed, moving = _pair(rng)
    expected = mutual_information(fixed, moving)
    assert torch.equal(training_mutual_information(fixed, moving), expected)
    assert torch.equal(mi_loss(fixed, moving), -expected)
    assert torch.equal(training_mutual_information(fixed, moving, 16, 0.8), mutual_information(fixed, moving, 16, 0.8))


def test_mi_loss_runs_the_kernels_op_and_its_backward(rng, monkeypatch):
    # the training path must go through lumireg.kernels (Triton on CUDA tensors), not a copy of the formula
    calls = []
    kernel_module = importlib.import_module("lumireg.kernels.mutual_information")
    original = kernel_module.mutual_information_torch
    monkeypatch.setattr(kernel_module, "mutual_information_torch", lambda *a: calls.append(a) or original(*a))
    fixed, moving = _pair(rng, torch.float64)
    moving.requires_grad_()
    mi_loss(fixed, moving).sum().backward()
    assert len(calls) == 1 and moving.grad.dtype == torch.float64 and moving.grad.abs().max() > 0
