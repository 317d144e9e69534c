"""TF Serving's text-format config files, read with protobuf as the real server reads them.

- `models.config`: a ModelServerConfig (tensorflow_serving/config/model_server_config.proto,
  shipped in tensorflow-serving-api).
- the batching parameters file: a BatchingParameters
  (tensorflow_serving/servables/tensorflow/session_bundle_config.proto), and
- the monitoring config: a MonitoringConfig (tensorflow_serving/config/monitoring_config.proto).

The last two protos are not in the pip package, so their messages are declared here at run
time (same package, names and field numbers as upstream) and parsed with the same
`text_format`: an unknown field or a typo fails exactly as `--batching_parameters_file` would.

Errors are ConfigFileError naming the file and what is wrong.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import configlib

MONITORING_DEFAULT_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath


class ConfigFileError(ValueError):
    """A config file is missing or malformed; the message names it."""


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"{path}: cannot read ({err})") from None


def _parse(path: Path, message: Any) -> Any:
    from google.protobuf import text_format

    try:
        text_format.Parse(_read_text(path), message)
    except text_format.ParseError as err:
        # TF Serving says "Invalid protobuf file: '<file>'"; we add where and why.
        raise ConfigFileError(f"Invalid protobuf file: '{path}': {err}") from None
    return message


# --------------------------------------------------------------------------------------------
# The two messages the pip package lacks, declared from their upstream .proto definitions.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _message_classes() -> dict[str, Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="mnist_deploy_kit/serving_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )

    def add(message: Any, name: str, number: int, ftype: int, type_name: str = "",
            repeated: bool = False) -> None:
        entry = message.field.add(
            name=name, number=number, type=ftype,
            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL,
        )
        if type_name:
            entry.type_name = type_name

    batching = fdp.message_type.add(name="BatchingParameters")
    for name, number in (("max_batch_size", 1), ("batch_timeout_micros", 2),
                         ("max_enqueued_batches", 3), ("num_batch_threads", 4),
                         ("max_execution_batch_size", 9)):
        add(batching, name, number, F.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    add(batching, "thread_pool_name", 5, F.TYPE_MESSAGE, ".google.protobuf.StringValue")
    add(batching, "allowed_batch_sizes", 6, F.TYPE_INT64, repeated=True)
    add(batching, "pad_variable_length_inputs", 7, F.TYPE_BOOL)
    add(batching, "enable_large_batch_splitting", 8, F.TYPE_MESSAGE, ".google.protobuf.BoolValue")

    prometheus = fdp.message_type.add(name="PrometheusConfig")
    add(prometheus, "enable", 1, F.TYPE_BOOL)
    add(prometheus, "path", 2, F.TYPE_STRING)
    monitoring = fdp.message_type.add(name="MonitoringConfig")
    add(monitoring, "prometheus_config", 1, F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in ("BatchingParameters", "MonitoringConfig")
    }


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchingParameters:
    """What the batcher needs; defaults are TF Serving's (BatchingSession / shared scheduler)."""

    max_batch_size: int = configlib.field(1000, "most rows in one batch (and in one request)", at_least=1)
    batch_timeout_micros: int = configlib.field(0, "how long a batch waits for more rows", at_least=0)
    max_enqueued_batches: int = configlib.field(10, "batches waiting to run; beyond, requests are refused",
                                                at_least=1)
    num_batch_threads: int = configlib.field(4, "batches run at once", at_least=1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = configlib.field(
        None, "with large-batch splitting: most rows in one model run", at_least=1)

    @property
    def execution_batch_size(self) -> int:
        """The most rows one model run takes: max_execution_batch_size with large-batch
        splitting (default: max_batch_size), else max_batch_size (bundle_factory_util.h,
        GetQueueOptions). max_batch_size itself bounds each request's rows either way."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size:
            return min(self.max_execution_batch_size, self.max_batch_size)
        return self.max_batch_size

    def validate(self, where: str = "batching parameters") -> None:
        """Raise ConfigFileError naming `where` and the first field BatchingSession would refuse."""
        configlib.check_bounds(self, ConfigFileError, name=lambda field_name: f"{where}: {field_name}")
        sizes = self.allowed_batch_sizes
        if sizes:
            # BatchingSession's rules for allowed_batch_sizes.
            if list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
                raise ConfigFileError(f"{where}: allowed_batch_sizes must be positive and strictly increasing, got {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ConfigFileError(
                    f"{where}: the last entry of allowed_batch_sizes ({sizes[-1]}) must equal "
                    f"max_batch_size ({self.max_batch_size})"
                )
            if sizes[-1] != self.execution_batch_size:  # batching_session.cc, with splitting
                raise ConfigFileError(
                    f"{where}: the last entry of allowed_batch_sizes ({sizes[-1]}) must equal "
                    f"max_execution_batch_size ({self.execution_batch_size})"
                )


def read_batching_parameters(path: Path) -> BatchingParameters:
    """Parse a TF Serving batching parameters file (text BatchingParameters)."""
    proto = _parse(path, _message_classes()["BatchingParameters"]())

    def int_or(name: str, default: int | None) -> int | None:
        return int(getattr(proto, name).value) if proto.HasField(name) else default

    base = BatchingParameters()
    params = BatchingParameters(
        max_batch_size=int_or("max_batch_size", base.max_batch_size),
        batch_timeout_micros=int_or("batch_timeout_micros", base.batch_timeout_micros),
        max_enqueued_batches=int_or("max_enqueued_batches", base.max_enqueued_batches),
        num_batch_threads=int_or("num_batch_threads", base.num_batch_threads),
        allowed_batch_sizes=tuple(int(s) for s in proto.allowed_batch_sizes),
        pad_variable_length_inputs=bool(proto.pad_variable_length_inputs),
        enable_large_batch_splitting=(
            bool(proto.enable_large_batch_splitting.value)
            if proto.HasField("enable_large_batch_splitting") else False
        ),
        max_execution_batch_size=int_or("max_execution_batch_size", None),
    )
    params.validate(str(path))
    return params


# --------------------------------------------------------------------------------------------
# Monitoring
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MonitoringConfig:
    prometheus_enabled: bool = False
    prometheus_path: str = MONITORING_DEFAULT_PATH


def read_monitoring_config(path: Path) -> MonitoringConfig:
    proto = _parse(path, _message_classes()["MonitoringConfig"]())
    prom = proto.prometheus_config
    path_value = prom.path or MONITORING_DEFAULT_PATH
    if not path_value.startswith("/"):
        raise ConfigFileError(f"{path}: prometheus_config.path must start with '/', got {path_value!r}")
    return MonitoringConfig(bool(prom.enable), path_value)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionPolicy:
    """FileSystemStoragePathSourceConfig.ServableVersionPolicy: which versions to serve."""

    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1  # for latest
    versions: tuple[int, ...] = ()  # for specific

    def aspired(self, available: list[int]) -> list[int]:
        """The versions to keep loaded among those on disk (ascending)."""
        if self.kind == "all":
            return sorted(available)
        if self.kind == "specific":
            return sorted(v for v in available if v in self.versions)
        return sorted(available)[-self.num_versions :] if available else []

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "specific " + ",".join(map(str, self.versions))
        return "all"


@dataclass(frozen=True)
class ModelSpecConfig:
    """One entry of model_config_list."""

    name: str
    base_path: Path
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict)


def read_model_config(path: Path, host_root: Path, container_root: str = "/models") -> list[ModelSpecConfig]:
    """Parse models.config (text ModelServerConfig) into our model list.

    `base_path` values under `container_root` (where the compose file mounts the models)
    are read from `host_root` instead, so one models.config serves both the container and
    the local server; other absolute paths are used as they are, relative ones from the
    config file's folder.
    """
    from tensorflow_serving.config import model_server_config_pb2

    proto = _parse(path, model_server_config_pb2.ModelServerConfig())
    if proto.WhichOneof("config") != "model_config_list":
        raise ConfigFileError(f"{path}: only model_config_list is supported (custom_model_config is not)")
    models = []
    seen = set()
    for entry in proto.model_config_list.config:
        where = f"{path}: model {entry.name!r}"
        if not entry.name:
            raise ConfigFileError(f"{path}: a model config has no name")
        if entry.name in seen:
            raise ConfigFileError(f"{path}: model name {entry.name!r} appears twice")
        seen.add(entry.name)
        if not entry.base_path:
            raise ConfigFileError(f"{where} has no base_path")
        if entry.model_platform not in ("", "tensorflow"):
            raise ConfigFileError(f"{where}: model_platform {entry.model_platform!r} is not served here (only 'tensorflow')")
        models.append(ModelSpecConfig(
            name=entry.name,
            base_path=map_base_path(entry.base_path, Path(path).parent, host_root, container_root),
            policy=_policy(entry.model_version_policy, where),
            labels={k: int(v) for k, v in sorted(entry.version_labels.items())},
        ))
    return models


def map_base_path(base_path: str, config_dir: Path, host_root: Path, container_root: str) -> Path:
    root = container_root.rstrip("/")
    if root and (base_path == root or base_path.startswith(root + "/")):
        return Path(host_root) / base_path[len(root) :].lstrip("/")
    p = Path(base_path)
    return p if p.is_absolute() else Path(config_dir) / p


def _policy(proto: Any, where: str) -> VersionPolicy:
    which = proto.WhichOneof("policy_choice")
    if which is None:
        return VersionPolicy()  # TF Serving's default: the latest version only
    if which == "latest":
        n = int(proto.latest.num_versions) or 1
        if n < 1:
            raise ConfigFileError(f"{where}: latest.num_versions must be >= 1")
        return VersionPolicy("latest", num_versions=n)
    if which == "all":
        return VersionPolicy("all")
    versions = tuple(sorted(int(v) for v in proto.specific.versions))
    if not versions:
        raise ConfigFileError(f"{where}: specific policy lists no versions")
    return VersionPolicy("specific", versions=versions)
