"""Build the Raspberry Pi bundle: one archive to copy to the Pi.

    python -m pi.bundle                    (make pi-bundle)
    python -m pi.bundle --model artifacts/tflite/<build>/float32.tflite --out /tmp/pi.tar.gz

`artifacts/mnist-pi.tar.gz` holds one folder, `mnist-pi/`:

    mobile/                          the shipped modules only (mobile.SHIPPED_MODULES)
    mnist.tflite, labels.txt         the model (default: the export's recommended one)
    samples/                         photos of handwritten digits, <digit>-<kind>.<ext>
    requirements.txt                 ai-edge-litert + numpy 2 + Pillow (requirements/pi.txt)
    requirements-tflite-runtime.txt  tflite-runtime 2.14.0 + numpy 1.26 + Pillow
    README.md                        install and run on the Pi (pi/pi_readme.md + facts)
    SHA256SUMS                       `sha256sum -c SHA256SUMS` after copying

The samples are synthetic JPEG photos (model/pictures.py) of MNIST test digits, one per class,
plus a light-on-dark PNG and a raw 28x28 MNIST PNG; for each class the first test digit whose photo
this model classifies right with probability >= 0.9 is used, so the samples demonstrate the
kit rather than measure it (`make bench-mobile` measures). The archive is reproducible: fixed
order, owners and timestamps. It is written beside its target and renamed into place; the
resolved config is saved beside it as `<name>.config.json`.

A development-machine tool (it reads MNIST through model/idx.py), so it lives here and not in
mobile/, which holds exactly what runs on the Pi.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

import mobile
from common import configlib, contract
from common.configlib import ConfigError, field

REPO = Path(__file__).resolve().parents[1]
TOP = "mnist-pi"
# Archive entries get this timestamp (2024-01-01 UTC) so that the same inputs give the same
# bytes; SOURCE_DATE_EPOCH overrides it, as in reproducible-builds.org.
DEFAULT_EPOCH = 1704067200
REQUIREMENTS = {
    "requirements.txt": REPO / "requirements" / "pi.txt",
    "requirements-tflite-runtime.txt": REPO / "requirements" / "pi-tflite-runtime.txt",
}
SAMPLE_MIN_PROBABILITY = 0.9


@dataclass(frozen=True)
class BundleConfig:
    """Build the Raspberry Pi bundle (artifacts/mnist-pi.tar.gz)."""

    model: Path = field(Path("artifacts/mobile") / contract.MOBILE_MODEL_FILE, f"the .tflite model to ship (as {contract.MOBILE_MODEL_FILE})")
    labels: Path | None = field(None, "labels file (default: labels.txt beside the model)")
    out: Path = field(Path("artifacts/mnist-pi.tar.gz"), "the archive to write")
    data_dir: Path | None = field(None, "MNIST IDX folder whose test digits become the samples (default: tests/data)")
    seed: int = field(0, "seed of the sample photos")

    def validate(self) -> None:
        if not Path(self.model).is_file():
            raise ConfigError(
                f"--model {self.model}: not found. Run make train / make export first (they write "
                f"artifacts/mobile/mnist.tflite), or pass --model."
            )
        labels = self.labels_path
        if not labels.is_file():
            raise ConfigError(
                f"--labels {labels}: not found. Run make train / make export first (the export "
                f"writes labels.txt beside the model), or pass --labels."
            )
        if not str(self.out).endswith(".tar.gz"):
            raise ConfigError(f"--out {self.out}: the bundle is a .tar.gz archive")

    @property
    def labels_path(self) -> Path:
        return Path(self.labels) if self.labels else Path(self.model).with_name(contract.LABELS_FILE)


def shipped_files() -> list[tuple[str, Path]]:
    """(archive name under mnist-pi/, source file) of the code that runs on the Pi."""
    package = Path(mobile.__file__).parent
    return [(f"mobile/{name}.py", package / f"{name}.py") for name in mobile.SHIPPED_MODULES]


def make_samples(model: Path, labels: Path, data_dir: Path, seed: int) -> dict[str, bytes]:
    """Sample pictures {file name: bytes}: a photo per class, a light-on-dark PNG, an MNIST PNG.

    Each is checked through the shipped code path (the file's bytes through
    preprocess.picture_to_mnist, then the model) and must come out as its digit with
    probability >= SAMPLE_MIN_PROBABILITY.
    """
    from model.pictures import synthesize_photo
    from export.warmup import encode_png
    from mobile import preprocess
    from mobile.runtime import Classifier
    from model import idx

    classifier = Classifier.load(model, labels)
    test = idx.load_split(data_dir, "test")
    classes = classifier.num_classes

    def confident(data: bytes, digit: int) -> bool:
        try:
            probabilities = classifier.predict(preprocess.picture_to_mnist(data))
        except preprocess.PictureError:
            return False
        return int(np.argmax(probabilities)) == digit and probabilities[digit] >= SAMPLE_MIN_PROBABILITY

    samples: dict[str, bytes] = {}
    for digit in range(classes):
        for index in np.flatnonzero(test.labels == digit)[:50]:
            photo = synthesize_photo(test.images[index], np.random.default_rng([seed, int(index)]))
            # JPEG photos only: a noisy photo as PNG is 10x larger (the PNG samples are below).
            if photo.format == "jpeg" and confident(photo.data, digit):
                samples[f"{digit}-photo.{photo.extension}"] = photo.data
                break
        else:
            raise RuntimeError(f"no photo of a {digit} among 50 test digits is classified right by {model}")
    # Light ink on a dark board, and a digit already in MNIST form (passes through unchanged).
    extras = {"light-on-dark.png": lambda d: 255 - _upscaled_on_paper(d), "mnist.png": lambda d: d}
    for offset, (kind, render) in enumerate(extras.items()):
        digit = (3 + 4 * offset) % classes
        for index in np.flatnonzero(test.labels == digit)[:50]:
            picture = encode_png(render(test.images[index]))
            if confident(picture, digit):
                samples[f"{digit}-{kind}"] = picture
                break
    return samples


def _upscaled_on_paper(digit: np.ndarray) -> np.ndarray:
    """An MNIST digit as dark ink on light paper, 4x larger, off-centre: uint8 [160, 200]."""
    big = np.asarray(Image.fromarray(255 - digit).resize((112, 112), Image.BICUBIC), dtype=np.uint8)
    page = np.full((160, 200), 255, np.uint8)
    page[30:142, 70:182] = big
    return page


def _readme(config: BundleConfig, model_bytes: bytes) -> str:
    """pi/pi_readme.md plus what this bundle holds (model variant, accuracy, checksum)."""
    text = (Path(__file__).with_name("pi_readme.md")).read_text(encoding="utf-8")
    facts = [f"- model: `{contract.MOBILE_MODEL_FILE}`, {len(model_bytes):,} bytes, sha256 `{hashlib.sha256(model_bytes).hexdigest()[:16]}...`"]
    report_path = Path(config.model).with_name(contract.MOBILE_REPORT_FILE)
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        for variant in report.get("variants", []):
            candidate = report_path.parent / str(variant.get("path", ""))
            if candidate.is_file() and candidate.read_bytes() == model_bytes:
                facts.append(
                    f"- variant `{variant['name']}`: test accuracy {variant['accuracy']:.4f} on "
                    f"{report.get('test_images', '?')} MNIST test images (export report), runs with "
                    f"{', '.join(variant.get('runtimes', [])) or 'see report'}"
                )
    return text + "\n## This bundle\n\n" + "\n".join(facts) + "\n"


def _tar(entries: dict[str, bytes], epoch: int) -> bytes:
    """A reproducible .tar.gz of {path: bytes}, every path under TOP/."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({str(Path(name).parent) for name in entries} | {"."})
        for directory in directories:
            info = tarfile.TarInfo(TOP if directory == "." else f"{TOP}/{directory}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(info)
        for name in sorted(entries):
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size, info.mtime = len(entries[name]), epoch
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(entries[name]))
    compressed = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=compressed, mode="wb", mtime=epoch) as gz:
        gz.write(raw.getvalue())
    return compressed.getvalue()


