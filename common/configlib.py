"""One config dataclass per stage, overridden from the command line, saved as JSON.

Each stage (train, export, serve) declares a frozen dataclass whose fields are its settings,
with a `help` string in each field's metadata. `parse_config(Config, argv)` turns the fields
into `--kebab-case` flags (argparse rejects unknown flags and badly typed values), runs the
dataclass' own `validate()`, which calls check_bounds (the bounds the fields declare,
`field(..., at_least=1)`: one rule and one message for every number setting), or check_bounds
alone for a dataclass without one, and returns the resolved config. `save_config`
writes it as JSON beside what the stage produced.

Pure Python: the REST client and the local server's argument parsing import it without
TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import types
import typing
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting has a value the stage cannot use; the message names the flag."""


BOUNDS = ("at_least", "above", "at_most", "below")  # >=, >, <=, <


def field(default: Any, help: str, *, at_least: float | None = None, above: float | None = None,  # noqa: A002
          at_most: float | None = None, below: float | None = None, bounds_note: str | None = None,
          **kwargs: Any) -> Any:
    """A dataclass field with its help text (shown by --help) kept in metadata.

    `at_least` (>=), `above` (>), `at_most` (<=) and `below` (<) declare the values a number
    setting accepts; check_bounds() enforces them, naming the flag. `bounds_note` is said
    beside the bound in the error ("0 = none" gives "must be >= 0 (0 = none), got -5").
    """
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below,
              "bounds_note": bounds_note}
    return dataclasses.field(default=default, metadata={
        "help": help, **{key: value for key, value in bounds.items() if value is not None}, **kwargs})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bounds_text(at_least: Any, above: Any, at_most: Any, below: Any) -> str:
    """'>= 1', '> 0', '<= 9', '< 1', or an interval: 'in [0, 1000]', 'in (0, 1]', 'in [0, 1)'."""
    low = f"[{at_least}" if at_least is not None else f"({above}" if above is not None else None
    high = f"{at_most}]" if at_most is not None else f"{below})" if below is not None else None
    if low is not None and high is not None:
        return f"in {low}, {high}"
    if low is not None:
        return f">= {at_least}" if at_least is not None else f"> {above}"
    return f"<= {at_most}" if at_most is not None else f"< {below}"


