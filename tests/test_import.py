import subprocess
import sys


def test_import_sculpt_loads_no_heavy_framework():
    code = (
        "import sys, sculpt, sculpt.schema, sculpt.shards, sculpt.output, sculpt.config, sculpt.pipeline, sculpt.cli\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers', 'sam2', 'ray') if m in sys.modules)\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
