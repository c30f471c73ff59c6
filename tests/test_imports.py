import subprocess
import sys


def test_core_modules_do_not_import_deepspeed():
    # the loader modules run in every background worker: they stay light too
    code = ("import sys, resure_ds.loss, resure_ds.welford, resure_ds.weighting, resure_ds.quantile, "
            "resure_ds.data.loader, resure_ds.data.plan, resure_ds.data.shards, resure_ds.checkpoint; "
            "bad = [m for m in ('deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