def check_bounds(config: Any, error: type[Exception] = ConfigError,
                 name: Callable[[str], str] = _flag) -> None:
    """Check every field of the dataclass instance `config` against the bounds its field
    declares (field(..., at_least=, above=, at_most=, below=)); a None value (an optional
    setting left unset) is not checked.

    Raises `error` for the first field out of bounds, in declaration order:
    "<name> must be >= 1, got 0", where `name(field_name)` is what the user wrote (default:
    the --flag; a config file's reader passes its own, e.g. "file: max_batch_size").
    """
    for f in dataclasses.fields(config):
        at_least, above, at_most, below = (f.metadata.get(key) for key in BOUNDS)
        value = getattr(config, f.name)
        if value is None or all(f.metadata.get(key) is None for key in BOUNDS):
            continue
        if ((at_least is not None and value < at_least) or (above is not None and value <= above)
                or (at_most is not None and value > at_most) or (below is not None and value >= below)):
            note = f" ({f.metadata['bounds_note']})" if "bounds_note" in f.metadata else ""
            bounds = _bounds_text(at_least, above, at_most, below)
            raise error(f"{name(f.name)} must be {bounds}{note}, got {value}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any, optional: bool):
    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("", "none", "null"):
            return None
        if tp is bool:
            return _parse_bool(text)
        if tp is Path:
            return Path(text)
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if text not in choices:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not one of {', '.join(map(str, choices))}"
                )
            return text
        if typing.get_origin(tp) is tuple:
            (item_type, *_rest) = typing.get_args(tp)
            try:
                return tuple(item_type(part) for part in text.split(",") if part.strip())
            except ValueError as err:
                raise argparse.ArgumentTypeError(
                    f"expected a comma-separated list of {item_type.__name__}, got {text!r}"
                ) from err
        try:
            value = tp(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected {getattr(tp, '__name__', tp)}, got {text!r}"
            ) from err
        if tp is float and not math.isfinite(value):
            # float() takes "nan" and "inf", which pass every range check written as a
            # comparison (nan <= 0 is False) and cannot be saved as JSON.
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def _show_default(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return repr(value)


def build_parser(config_cls: type, prog: str | None = None, description: str | None = None):
    """An argparse parser with one flag per field of `config_cls`, defaults from the class."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (config_cls.__doc__ or "").strip().splitlines()[0],
        allow_abbrev=False,
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            # argparse %-formats help texts: a literal '%' (in a help or a default) is '%%'.
            "help": (f.metadata.get("help", "") + f" (default: {_show_default(f.default)})").replace("%", "%%"),
        }
        if tp is bool and not optional:
            # --flag / --no-flag, the usual shape for switches.
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, **kwargs
            )
            continue
        kwargs["type"] = _converter(tp, optional)
        kwargs["metavar"] = f.name.upper()
        if typing.get_origin(tp) is typing.Literal:
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(tp))) + "}"
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_config(
    config_cls: type[C],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    **overrides: Any,
) -> C:
    """Parse `argv` into `config_cls`; unknown flags and bad values exit with status 2.

    `overrides` are applied before the command line (the command line wins); they let entry
    points set defaults that come from the environment, e.g. Make variables.
    """
    parser = build_parser(config_cls, prog=prog, description=description)
    namespace = parser.parse_args(argv)
    values = {**overrides, **vars(namespace)}
    try:
        config = config_cls(**values)
        _validate(config)
    except ConfigError as err:
        parser.error(str(err))  # exits with status 2 and the usage line
    return config


def replace(config: C, **changes: Any) -> C:
    """dataclasses.replace that also re-runs validate()."""
    new = dataclasses.replace(config, **changes)
    _validate(new)
    return new


def _validate(config: Any) -> None:
    """The config's own validate() (which checks the declared bounds: every stage's does,
    before anything on disk; tests/test_common.py checks it), or check_bounds alone for a
    config without one."""
    validate = getattr(config, "validate", None)
    if validate is None:
        check_bounds(config)
    else:
        validate()


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file.

    A failed write (a full disk...) removes the temporary file and raises the OSError with
    `path` as its filename (see write_failure).
    """
    path = Path(path)

    def write(fh: IO[str]) -> None:
        json.dump(to_jsonable(payload), fh, indent=2, sort_keys=False)
        fh.write("\n")

    with naming_file(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, write)


def write_file_atomic(path: Path, write: Callable[[IO], None], binary: bool = False,
                      tmp: Path | None = None) -> None:
    """Write `path` whole or not at all: `write(fh)` fills a temporary file beside it (text,
    UTF-8, or `binary`), which is flushed, synced to disk and renamed over `path`.

    Any failure removes the temporary file (default `.<name>.tmp-<pid>`), leaves `path` as it
    was and re-raises; wrap the call in naming_file(path) so that an OSError names the file.
    """
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Failed writes: one line naming the file and the cause
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock(2) on `lock_file` (created with its folder if absent) for the
    block: processes entering with the same file wait in turn. Released on exit, and by the
    kernel when the holder dies. Raises OSError when the file cannot be opened."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def naming_file(path: Path) -> Iterator[None]:
    """Give an OSError raised in the block `path` as its filename when it names none.

    The kernel reports a failed write() or fsync() with an errno only ("[Errno 28] No space
    left on device"); only open() names the file. Wrap each write in this so the error can.
    """
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            err.filename = str(path)
        raise


# TensorFlow's file systems end their messages with strerror(errno) after the file:
# "<file>; No space left on device" (tsl/platform/errors.h IOError); the errno's name is
# found back from that text.
_STRERROR_NAMES = {os.strerror(code): name for code, name in sorted(errno.errorcode.items(), reverse=True)}
_TF_DECORATIONS = re.compile(r"^\s*\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]\s*$")  # "{{function_node ...}}", "[Op:SaveV2]"
_H5PY_FILE = re.compile(r"filename = '(?P<file>[^']+)'")


