"""One thread policy: cores divided among the processes that share them, set before torch starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from components.threads import apply_thread_policy, available_cores, thread_budget


def test_budget_divides_the_cores_among_workers(monkeypatch):
    monkeypatch.delenv("GENCLS_THREADS", raising=False)
    cores = available_cores()
    assert thread_budget() == cores
    assert thread_budget(workers=2) == max(1, cores // 2)
    assert thread_budget(workers=cores + 5) == 1  # never zero


def test_env_override_and_bad_values(monkeypatch):
    monkeypatch.setenv("GENCLS_THREADS", "3")
    assert thread_budget(workers=8) == 3
    for bad in ("abc", "0"):
        monkeypatch.setenv("GENCLS_THREADS", bad)
        with pytest.raises(ValueError, match="GENCLS_THREADS"):
            thread_budget()


def test_apply_sets_torch_now_and_children_through_the_environment(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.setenv("MKL_NUM_THREADS", "")
    try:
        assert apply_thread_policy(threads=1) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        # a child process (a dvc stage, the scoring server) starts torch with the exported count
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "1"
    finally:
        torch.set_num_threads(before)


def test_cli_refuses_a_bad_thread_setting_in_one_line(monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("GENCLS_THREADS", "many")
    assert main(["data", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GENCLS_THREADS" in err[0]

