import subprocess
import sys


def test_import_sculpt_loads_no_heavy_framework():
    code = (
        "import sys, pkgutil, importlib, sculpt\n"
        "for m in pkgutil.iter_modules(sculpt.__path__): importlib.import_module('sculpt.' + m.name)\n"
        "import sculpt.models, actors.caption, actors.refer, actors.ground, actors.mask, actors.verify\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers', 'sam2', 'ray') if m in sys.modules)\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
