#!/usr/bin/env python3
"""FUSED_KERNELS' Triton CE kernels compiled for Hopper (sm_90a) without a GPU: Triton lowers them to PTX and its
bundled ptxas assembles them, reporting registers and spills per thread (the second CUDA review's defect 8a: one
8,192-wide block per row was expected to spill). No kernel runs here; tests/triton_ce_worker.py runs them in
Triton's interpreter.

    python3 bench/triton_ce_ptxas.py > logs/bench_triton_ce_ptxas.txt
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (silences its warning)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

ARCH = 90


def signatures(dtype: str) -> dict:
    """Each kernel's argument types for logits of this Triton dtype (bf16: CUDA autocast's head; fp32: COMPUTE_DTYPE)."""
    return {
        tg.softcap_ce_forward_rows: dict(
            z_ptr=f"*{dtype}", target_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32", cols="i32", cap="fp32"
        ),
        tg.softcap_ce_backward_rows: dict(
            z_ptr=f"*{dtype}",
            target_ptr="*i64",
            lse_ptr="*fp32",
            grad_ptr="*fp32",
            dz_ptr=f"*{dtype}",
            cols="i32",
            cap="fp32",
        ),
    }


def assemble(kernel, signature: dict) -> str:
    """ptxas -v's report for the kernel at SOFTCAP_CE_BLOCK columns and 4 warps (the launch's defaults)."""
    source = triton.compiler.ASTSource(
        fn=kernel, signature=dict(signature, block="constexpr"), constexprs={"block": tg.SOFTCAP_CE_BLOCK}
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options={"num_warps": 4})
    with tempfile.TemporaryDirectory() as directory:
        ptx = Path(directory) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run(
            [get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", str(ptx), "-o", str(Path(directory) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    return result.stderr


def main() -> int:
    print(f"triton {triton.__version__}, sm_{ARCH}a, block {tg.SOFTCAP_CE_BLOCK}, 4 warps")
    for dtype in ("bf16", "fp32"):
        for kernel, signature in signatures(dtype).items():
            report = assemble(kernel, signature)
            registers = re.search(r"Used (\d+) registers", report)[1]
            stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report).groups()
            print(f"{kernel.__name__} logits:{dtype} registers:{registers} spill_stores:{stores} spill_loads:{loads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
