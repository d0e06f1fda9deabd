"""Wire messages: each has one parser (`from_json`) and one writer (`to_json`).

Parsers are strict: unknown fields, wrong types and oversize values raise `PermanentError`
with a reason a person can act on. Nothing here touches a shell: `training_config` is split
into an argument list once, here, and travels as a list from then on.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from pcp.core.errors import PermanentError
from pcp.core.names import (
    MARKER_METADATA_KEY,
    MARKER_PATH_RE,
    NODE_RE,
    STACK_RE,
    Names,
    marker_path,
)
from pcp.core.timefmt import iso, parse_time

RUN_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
#: A run's secret (docs/agent.md, PCP_RUN_SECRET): hex, drawn where the run is accepted.
SECRET_RE = re.compile(r"^[0-9a-f]{32,128}$")
PLATFORM_RE = re.compile(r"^[a-z0-9_]+-[a-z0-9_]+$")
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CONFIG_BYTES = 16 * 1024
MAX_TEXT = 1024
MAX_RESTARTS = 10

JsonObj = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------- parsing helpers


def utf8(text: str, what: str) -> bytes:
    """`text` as UTF-8, or a `PermanentError` (a lone surrogate such as "\\ud800" has none)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PermanentError(
            f"{what} is not valid Unicode text: {e.reason} at character {e.start}"
        ) from None


