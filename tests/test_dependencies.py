"""Dependency direction: what each part may import, checked by importing it for real.

- Importing any module of the kit has no side effects: no TensorFlow, Keras, gRPC, LiteRT or
  matplotlib is loaded until a function needs it.
- `mobile/` (what runs on the Pi) imports and classifies where TensorFlow, Keras and the rest
  of the kit (model/, export/, serving/) cannot be imported.
- The REST client and the query CLI work where TensorFlow cannot be imported.
- `common/` (the shared vocabulary) imports nothing of the kit; the clients (REST, gRPC,
  query CLI) import nothing of the local server; `mobile/` imports nothing but itself. These
  are read from the source (every import statement, including those inside functions), so a
  lazy import breaks them as surely as a top-level one.
- The synthetic pictures (`model/pictures.py`, evaluation data) import nothing of the kit and
  no TensorFlow; export/, pi/ and serving/bench.py may use them, nothing else of the kit.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, python_env

PACKAGES = ("common", "model", "export", "serving", "mobile", "pi")
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


def kit_imports(module: str) -> set[str]:
    """The kit modules `module`'s source imports anywhere (top level or inside functions).

    `from serving import tensor_proto` counts as `serving.tensor_proto` when that is a module,
    else as the package `serving`; relative imports are resolved against `module`'s package.
    """
    known = set(all_modules())
    parts = module.split(".")
    path = REPO.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        path = REPO.joinpath(*parts, "__init__.py")
    package = module if path.name == "__init__.py" else ".".join(parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found & known


def import_closure(roots: list[str]) -> dict[str, str]:
    """Every kit module reachable from `roots` through imports, each with the module that first imported it."""
    seen = {root: root for root in roots}
    todo = list(roots)
    while todo:
        current = todo.pop()
        for name in sorted(kit_imports(current)):
            if name not in seen:
                seen[name] = current
                todo.append(name)
    return seen


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
    code = blocker(("tensorflow", "keras", "common", "model", "export", "serving", "pi", "tests")) + textwrap.dedent(f"""
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
        from common import contract, configlib
        from model import idx
        assert hasattr(client, "RestClient")
        print("ok")
    """)
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("module", ["mobile.runtime", "mobile.preprocess", "mobile.classify"])
def test_pi_code_runs_on_python_and_numpy_alone_at_import(module):
    """The Pi bundle's modules need only the standard library, numpy and Pillow to import."""
    code = blocker(HEAVY + ("common", "model", "export", "serving", "pi", "requests", "aiohttp", "orjson")) + (
        f"import {module}\nprint('ok')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mobile_holds_exactly_what_ships_to_the_pi():
    import mobile

    present = {p.stem for p in (REPO / "mobile").glob("*.py")}
    assert present == set(mobile.SHIPPED_MODULES)


# The local server (python -m serving.server) and everything only it needs (serving.protocol
# and serving.tensor_proto are the wire vocabulary both sides share). The clients are
# what users copy into their applications: they must not drag the server along.
CLIENTS = ["serving.client", "serving.grpc_client", "serving.query"]
LOCAL_SERVER = ("serving.server", "serving.core", "serving.rest", "serving.grpc_api",
                "serving.model_manager", "serving.batching", "serving.config_files",
                "serving.settings", "serving.metrics", "serving.json_tensor",
                "serving.rapidjson_compat", "serving.process")


def modules_of(package: str) -> list[str]:
    return [m for m in all_modules() if m.split(".")[0] == package]


def test_common_imports_nothing_of_the_kit():
    closure = import_closure(modules_of("common"))
    outside = {name: by for name, by in closure.items() if name.split(".")[0] != "common"}
    assert not outside, f"common/ must import nothing of the kit; found (module: imported by) {outside}"
    # And for real: common/ imports where the rest of the kit and numpy cannot.
    code = blocker(("model", "export", "serving", "mobile", "pi", "tests", "numpy") + HEAVY) + textwrap.dedent(f"""
        import importlib
        for name in {modules_of("common")!r}:
            importlib.import_module(name)
        print("ok")
    """)
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_clients_import_nothing_of_the_local_server():
    assert set(LOCAL_SERVER) <= set(all_modules()), "LOCAL_SERVER names a module that no longer exists"
    closure = import_closure(CLIENTS)
    server = {name: by for name, by in closure.items() if name in LOCAL_SERVER or name.startswith("export")}
    assert not server, f"a client imports the local server or the exporter (module: imported by): {server}"


def test_mobile_imports_nothing_but_itself():
    closure = import_closure(modules_of("mobile"))
    outside = {name: by for name, by in closure.items() if name.split(".")[0] != "mobile"}
    assert not outside, f"mobile/ must import only mobile/ (module: imported by): {outside}"


def test_pi_tooling_imports_neither_serving_nor_tests():
    closure = import_closure(modules_of("pi"))
    outside = {name: by for name, by in closure.items() if name.split(".")[0] in ("serving", "tests")}
    assert not outside, f"pi/ must not import serving/ or tests/ (module: imported by): {outside}"
    assert {"pi.bundle", "pi.bench_mobile", "pi.emulation", "pi.smoke"} <= set(closure)


def test_no_package_below_pi_imports_it():
    users = {}
    for module in all_modules():
        if module.split(".")[0] != "pi":
            users.update({module: name for name in import_closure([module]) if name.split(".")[0] == "pi"})
    assert not users, f"pi/ is a tool on top of the kit; these reach it (module: pi module): {users}"


def test_the_local_server_imports_only_the_warm_up_module_of_the_exporter():
    closure = import_closure(["serving.server", *LOCAL_SERVER])
    exporter = {name: by for name, by in closure.items()
                if name.split(".")[0] in ("export", "model") and name not in ("export", "export.warmup")}
    assert not exporter, f"the local server imports the exporter or the trainer (module: imported by): {exporter}"
    assert "export.warmup" in closure  # it reads the warm-up file as TF Serving does


# The synthetic pictures people send (photo, canvas, chalk, tight, thinpen, mnist) are evaluation
# data for every path the model takes, so they sit in the data layer (model/pictures.py). These
# may use them: the export's picture check, the Pi tooling and the serving benchmark. Never the
# clients, the local server or mobile/, which run where the kit's data tools are not installed.
PICTURE_USERS = ("export", "pi", "serving.bench")


def test_the_synthetic_pictures_are_light_data_for_export_pi_and_the_serving_benchmark():
    users = {m for m in all_modules() if m != "model.pictures" and "model.pictures" in kit_imports(m)}
    wrong = {m for m in users if m.split(".")[0] not in PICTURE_USERS and m not in PICTURE_USERS}
    assert not wrong, f"only {PICTURE_USERS} may import model.pictures; also imported by {sorted(wrong)}"
    assert {"export.verify", "pi.bundle", "pi.bench_mobile", "serving.bench"} <= users
    assert set(import_closure(["model.pictures"])) == {"model.pictures"}, "model/pictures.py imports the kit"
    # And for real: every kind is made where TensorFlow and the rest of the kit cannot be imported.
    code = blocker(HEAVY + ("common", "export", "serving", "mobile", "pi", "tests")) + textwrap.dedent("""
        import numpy as np
        from model import pictures
        digit = np.zeros((28, 28), np.uint8)
        digit[5:23, 12:16] = 255
        made = [pictures.synthesize_kind(kind, digit[None], seed=0)[0] for kind in pictures.KINDS]
        print(" ".join(p.kind for p in made))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["photo", "canvas", "chalk", "tight", "thinpen", "mnist"]


# Bottom to top: a package may import only those before it (README's Layout section).
LAYERS = ("common", "mobile", "model", "export", "serving", "pi")
ALLOWED = {"common": (), "mobile": (), "model": ("common",), "export": ("common", "mobile", "model"),
           "serving": ("common", "mobile", "model", "export"), "pi": ("common", "mobile", "model", "export")}


def test_no_import_runs_back_up_the_layers():
    assert set(LAYERS) == set(PACKAGES) == set(ALLOWED)
    wrong = {}
    for module in all_modules():
        package = module.split(".")[0]
        for name in kit_imports(module):
            if name.split(".")[0] not in (package, *ALLOWED[package]):
                wrong.setdefault(module, []).append(name)
    assert not wrong, f"imports against the layering {LAYERS} (module: what it imports): {wrong}"
