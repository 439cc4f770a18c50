"""The start-up line about precision: what the config chose, and whether this CPU has native bf16."""
from __future__ import annotations

from sinkrec import hardware
from sinkrec.hardware import cpu_info, describe_precision, machine


def test_bf16_on_a_cpu_without_native_bf16_says_so_and_names_the_fix():
    line = describe_precision("bf16-mixed", "cpu", flags={"avx2", "avx512f"})
    assert "bf16-mixed" in line and "without avx512_bf16 or amx_bf16" in line
    assert "--trainer.precision 32-true" in line


def test_bf16_on_a_cpu_with_native_bf16_names_the_flag():
    assert "native bf16 dot products (avx512_bf16)" in describe_precision("bf16-mixed", "cpu", {"avx512_bf16"})
    assert "(amx_bf16)" in describe_precision("bf16-mixed", "cpu", {"amx_bf16", "amx_tile"})


def test_fp32_points_to_bf16_only_where_the_cpu_has_it():
    assert "bf16-mixed may be faster" in describe_precision("32-true", "cpu", {"avx2", "avx512_bf16"})
    plain = describe_precision("32-true", "cpu", {"avx2"})
    assert "no native bf16" in plain and "bf16-mixed" not in plain
    assert describe_precision(None, "auto", {"avx2"}).startswith("precision: 32-true")


def test_machine_line_lists_only_known_kernel_flags():
    model, flags = cpu_info()
    line = machine()
    assert line.startswith(model) and "flags:" in line
    listed = line.split("flags: ")[1].split()
    assert set(listed) <= flags or listed[:2] == ["none", "of"]


def test_cpu_training_on_a_cuda_machine_still_gets_the_cpu_line(monkeypatch):
    monkeypatch.setattr(hardware, "_cuda", lambda: True)
    assert describe_precision("32-true", "auto", {"avx512_bf16"}) == "precision: 32-true (trainer.precision)"
    assert "bf16-mixed may be faster" in describe_precision("32-true", "cpu", {"avx512_bf16"})
