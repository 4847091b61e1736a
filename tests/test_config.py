"""What a user is told about the paths in use: show_config() and the slow-path warning."""

import warnings

import pytest
import torch

import nanoadam
from nanoadam import NanoAdam, _cpu


def steps(opt, p, n=3):
    for t in range(n):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
        opt.step()


def test_show_config_names_every_path(capsys):
    nanoadam.show_config()
    out = capsys.readouterr().out
    for key in ("nanoadam", "torch", "cpu kernels", "triton kernels"):
        assert key in out
    assert nanoadam.config()["cpu kernels"] == _cpu.status()


def test_one_warning_when_the_cpu_kernels_are_missing(monkeypatch):
    monkeypatch.setattr(_cpu, "_load", lambda: (None, "not built: no C++ compiler was found"))
    monkeypatch.delenv("NANOADAM_DISABLE_CPU_KERNELS", raising=False)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = NanoAdam([p], chunk_size=100)
    with pytest.warns(RuntimeWarning, match="not built") as record:
        steps(opt, p)
    assert len(record) == 1 and "show_config" in str(record[0].message)


def test_no_warning_when_the_kernels_are_switched_off_on_purpose_or_in_use(monkeypatch):
    p = torch.nn.Parameter(torch.randn(1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(NanoAdam([p], chunk_size=100, fused=False), p)
        if _cpu.available():
            steps(NanoAdam([p], chunk_size=100), p)
        monkeypatch.setenv("NANOADAM_DISABLE_CPU_KERNELS", "1")
        monkeypatch.setattr(_cpu, "_load", lambda: (None, "disabled by NANOADAM_DISABLE_CPU_KERNELS"))
        steps(NanoAdam([p], chunk_size=100), p)