def decode_json(data: bytes | str, what: str, limit: int | None = MAX_MESSAGE_BYTES) -> Any:
    """Untrusted bytes as a JSON value: the one place pcp turns bytes into JSON.

    Every way the text can fail is a `PermanentError` naming `what`: oversize, not UTF-8, not
    encodable, not JSON, nested deeper than the parser can follow, or an integer with more
    digits than Python converts. Nothing else escapes.
    """
    if isinstance(data, str):
        data = utf8(data, what)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PermanentError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if limit is not None and len(data) > limit:
        raise PermanentError(f"{what} is {len(data)} bytes; the limit is {limit}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PermanentError(f"{what} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PermanentError(
            f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise PermanentError(f"{what} is nested too deeply to parse") from None
    except ValueError as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise PermanentError(f"{what} cannot be parsed as JSON: {e}") from None


def load_object(data: bytes | str, what: str) -> JsonObj:
    """Parse a JSON object, with a precise reason when it is not one. Blank input is {}."""
    raw = utf8(data, what) if isinstance(data, str) else data
    if isinstance(raw, bytes | bytearray) and len(raw) <= MAX_MESSAGE_BYTES and not raw.strip():
        return {}
    obj = decode_json(raw, what)
    if not isinstance(obj, dict):
        raise PermanentError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def untrusted(what: str, keep: tuple[type[Exception], ...] = ()) -> Callable[[F], F]:
    """Decorate a parser of untrusted input: any exception but a `PermanentError` becomes one.

    `keep` names further exceptions that are answers rather than failures (passed through).

    The parsers above raise `PermanentError` for every case they know; this is the backstop
    that keeps a case nobody thought of (a type error deep in a nested value, a recursion
    limit) from escaping as a crash that a trigger would redeliver forever.
    """

    def wrap(parse: F) -> F:
        @functools.wraps(parse)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return parse(*args, **kwargs)
            except PermanentError:
                raise
            except keep:
                raise
            except RecursionError:
                raise PermanentError(f"{what} is nested too deeply to parse") from None
            except Exception as e:  # noqa: BLE001 - the boundary: nothing else may escape
                raise PermanentError(
                    f"{what} cannot be parsed: {type(e).__name__}: {e}"
                ) from None

        return guarded  # type: ignore[return-value]

    return wrap


def dump(obj: JsonObj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def check_fields(obj: JsonObj, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed)
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PermanentError(
        f"unknown field {key!r} in {what}{hint}; allowed fields: {', '.join(allowed)}"
    )


def _bool(obj: JsonObj, key: str, what: str, default: bool = False) -> bool:
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise PermanentError(f"{what}: {key} must be true or false, got {v!r}")
    return v


def _text(obj: JsonObj, key: str, what: str, limit: int = MAX_TEXT) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise PermanentError(f"{what}: {key} must be a string, got {type(v).__name__}")
    if len(utf8(v, f"{what}: {key}")) > limit:
        raise PermanentError(f"{what}: {key} is longer than {limit} bytes")
    if "\x00" in v:
        raise PermanentError(f"{what}: {key} contains a NUL character")
    return v


def _int(obj: JsonObj, key: str, what: str, lo: int, hi: int, default: int) -> int:
    v = obj.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise PermanentError(f"{what}: {key} must be a whole number, got {v!r}")
    if not lo <= v <= hi:
        raise PermanentError(f"{what}: {key} must be between {lo} and {hi}, got {v}")
    return v


def validate_run_id(value: object, what: str = "run_id") -> str:
    if not isinstance(value, str):
        raise PermanentError(f"{what} must be a string, got {type(value).__name__}")
    if not RUN_ID_RE.match(value):
        raise PermanentError(
            f"{what} {value!r} is invalid: use 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter (it becomes a storage path and a VM label)"
        )
    return value


def validate_secret(value: object, what: str) -> str:
    """A run secret as stored or sent to its nodes; "" when there is none."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not SECRET_RE.match(value):
        raise PermanentError(f"{what}: secret must be 32-128 lowercase hex digits")
    return value


def run_id_from_message_id(message_id: str) -> str:
    """A stable run id for a request that named none, so a redelivery is the same run."""
    cleaned = re.sub(r"[^a-z0-9-]", "-", message_id.lower()).strip("-")
    if not cleaned:
        raise PermanentError(f"cannot derive a run id from message id {message_id!r}")
    return validate_run_id(f"run-{cleaned}"[:63].rstrip("-"))


@untrusted("training_config")
def split_training_config(value: object) -> tuple[str, ...]:
    """`training_config` as an argument list: a string split shell-style, or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, list):
        if not all(isinstance(a, str) for a in value):
            raise PermanentError("training_config as a list must hold only strings")
        size = sum(len(utf8(a, "training_config")) + 1 for a in value)
        args = tuple(value)
    elif isinstance(value, str):
        size = len(utf8(value, "training_config"))
        if size > MAX_CONFIG_BYTES:
            raise PermanentError(
                f"training_config is {size} bytes; the limit is {MAX_CONFIG_BYTES} (16 KiB)"
            )
        try:
            args = tuple(shlex.split(value, posix=True))
        except ValueError as e:
            raise PermanentError(f"training_config has unbalanced quotes: {e}") from None
    else:
        raise PermanentError(
            f"training_config must be a string or a list of strings, got {type(value).__name__}"
        )
    if size > MAX_CONFIG_BYTES:
        raise PermanentError(
            f"training_config is {size} bytes; the limit is {MAX_CONFIG_BYTES} (16 KiB)"
        )
    if any("\x00" in a for a in args):
        raise PermanentError("training_config contains a NUL character")
    return args


#: A binary of this form is a stock torchrun script, module or program, started under
#: torchrun on the workers (docs/agent.md, "The torchrun launcher").
TORCHRUN_PREFIX = "torchrun:"
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
PROGRAM_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
NIX_STORE = "/nix/store/"
TORCHRUN_FORMS = ("torchrun:/abs/script.py, torchrun:package.module, "
                  "torchrun:FLAKE#PKG!PROGRAM or torchrun:/nix/store/...!PROGRAM")


def torchrun_target(spec: str, what: str = "binary") -> str | None:
    """What a `torchrun:` binary names (the text after the prefix), or None for any other
    binary. Strict, because the target becomes an element of torchrun's argument list:
    one word, never an option (a leading '-'), no '..', and of one of the forms
    `TORCHRUN_FORMS` lists."""
    if not spec.startswith(TORCHRUN_PREFIX):
        return None
    target = spec.removeprefix(TORCHRUN_PREFIX)
    forms = f"use {TORCHRUN_FORMS}"
    if not target or any(c.isspace() for c in target) or "\x00" in target:
        raise PermanentError(f"{what}: {spec!r} must name one word after torchrun: ({forms})")
    if target.startswith("-"):
        raise PermanentError(f"{what}: {spec!r}: the target must not start with '-' "
                             f"(torchrun would read it as one of its options); {forms}")
    base, bang, program = target.rpartition("!") if "!" in target else (target, "", "")
    if bang and (not base or not PROGRAM_RE.match(program)):
        raise PermanentError(f"{what}: {spec!r}: after '!' must come a program name under "
                             f"bin/ ({forms})")
    if base.startswith("/"):
        if ".." in base.split("/"):
            raise PermanentError(f"{what}: {spec!r}: the path must not contain '..'")
        if bang and not base.startswith(NIX_STORE):
            raise PermanentError(f"{what}: {spec!r}: '!PROGRAM' applies only to a Nix store "
                                 f"path or a flake ({forms})")
        return target
    if base.endswith(".py"):
        raise PermanentError(f"{what}: {spec!r}: a script must be an absolute path (it is "
                             f"read on the workers); {forms}")
    if MODULE_RE.match(base) and not bang:
        return target
    if "#" in base or re.match(r"^[a-z][a-z0-9+.-]*:", base):
        if not bang:
            raise PermanentError(f"{what}: {spec!r}: a flake under torchrun must name its "
                                 "program, FLAKE#PKG!PROGRAM (the output is a Python "
                                 "environment with torch, whose bin/ holds several programs)")
        return target
    raise PermanentError(f"{what}: {spec!r} is neither an absolute path, a dotted module "
                         f"name nor a Nix reference; {forms}")


def is_torchrun(binary: str | dict[str, str] | None) -> bool:
    """Whether a (validated) binary runs under the torchrun launcher."""
    if isinstance(binary, dict):
        return any(v.startswith(TORCHRUN_PREFIX) for v in binary.values())
    return binary is not None and binary.startswith(TORCHRUN_PREFIX)


def _binary(obj: JsonObj, what: str) -> str | dict[str, str] | None:
    """A flake reference or store path, or a map platform -> store path."""
    v = obj.get("binary")
    if v is None:
        return None
    if isinstance(v, str):
        text = _text(obj, "binary", what)
        if not text or not text.strip() or any(c in text for c in "\n\r"):
            raise PermanentError(f"{what}: binary must be a non-empty single line")
        torchrun_target(text, f"{what}: binary")
        return text
    if isinstance(v, dict):
        if not v:
            raise PermanentError(f"{what}: binary map must name at least one platform")
        out: dict[str, str] = {}
        for platform, ref in v.items():
            if not PLATFORM_RE.match(platform):
                raise PermanentError(
                    f"{what}: binary platform {platform!r} must look like x86_64-linux"
                )
            if not isinstance(ref, str) or not ref.strip() or "\n" in ref or len(ref) > MAX_TEXT:
                raise PermanentError(f"{what}: binary for {platform} must be a non-empty line")
            utf8(ref, f"{what}: binary for {platform}")
            torchrun_target(ref, f"{what}: binary for {platform}")
            out[platform] = ref
        if len({ref.startswith(TORCHRUN_PREFIX) for ref in out.values()}) > 1:
            raise PermanentError(f"{what}: binary map mixes torchrun: and other binaries; "
                                 "a run is launched one way on every platform")
        return out
    raise PermanentError(f"{what}: binary must be a string or a platform map")


# ---------------------------------------------------------------- start request


def _metrics_node(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not NODE_RE.match(value):
        raise PermanentError(f"{what}: metrics_node {value!r} must be shepherd or worker-<n>")
    return value

START_FIELDS = (
    "run_id",
    "stack",
    "keep_vm_alive",
    "training_config",
    "binary",
    "max_hours",
    "max_restarts",
    "requested_by",
    "layout",
    "metrics_node",
)

#: How ranks are numbered (docs/agent.md, "Rank layouts"): `all-nodes` makes the shepherd
#: rank 0 of WORLD_SIZE = nodes; `workers-only` makes the workers ranks 0..N-1 of
#: WORLD_SIZE = N and leaves the shepherd to host the rendezvous store as no rank.
LAYOUTS = ("all-nodes", "workers-only")
DEFAULT_LAYOUT = "all-nodes"


def metrics_node_of(layout: str, named: str | None = None) -> str:
    """The node whose metrics.json the run summary reads: the one the run names, else rank 0
    of its layout (the shepherd in `all-nodes`, worker-0 in `workers-only`)."""
    if named is not None:
        return named
    return "worker-0" if layout == "workers-only" else "shepherd"


def run_layout(layout: str | None, binary: str | dict[str, str] | None, default: str) -> str:
    """The layout a run gets: `workers-only` under the torchrun launcher (the workers are
    the ranks, the shepherd hosts the rendezvous), else the request's, else the stack's."""
    if is_torchrun(binary):
        return "workers-only"
    return layout or default


def validate_layout(value: object, what: str) -> str | None:
    if value is None:
        return None
    if value not in LAYOUTS:
        raise PermanentError(f"{what}: layout must be one of {', '.join(LAYOUTS)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class StartRequest:
    """A request to run training on a stack. Every field is optional on the wire."""

    run_id: str
    keep_vm_alive: bool = False
    training_args: tuple[str, ...] = ()
    binary: str | dict[str, str] | None = None
    max_hours: float | None = None
    max_restarts: int = 0
    requested_by: str | None = None
    stack: str | None = None
    #: The rank layout; None takes the stack's default.
    layout: str | None = None
    #: The node whose metrics.json the run summary reads; None: rank 0 of the layout.
    metrics_node: str | None = None
    #: The run's secret, drawn by the function that accepts the request (never on the wire:
    #: no parser reads it and no writer writes it; the run record keeps it). Not compared,
    #: so a redelivered request still equals the one accepted.
    secret: str = field(default="", repr=False, compare=False)

    @classmethod
    @untrusted("start request")
    def from_json(cls, data: bytes | str, message_id: str | None = None) -> StartRequest:
        return cls.from_dict(load_object(data, "start request"), message_id)

    @classmethod
    @untrusted("start request")
    def from_dict(cls, obj: JsonObj, message_id: str | None = None) -> StartRequest:
        """The parser behind from_json, for a request already decoded (the CLI builds one)."""
        what = "start request"
        check_fields(obj, START_FIELDS, what)
        if obj.get("run_id") is not None:
            run_id = validate_run_id(obj["run_id"])
        elif message_id:
            run_id = run_id_from_message_id(message_id)
        else:
            raise PermanentError("start request has no run_id and no message id to derive one")
        stack = _text(obj, "stack", what)
        if stack is not None and not STACK_RE.match(stack):
            raise PermanentError(f"{what}: stack {stack!r} is not a valid stack name")
        max_hours = obj.get("max_hours")
        if max_hours is not None:
            if isinstance(max_hours, bool) or not isinstance(max_hours, (int, float)):
                raise PermanentError(f"{what}: max_hours must be a number, got {max_hours!r}")
            if not max_hours > 0 or max_hours != max_hours or max_hours == float("inf"):
                raise PermanentError(f"{what}: max_hours must be positive, got {max_hours}")
            max_hours = float(max_hours)
        binary = _binary(obj, what)
        layout = validate_layout(obj.get("layout"), what)
        if layout == "all-nodes" and is_torchrun(binary):
            raise PermanentError(f"{what}: layout all-nodes cannot apply to a torchrun: binary "
                                 "(torchrun runs the ranks on the workers and the shepherd "
                                 "hosts the rendezvous); drop layout or use workers-only")
        return cls(
            run_id=run_id,
            keep_vm_alive=_bool(obj, "keep_vm_alive", what),
            training_args=split_training_config(obj.get("training_config")),
            binary=binary,
            max_hours=max_hours,
            max_restarts=_int(obj, "max_restarts", what, 0, MAX_RESTARTS, 0),
            requested_by=_text(obj, "requested_by", what, 256),
            stack=stack,
            layout=layout,
            metrics_node=_metrics_node(obj.get("metrics_node"), what),
        )

    def to_dict(self) -> JsonObj:
        out: JsonObj = {"run_id": self.run_id, "keep_vm_alive": self.keep_vm_alive}
        if self.training_args:
            out["training_config"] = list(self.training_args)
        if self.binary is not None:
            out["binary"] = self.binary
        if self.max_hours is not None:
            out["max_hours"] = self.max_hours
        if self.max_restarts:
            out["max_restarts"] = self.max_restarts
        if self.requested_by is not None:
            out["requested_by"] = self.requested_by
        if self.stack is not None:
            out["stack"] = self.stack
        if self.layout is not None:
            out["layout"] = self.layout
        if self.metrics_node is not None:
            out["metrics_node"] = self.metrics_node
        return out

    def to_json(self) -> bytes:
        return dump(self.to_dict())


# ---------------------------------------------------------------- stop request

STOP_FIELDS = ("run_id", "reason", "requested_by")


@dataclass(frozen=True)
class StopRequest:
    run_id: str
    reason: str = "stop requested"
    requested_by: str | None = None

    @classmethod
    @untrusted("stop request")
    def from_json(cls, data: bytes | str) -> StopRequest:
        what = "stop request"
        obj = load_object(data, what)
        check_fields(obj, STOP_FIELDS, what)
        if obj.get("run_id") is None:
            raise PermanentError("stop request must name a run_id")
        return cls(
            run_id=validate_run_id(obj["run_id"]),
            reason=_text(obj, "reason", what, 512) or "stop requested",
            requested_by=_text(obj, "requested_by", what, 256),
        )

    def to_json(self) -> bytes:
        out: JsonObj = {"run_id": self.run_id, "reason": self.reason}
        if self.requested_by is not None:
            out["requested_by"] = self.requested_by
        return dump(out)


# ---------------------------------------------------------------- node markers

MarkerKind = Literal["booted", "done"]
MARKER_FIELDS = ("run_id", "node", "attempt", "at", "exit_code", "signal", "duration_s", "host")


@dataclass(frozen=True)
class NodeMarker:
    """`booted` or `done`, written by a node agent under markers/<run_id>/<node>/."""

    run_id: str
    node: str
    kind: MarkerKind
    attempt: int
    at: datetime
    exit_code: int | None = None
    signal: str | None = None
    duration_s: float | None = None
    host: str | None = None

    @staticmethod
    @untrusted("marker name")
    def parse_path(name: str) -> tuple[str, str, MarkerKind]:
        m = MARKER_PATH_RE.match(name)
        if not m:
            raise PermanentError(
                f"object {name!r} is not a node marker "
                "(expected markers/<run_id>/<node>/booted.json or done.json)"
            )
        run_id, node, kind = m.group(1), m.group(2), m.group(3)
        validate_run_id(run_id, "marker run id")
        if not NODE_RE.match(node):
            raise PermanentError(f"marker node {node!r} must be shepherd or worker-<n>")
        return run_id, node, "booted" if kind == "booted" else "done"

    @classmethod
    @untrusted("marker")
    def from_json(cls, data: bytes | str, object_name: str) -> NodeMarker:
        run_id, node, kind = cls.parse_path(object_name)
        what = f"marker {object_name}"
        obj = load_object(data, what)
        check_fields(obj, MARKER_FIELDS, what)
        body_run, body_node = obj.get("run_id", run_id), obj.get("node", node)
        if body_run != run_id or body_node != node:
            raise PermanentError(f"{what}: body names {body_run}/{body_node}")
        exit_code = obj.get("exit_code")
        if exit_code is not None and (
            isinstance(exit_code, bool) or not isinstance(exit_code, int)
        ):
            raise PermanentError(f"{what}: exit_code must be a whole number or null")
        signal = obj.get("signal")
        if signal is not None:
            signal = str(signal)[:32]
            utf8(signal, f"{what}: signal")
        duration = obj.get("duration_s")
        if duration is not None and (
            isinstance(duration, bool) or not isinstance(duration, (int, float))
        ):
            raise PermanentError(f"{what}: duration_s must be a number or null")
        if kind == "done" and exit_code is None and signal is None:
            raise PermanentError(f"{what}: a done marker needs an exit_code or a signal")
        if kind == "booted":  # how a node ended is said by `done` only (and written only there)
            exit_code, signal, duration = None, None, None
        return cls(
            run_id=run_id,
            node=node,
            kind=kind,
            attempt=_int(obj, "attempt", what, 1, 1000, 1),
            at=parse_time(obj.get("at"), f"{what}: at"),
            exit_code=exit_code,
            signal=signal,
            duration_s=None if duration is None else float(duration),
            host=_text(obj, "host", what, 256),
        )

    @classmethod
    @untrusted("marker metadata")
    def from_metadata(cls, metadata: object, object_name: str) -> NodeMarker | None:
        """The marker a writer also put in the object's custom metadata, or None.

        Listings and storage notifications carry custom metadata, so a marker that describes
        itself there is known without reading the object.
        """
        body = metadata.get(MARKER_METADATA_KEY) if isinstance(metadata, dict) else None
        if not isinstance(body, str):
            return None
        return cls.from_json(body, object_name)

    def to_metadata(self) -> dict[str, str]:
        return {MARKER_METADATA_KEY: self.to_json().decode()}

    @property
    def path(self) -> str:
        return marker_path(self.run_id, self.node, self.kind)

    @property
    def succeeded(self) -> bool:
        return self.kind == "done" and self.exit_code == 0 and self.signal is None

    def to_json(self) -> bytes:
        out: JsonObj = {
            "run_id": self.run_id,
            "node": self.node,
            "attempt": self.attempt,
            "at": iso(self.at),
        }
        if self.kind == "done":
            out.update(exit_code=self.exit_code, signal=self.signal, duration_s=self.duration_s)
        if self.host is not None:
            out["host"] = self.host
        return dump(out)


# ---------------------------------------------------------------- sweep tick

SWEEP_FIELDS = ("op", "requested_by")


@dataclass(frozen=True)
class SweepTick:
    """What Cloud Scheduler (or `pcp sweep`) publishes. The body carries nothing essential."""

    requested_by: str | None = None

    @classmethod
    @untrusted("sweep tick")
    def from_json(cls, data: bytes | str) -> SweepTick:
        what = "sweep tick"
        obj = load_object(data, what)
        check_fields(obj, SWEEP_FIELDS, what)
        if obj.get("op", "tick") != "tick":
            raise PermanentError(f"{what}: op must be 'tick', got {obj.get('op')!r}")
        return cls(requested_by=_text(obj, "requested_by", what, 256))

    def to_json(self) -> bytes:
        out: JsonObj = {"op": "tick"}
        if self.requested_by is not None:
            out["requested_by"] = self.requested_by
        return dump(out)


# ---------------------------------------------------------------- node assignment

ASSIGNMENT_FIELDS = (
    "run_id",
    "attempt",
    "stack",
    "node",
    "role",
    "rank",
    "num_nodes",
    "head_host",
    "port",
    "binary",
    "args",
    "deadline",
    "boot_deadline",
    "keep_vm_alive",
    "secret",
    "layout",
)


@dataclass(frozen=True)
class Assignment:
    """Everything a node needs to take part in one attempt of a run.

    Workers read it from instance metadata (key `pcp-assignment`); the shepherd receives it
    inside a `ShepherdCommand`.
    """

    run_id: str
    attempt: int
    stack: str
    node: str
    role: Literal["shepherd", "worker"]
    rank: int
    num_nodes: int
    head_host: str
    port: int
    binary: str | dict[str, str] | None
    args: tuple[str, ...]
    deadline: datetime
    boot_deadline: datetime
    keep_vm_alive: bool = False
    #: The run's secret: only its nodes receive it (this assignment, the shepherd command),
    #: never a label or a log line. The binary gets it as PCP_RUN_SECRET (docs/agent.md).
    secret: str = field(default="", repr=False)
    layout: str = DEFAULT_LAYOUT

    @property
    def vm(self) -> str:
        """The VM this assignment is for: pcp-<stack>-worker-<i> (the shepherd is no VM)."""
        vm = Names(self.stack).vm_of(self.node)
        if vm is None:
            raise PermanentError(f"node {self.node!r} runs on no VM of the stack")
        return vm

    @property
    def head_node(self) -> str:
        return f"{self.head_host}:{self.port}"

    @property
    def launcher(self) -> str:
        """`torchrun` for a `torchrun:` binary (docs/agent.md), else `contract`."""
        return "torchrun" if is_torchrun(self.binary) else "contract"

    def argv(self, executable: str) -> list[str]:
        """The binary's argument list (the contract in docs/agent.md). Never through a shell."""
        if self.role == "shepherd":
            return [executable, "shepherd", f"--port={self.port}", *self.args]
        return [executable, "worker", f"--head-node={self.head_node}", *self.args]

    def env(self, output_dir: str) -> dict[str, str]:
        """The binary's environment (the table in docs/agent.md, "Rank layouts").

        `rank` is the node's index (shepherd 0, worker-i i); the torch variables follow the
        layout. The shepherd's MASTER_ADDR is the loopback address: the store it hosts (or the
        one rank 0 starts in `all-nodes`) listens on every interface, and its public name may
        not be reachable from inside (NAT hairpin).
        """
        workers = self.num_nodes - 1
        env = {
            "PCP_RUN_ID": self.run_id,
            "PCP_ATTEMPT": str(self.attempt),
            "PCP_STACK": self.stack,
            "PCP_NODE": self.node,
            "PCP_ROLE": self.role,
            "PCP_LAYOUT": self.layout,
            "PCP_NODE_RANK": str(self.rank),
            "PCP_NUM_NODES": str(self.num_nodes),
            "PCP_NUM_WORKERS": str(workers),
            "PCP_HEAD_NODE": self.head_node,
            "PCP_OUTPUT_DIR": output_dir,
            "MASTER_ADDR": "127.0.0.1" if self.role == "shepherd" else self.head_host,
            "MASTER_PORT": str(self.port),
            **({"PCP_RUN_SECRET": self.secret} if self.secret else {}),
        }
        if self.role == "worker":
            env["PCP_WORKER_RANK"] = str(self.rank - 1)
        if self.launcher == "torchrun":
            # torchrun gives its processes RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and the
            # rest from its rendezvous; the launcher itself reads none of them.
            env["PCP_LAUNCHER"] = "torchrun"
            del env["MASTER_ADDR"], env["MASTER_PORT"]
            return env
        if self.layout == "workers-only":
            env["WORLD_SIZE"] = str(workers)
            if self.role == "worker":
                # The shepherd hosts the store: every rank, rank 0 too, is a client of it.
                env.update(RANK=str(self.rank - 1), GROUP_RANK=str(self.rank - 1),
                           TORCHELASTIC_USE_AGENT_STORE="True")
        else:
            env.update(RANK=str(self.rank), GROUP_RANK=str(self.rank),
                       WORLD_SIZE=str(self.num_nodes))
        if "RANK" in env:
            env.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_WORLD_SIZE=env["WORLD_SIZE"])
        return env

    def to_dict(self) -> JsonObj:
        return {
            "run_id": self.run_id,
            "attempt": self.attempt,
            "stack": self.stack,
            "node": self.node,
            "role": self.role,
            "rank": self.rank,
            "num_nodes": self.num_nodes,
            "head_host": self.head_host,
            "port": self.port,
            "binary": self.binary,
            "args": list(self.args),
            "deadline": iso(self.deadline),
            "boot_deadline": iso(self.boot_deadline),
            "keep_vm_alive": self.keep_vm_alive,
            **({"secret": self.secret} if self.secret else {}),
            **({"layout": self.layout} if self.layout != DEFAULT_LAYOUT else {}),
        }

    def to_json(self) -> bytes:
        return dump(self.to_dict())

    @classmethod
    @untrusted("assignment")
    def from_dict(cls, obj: JsonObj) -> Assignment:
        what = "assignment"
        check_fields(obj, ASSIGNMENT_FIELDS, what)
        role = obj.get("role")
        if role not in ("shepherd", "worker"):
            raise PermanentError(f"{what}: role must be shepherd or worker, got {role!r}")
        node = obj.get("node")
        if not isinstance(node, str) or not NODE_RE.match(node):
            raise PermanentError(f"{what}: node {node!r} must be shepherd or worker-<n>")
        args = obj.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise PermanentError(f"{what}: args must be a list of strings")
        for i, arg in enumerate(args):
            utf8(arg, f"{what}: args[{i}]")
        head = _text(obj, "head_host", what, 256)
        if not head:
            raise PermanentError(f"{what}: head_host is required")
        return cls(
            run_id=validate_run_id(obj.get("run_id")),
            attempt=_int(obj, "attempt", what, 1, 1000, 1),
            stack=_text(obj, "stack", what, 64) or "",
            node=node,
            role=role,
            rank=_int(obj, "rank", what, 0, 100000, 0),
            num_nodes=_int(obj, "num_nodes", what, 1, 100001, 1),
            head_host=head,
            port=_int(obj, "port", what, 1, 65535, 9000),
            binary=_binary(obj, what),
            args=tuple(args),
            deadline=parse_time(obj.get("deadline"), f"{what}: deadline"),
            boot_deadline=parse_time(obj.get("boot_deadline"), f"{what}: boot_deadline"),
            keep_vm_alive=_bool(obj, "keep_vm_alive", what),
            secret=validate_secret(obj.get("secret"), what),
            layout=validate_layout(obj.get("layout"), what) or DEFAULT_LAYOUT,
        )

    @classmethod
    @untrusted("assignment")
    def from_json(cls, data: bytes | str) -> Assignment:
        return cls.from_dict(load_object(data, "assignment"))


# ---------------------------------------------------------------- shepherd command

SHEPHERD_FIELDS = ("action", "run_id", "attempt", "assignment", "reason")


@dataclass(frozen=True)
class ShepherdCommand:
    """Published on `pcp-<stack>-shepherd`; pulled by the shepherd host's daemon."""

    action: Literal["start", "stop"]
    run_id: str
    attempt: int
    assignment: Assignment | None = None
    reason: str = ""

    @classmethod
    @untrusted("shepherd command")
    def from_json(cls, data: bytes | str) -> ShepherdCommand:
        what = "shepherd command"
        obj = load_object(data, what)
        check_fields(obj, SHEPHERD_FIELDS, what)
        action = obj.get("action")
        if action not in ("start", "stop"):
            raise PermanentError(f"{what}: action must be start or stop, got {action!r}")
        raw = obj.get("assignment")
        assignment = None
        if raw is not None:
            if not isinstance(raw, dict):
                raise PermanentError(f"{what}: assignment must be an object")
            assignment = Assignment.from_dict(raw)
        if action == "start" and assignment is None:
            raise PermanentError(f"{what}: start needs an assignment")
        return cls(
            action=action,
            run_id=validate_run_id(obj.get("run_id")),
            attempt=_int(obj, "attempt", what, 1, 1000, 1),
            assignment=assignment,
            reason=_text(obj, "reason", what, 512) or "",
        )

    def to_json(self) -> bytes:
        out: JsonObj = {"action": self.action, "run_id": self.run_id, "attempt": self.attempt}
        if self.assignment is not None:
            out["assignment"] = self.assignment.to_dict()
        if self.reason:
            out["reason"] = self.reason
        return dump(out)

    def attributes(self) -> dict[str, str]:
        return {"action": self.action, "run_id": self.run_id, "attempt": str(self.attempt)}


__all__ = [
    "DEFAULT_LAYOUT",
    "TORCHRUN_PREFIX",
    "is_torchrun",
    "run_layout",
    "torchrun_target",
    "LAYOUTS",
    "metrics_node_of",
    "Assignment",
    "NodeMarker",
    "ShepherdCommand",
    "StartRequest",
    "StopRequest",
    "SweepTick",
]