def build_bundle(config: BundleConfig, log: Callable[[str], None] = print) -> Path:
    """Write the archive `config.out`; returns its path. The model is loaded and the samples
    classified through the shipped code first, so a corrupt model never ships."""
    data_dir = Path(config.data_dir) if config.data_dir else REPO / "tests" / "data"
    model_bytes = Path(config.model).read_bytes()
    entries: dict[str, bytes] = {name: source.read_bytes() for name, source in shipped_files()}
    entries[contract.MOBILE_MODEL_FILE] = model_bytes
    entries[contract.LABELS_FILE] = config.labels_path.read_bytes()
    for name, source in REQUIREMENTS.items():
        entries[name] = source.read_bytes()
    for name, data in make_samples(config.model, config.labels_path, data_dir, config.seed).items():
        entries[f"samples/{name}"] = data
    entries["README.md"] = _readme(config, model_bytes).encode("utf-8")
    entries["SHA256SUMS"] = "".join(
        f"{hashlib.sha256(entries[name]).hexdigest()}  {name}\n" for name in sorted(entries)
    ).encode("ascii")

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    archive = _tar(entries, epoch=epoch)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(archive)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    configlib.save_config(config, out.with_name(out.name[: -len(".tar.gz")] + ".config.json"))
    samples = sorted(name for name in entries if name.startswith("samples/"))
    log(f"wrote {out} ({len(archive):,} bytes): {len(entries)} files, {len(samples)} samples")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    config = configlib.parse_config(BundleConfig, argv, prog="python -m pi.bundle")
    try:
        build_bundle(config)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
