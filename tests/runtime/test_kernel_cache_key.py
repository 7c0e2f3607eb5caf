"""Generated CPU kernels are cached by their source; what they inline from numba_runtime.py
(and numba's version) is part of that source's header, so an upgrade that changes a helper
compiles fresh kernels instead of reusing stale ones from ~/.cache/mergelang."""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

from mergelang.runtime.kernels import numba_codegen


def test_generated_kernels_name_the_helpers_they_inline():
    runtime = Path(numba_codegen.__file__).with_name("numba_runtime.py").read_bytes()
    digest = hashlib.sha256(runtime + version("numba").encode()).hexdigest()[:16]
    src = numba_codegen.source((("add", (("in", 0), ("in", 1)), False, "float32"),),
                               ("elem", "elem"), ("float32", "float32"), 1)
    assert src.startswith(f"# helpers {digest}\n")
    assert numba_codegen.HEADER in src


def test_a_changed_helper_changes_the_kernel_file(monkeypatch, tmp_path):
    """Another numba_runtime.py (as after an upgrade) gives another header, hence another
    generated module (file name = digest of the source) and a fresh numba cache entry."""
    fake = tmp_path / "numba_codegen.py"
    fake.write_text("")
    (tmp_path / "numba_runtime.py").write_bytes(b"# another helper\n")
    monkeypatch.setattr(numba_codegen, "__file__", str(fake))
    assert numba_codegen.runtime_digest() not in numba_codegen.HEADER
