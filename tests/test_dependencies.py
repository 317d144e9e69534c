"""Dependency direction: what each part may import, checked by importing it for real.

- Importing any module of the kit has no side effects: no TensorFlow, Keras, gRPC, LiteRT or
  matplotlib is loaded until a function needs it.
- `mobile/` (what runs on the Pi) imports and classifies where TensorFlow, Keras and the rest
  of the kit (model/, export/, serving/) cannot be imported.
- The REST client and the query CLI work where TensorFlow cannot be imported.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, python_env

PACKAGES = ("model", "export", "serving", "mobile")
HEAVY = ("tensorflow", "keras", "tensorflow_serving", "grpc", "ai_edge_litert", "tflite_runtime",
         "matplotlib", "tensorflow_datasets")


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.iter_modules([str(REPO / package)]):
            if info.name != "__main__":
                names.append(f"{package}.{info.name}")
    return sorted(names)


def blocker(prefixes: tuple[str, ...]) -> str:
    """Python source that makes importing any of `prefixes` fail, as if not installed."""
    return textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {prefixes!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for this test: {{name}}")
                return None
        sys.meta_path.insert(0, Block())
    """)


def run_python(code: str, cwd=REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=python_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_importing_any_module_loads_no_heavy_framework():
    modules = all_modules()
    assert len(modules) > 20
    code = textwrap.dedent(f"""
        import importlib, sys
        heavy = {HEAVY!r}
        for name in {modules!r}:
            importlib.import_module(name)
            loaded = sorted(h for h in heavy if h in sys.modules)
            if loaded:
                raise SystemExit(f"importing {{name}} loaded {{loaded}}")
        print("ok", len({modules!r}))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout


def test_mobile_imports_and_classifies_without_tensorflow_or_the_kit(exported, fixture_mnist, tmp_path):
    import numpy as np

    digits = tmp_path / "digits.npy"
    np.save(digits, fixture_mnist.test.images[:50])
    mobile_modules = [m for m in all_modules() if m.split(".")[0] == "mobile"]
    code = blocker(("tensorflow", "keras", "model", "export", "serving", "tests")) + textwrap.dedent(f"""
        import importlib, numpy as np
        for name in {mobile_modules!r}:
            importlib.import_module(name)
        from mobile.runtime import Classifier
        clf = Classifier.load({str(exported.mobile_dir / "mnist.tflite")!r})
        probs = clf.predict(np.load({str(digits)!r}))
        print(clf.runtime.name, probs.shape, probs.argmax(1).tolist())
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runtime, *_ = proc.stdout.split()
    assert runtime == "ai-edge-litert"
    predicted = [int(d) for d in proc.stdout.split("[", 2)[-1].rstrip("]\n").split(",")]
    accuracy = np.mean(np.array(predicted) == fixture_mnist.test.labels[:50])
    assert accuracy >= 0.8


def test_rest_client_and_query_cli_work_without_tensorflow():
    code = blocker(("tensorflow", "keras", "tensorflow_serving", "grpc")) + textwrap.dedent("""
        import numpy as np
        from serving import client, query
        from model import contract, idx, configlib
        assert hasattr(client, "RestClient")
        print("ok")
    """)
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("module", ["mobile.runtime", "mobile.preprocess", "mobile.classify"])
def test_pi_code_runs_on_python_and_numpy_alone_at_import(module):
    """The Pi bundle's modules need only the standard library, numpy and Pillow to import."""
    code = blocker(HEAVY + ("model", "export", "serving", "requests", "aiohttp", "orjson")) + (
        f"import {module}\nprint('ok')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mobile_holds_exactly_what_ships_to_the_pi():
    import mobile

    present = {p.stem for p in (REPO / "mobile").glob("*.py")}
    assert present == set(mobile.SHIPPED_MODULES)
