"""The core imports, and its stages run, with Prefect, Ray and s3fs blocked."""

import subprocess
import sys

CODE = r"""
import sys, importlib, pkgutil
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('prefect', 'ray', 's3fs'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import plasticity
for mod in pkgutil.walk_packages(plasticity.__path__, 'plasticity.'):
    importlib.import_module(mod.name)
from plasticity.config import config_from_dict
from plasticity.storage import Storage
Storage.from_config(config_from_dict({}).storage)
print('ok')
"""


def test_core_imports_without_orchestration_packages():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_blocking_really_blocks():
    code = CODE.replace("import plasticity\n", "import ray\n", 1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "blocked: ray" in out.stderr