def write_failure(err: BaseException) -> str | None:
    """`"<file>: <cause> (<ERRNO>)"` when `err` is a failed file operation, else None.

    Understands OSError (its filename, or the one naming_file() gave it; h5py's OSErrors name
    the file in their message), and TensorFlow's file-system errors, whose message ends in
    "<file>; <strerror>" (e.g. ResourceExhaustedError "...; No space left on device
    [Op:SaveV2]"). Connection and timeout errors are not file operations: None. Entry points
    print the result as one `error:` line instead of a traceback.
    """
    if isinstance(err, (ConnectionError, TimeoutError)):
        return None
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, str(err.errno))
        cause = os.strerror(err.errno)  # h5py's strerror is a paragraph; the errno says it all
        file = err.filename
        if file is None:
            match = _H5PY_FILE.search(str(err))
            file = match.group("file") if match else None
        return f"{file}: {cause} ({name})" if file is not None else f"{cause} ({name})"
    if type(err).__module__.startswith("tensorflow"):
        message = str(getattr(err, "message", "") or err).strip()
        for line in reversed(message.splitlines()):
            line = _TF_DECORATIONS.sub("", line)
            for cause in sorted(_STRERROR_NAMES, key=len, reverse=True):
                if line.endswith(cause) and "/" in line[: -len(cause)]:
                    context = line[: -len(cause)].rstrip(" ;:")
                    return f"{context}: {cause} ({_STRERROR_NAMES[cause]})"
    return None


def remove_leftovers(folder: Path, pattern: str) -> list[Path]:
    """Delete what killed writers left in `folder`: the entries whose whole name matches the
    regular expression `pattern`, whose group `pid` names a process that is gone.

    Temporary files and folders here are named after their writer's pid (e.g.
    `.tmp-export-<pid>-<ms>`): a live writer's are kept, a dead one's can only be leftovers.
    Returns the paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = re.fullmatch(pattern, path.name)
        if match and not pid_alive(int(match.group("pid"))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


TMP_INFIX = ".tmp-"  # `.<name>.tmp-<pid>`: a file, folder or link being written by process <pid>


def point_link_at(link: Path, target: Path, error: type[Exception] = ConfigError) -> None:
    """Atomically make `link` a relative symlink to `target` (artifacts/mobile, runs/latest).

    The new link is made beside `link` and renamed over it, so readers see the old target or
    the new one, never neither; leftovers of dead processes are removed first. Raises `error`
    (the caller's own error type) when `link` is a real file or folder, or when the link
    cannot be written (the message names the file and the cause; `link` is left as it was).
    """
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise error(f"{link} exists and is not a symlink; move it away first")
    remove_leftovers(link.parent, re.escape(f".{link.name}{TMP_INFIX}") + r"(?P<pid>\d+)")
    tmp = link.with_name(f".{link.name}{TMP_INFIX}{os.getpid()}")
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        with naming_file(tmp):
            os.symlink(os.path.relpath(target, link.parent), tmp)
        with naming_file(link):
            os.replace(tmp, link)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        before = f"still points at {os.readlink(link)}" if link.is_symlink() else "was not made"
        raise error(f"cannot point {link} at {target}: {write_failure(err)}; {link} {before}") from err


def pid_alive(pid: int) -> bool:
    """Is process `pid` running? For files named after their writer's pid (temporary export
    folders, the local server's pid file): a dead writer's file is a leftover."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def save_config(config: Any, path: Path) -> None:
    """Write the resolved config as JSON (the record of how an artifact was made)."""
    write_json_atomic(path, config)


def load_config(config_cls: type[C], path: Path) -> C:
    """Read a config saved by save_config back into its dataclass; unknown keys fail."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} for {config_cls.__name__}")
    values = {}
    for name, value in data.items():
        tp, _optional = _unwrap_optional(hints[name])
        if value is not None and tp is Path:
            value = Path(value)
        elif value is not None and typing.get_origin(tp) is tuple:
            value = tuple(value)
        values[name] = value
    return config_cls(**values)
