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
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pcp.core.errors import PermanentError
from pcp.core.images import parse_image
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
#: What pcp accepts as a wandb project and entity (user or team): they go into the binary's
#: environment and into a https://wandb.ai/ENTITY/PROJECT/... link, so nothing that needs
#: quoting (wandb refuses / \\ # ? % : in project names itself).
WANDB_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WANDB_ENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
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


#: The largest dollar amount pcp accepts anywhere (a cap, a budget): beyond it a typo is likelier.
MAX_USD = 1e9


def positive_usd(value: object, what: str) -> float | None:
    """A dollar amount: a positive, finite number (None when absent)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PermanentError(f"{what} must be a number of US dollars, got {value!r}")
    number = float(value) if not isinstance(value, int) or abs(value) <= MAX_USD else MAX_USD * 2
    if not (number > 0 and number <= MAX_USD):  # NaN fails both comparisons
        raise PermanentError(f"{what} must be a positive, finite number of US dollars "
                             f"(at most {MAX_USD:g}), got {value!r}")
    return number


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


# ---------------------------------------------------------------- GPU-idle policy

GPU_IDLE_FIELDS = ("below_percent", "minutes", "after_minutes")
MAX_GPU_IDLE_MINUTES = 7 * 24 * 60
_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smh]?)$")
_DURATION_UNIT = {"s": 1 / 60, "m": 1.0, "": 1.0, "h": 60.0}


def _number(obj: JsonObj, key: str, what: str, lo: float, hi: float, default: float | None,
            lo_open: bool = False) -> float:
    v = obj.get(key, default)
    if v is None:
        raise PermanentError(f"{what}: {key} is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise PermanentError(f"{what}: {key} must be a number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        bound = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
        raise PermanentError(f"{what}: {key} must be {bound} and at most {hi:g}, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class GpuIdle:
    """A run's GPU utilization policy (docs/agent.md, "GPU-idle watchdog"): the node ends with
    reason `gpu_idle` when every GPU on it stays below `below_percent` utilization for
    `minutes`, counted once `after_minutes` have passed since the binary started."""

    below_percent: float
    minutes: float
    after_minutes: float = 0.0

    @classmethod
    @untrusted("gpu_idle")
    def from_value(cls, value: object, what: str = "gpu_idle") -> GpuIdle | None:
        """The wire form, {"below_percent": 5, "minutes": 15, "after_minutes": 10}; null: none."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise PermanentError(f"{what} must be an object like {{\"below_percent\": 5, "
                                 f"\"minutes\": 15, \"after_minutes\": 10}}, got "
                                 f"{type(value).__name__}")
        check_fields(value, GPU_IDLE_FIELDS, what)
        return cls(
            below_percent=_number(value, "below_percent", what, 0, 100, None, lo_open=True),
            minutes=_number(value, "minutes", what, 0, MAX_GPU_IDLE_MINUTES, None, lo_open=True),
            after_minutes=_number(value, "after_minutes", what, 0, MAX_GPU_IDLE_MINUTES, 0.0),
        )

    @classmethod
    def parse(cls, text: str, what: str = "--gpu-idle") -> GpuIdle:
        """`PERCENT%:WINDOW[:GRACE]`, durations in s, m (the default) or h: `5%:15m:10m`."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise PermanentError(f"{what} {text!r}: expected PERCENT%:WINDOW[:GRACE], "
                                 "e.g. 5%:15m:10m (below 5 % for 15 minutes, after the first 10)")
        percent = parts[0].strip().removesuffix("%").strip()
        try:
            below = float(percent)
        except ValueError:
            raise PermanentError(f"{what} {text!r}: {parts[0]!r} is not a percentage") from None
        minutes = [_minutes(p, what, text) for p in parts[1:]]
        obj: JsonObj = {"below_percent": below, "minutes": minutes[0]}
        if len(minutes) == 2:
            obj["after_minutes"] = minutes[1]
        policy = cls.from_value(obj, what)
        assert policy is not None
        return policy

    def to_dict(self) -> JsonObj:
        return {"below_percent": self.below_percent, "minutes": self.minutes,
                "after_minutes": self.after_minutes}

    @property
    def text(self) -> str:
        def num(v: float) -> str:  # read back exactly by `parse`
            return str(int(v)) if float(v).is_integer() else repr(float(v))
        return f"{num(self.below_percent)}%:{num(self.minutes)}m:{num(self.after_minutes)}m"


def _minutes(part: str, what: str, text: str) -> float:
    m = _DURATION_RE.match(part.strip())
    if m is None:
        raise PermanentError(f"{what} {text!r}: {part!r} is not a duration (use e.g. 90s, "
                             "15m or 2h)")
    return float(m.group(1)) * _DURATION_UNIT[m.group(2)]
def _image(obj: JsonObj, what: str, pinned: bool = False) -> str | None:
    """An OCI image reference, checked against the distribution grammar; `pinned`: with its
    digest (what a node is given)."""
    v = obj.get("image")
    if v is None:
        return None
    ref = parse_image(v, f"{what}: image")
    if pinned and not ref.pinned:
        raise PermanentError(f"{what}: image {v!r} is not pinned to a sha256 digest")
    return str(ref)


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
    "gpu_idle",
    "max_cost_usd",
    "image",
    "wandb_project",
    "wandb_entity",
)


def validate_wandb(value: object, key: str, what: str) -> str | None:
    """A wandb project (`key="wandb_project"`) or entity (`"wandb_entity"`), or None."""
    if value is None:
        return None
    pattern = WANDB_PROJECT_RE if key == "wandb_project" else WANDB_ENTITY_RE
    if not isinstance(value, str) or not pattern.match(value):
        rule = ("letters, digits, '.', '_' and '-', at most 128, starting with a letter or "
                "digit" if key == "wandb_project" else
                "letters, digits, '_' and '-', at most 64, starting with a letter or digit")
        raise PermanentError(f"{what}: {key} {value!r} must be {rule}")
    return value

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
    #: The GPU-idle policy; None takes the stack's default (which may be none).
    gpu_idle: GpuIdle | None = None
    #: The run's dollar cap (docs/reliability.md): the deadline is the earlier of max_hours
    #: and the time the run's nodes at the stack's hourly prices reach it, over every attempt.
    #: None takes the stack's default (pcp:max_cost_usd), if any.
    max_cost_usd: float | None = None
    #: An OCI image to run instead of a Nix binary (`REGISTRY/REPO[:TAG][@sha256:HEX]`,
    #: pcp/core/images.py); with `binary` too, the shepherd runs the binary and the workers
    #: the image.
    image: str | None = None
    #: `image` (or the stack's default image) pinned to its digest, REGISTRY/REPO@sha256:HEX:
    #: resolved once by the function that accepts the request, like `secret` never on the
    #: wire and not compared; the run record keeps it, so every node and restart runs it.
    pinned_image: str = field(default="", compare=False)
    #: The wandb project and entity the nodes log to; None takes the stack's default.
    wandb_project: str | None = None
    wandb_entity: str | None = None
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
            gpu_idle=GpuIdle.from_value(obj.get("gpu_idle"), f"{what}: gpu_idle"),
            max_cost_usd=positive_usd(obj.get("max_cost_usd"), f"{what}: max_cost_usd"),
            image=_image(obj, what),
            wandb_project=validate_wandb(obj.get("wandb_project"), "wandb_project", what),
            wandb_entity=validate_wandb(obj.get("wandb_entity"), "wandb_entity", what),
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
        if self.gpu_idle is not None:
            out["gpu_idle"] = self.gpu_idle.to_dict()
        if self.max_cost_usd is not None:
            out["max_cost_usd"] = self.max_cost_usd
        if self.image is not None:
            out["image"] = self.image
        if self.wandb_project is not None:
            out["wandb_project"] = self.wandb_project
        if self.wandb_entity is not None:
            out["wandb_entity"] = self.wandb_entity
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
MARKER_FIELDS = ("run_id", "node", "attempt", "at", "exit_code", "signal", "duration_s", "host",
                 "end_reason")
#: Why a node's agent ended it, when it did on its own (docs/agent.md): a done marker's
#: `end_reason`, which becomes the run's reason (`pcp.core.state.NODE_END_REASONS`).
NODE_END_REASONS = ("gpu_idle", "maintenance", "preempted")


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
    #: Set when the agent ended the node itself: one of `NODE_END_REASONS`.
    end_reason: str | None = None

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
        end_reason = obj.get("end_reason")
        if end_reason is not None and end_reason not in NODE_END_REASONS:
            raise PermanentError(f"{what}: end_reason must be one of "
                                 f"{', '.join(NODE_END_REASONS)} or null, got {end_reason!r}")
        if kind == "booted":  # how a node ended is said by `done` only (and written only there)
            exit_code, signal, duration, end_reason = None, None, None, None
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
            end_reason=end_reason,
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
            if self.end_reason is not None:
                out["end_reason"] = self.end_reason
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
    "gpu_idle",
    "image",
    "wandb_project",
    "wandb_entity",
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
    #: The run's GPU-idle policy (the request's, else the stack's), enforced by the agent.
    gpu_idle: GpuIdle | None = None
    #: The OCI image this node runs instead of `binary`, pinned: REGISTRY/REPO@sha256:HEX.
    image: str | None = None
    #: wandb: the project (None: no wandb) and entity the binary logs to (docs/trainers.md).
    wandb_project: str | None = None
    wandb_entity: str | None = None

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
            **({"gpu_idle": self.gpu_idle.to_dict()} if self.gpu_idle is not None else {}),
            **({"image": self.image} if self.image is not None else {}),
            **({"wandb_project": self.wandb_project} if self.wandb_project else {}),
            **({"wandb_entity": self.wandb_entity} if self.wandb_entity else {}),
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
            gpu_idle=GpuIdle.from_value(obj.get("gpu_idle"), f"{what}: gpu_idle"),
            image=_image(obj, what, pinned=True),
            wandb_project=validate_wandb(obj.get("wandb_project"), "wandb_project", what),
            wandb_entity=validate_wandb(obj.get("wandb_entity"), "wandb_entity", what),
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


# ---------------------------------------------------------------- budget notifications

#: The fields of a Cloud Billing budget notification's JSON data (schemaVersion 1.0).
BUDGET_FIELDS = ("budgetDisplayName", "alertThresholdExceeded", "forecastThresholdExceeded",
                 "costAmount", "costIntervalStart", "budgetAmount", "budgetAmountType",
                 "currencyCode")
BUDGET_SCHEMA = "1.0"
BUDGET_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
BILLING_ACCOUNT_RE = re.compile(r"^[A-Z0-9]{6}-[A-Z0-9]{6}-[A-Z0-9]{6}$")


def _amount(obj: JsonObj, key: str, what: str, required: bool = True) -> float | None:
    """A non-negative, finite number of the budget's currency."""
    v = obj.get(key)
    if v is None:
        if required:
            raise PermanentError(f"{what}: {key} is required")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PermanentError(f"{what}: {key} must be a number, got {type(v).__name__}")
    if isinstance(v, int) and v > MAX_USD:
        raise PermanentError(f"{what}: {key} is larger than {MAX_USD:g}")
    number = float(v)
    if not 0 <= number <= MAX_USD:  # NaN fails too
        raise PermanentError(f"{what}: {key} must be a finite number >= 0, got {v!r}")
    return number


@dataclass(frozen=True)
class BudgetNotification:
    """What Cloud Billing publishes to a budget's topic, several times a day: the spend so far
    in the budget's period (`costIntervalStart`) against its amount. It lags real spend by
    hours. The attributes say which billing account and budget sent it."""

    billing_account_id: str
    budget_id: str
    cost_amount: float
    budget_amount: float
    cost_interval_start: datetime
    currency_code: str
    budget_display_name: str = ""
    budget_amount_type: str = ""
    alert_threshold_exceeded: float | None = None
    forecast_threshold_exceeded: float | None = None

    @classmethod
    @untrusted("budget notification")
    def from_message(cls, data: bytes | str, attributes: object) -> BudgetNotification:
        what = "budget notification"
        if not isinstance(attributes, dict):
            raise PermanentError(f"{what}: attributes must be an object")
        schema = attributes.get("schemaVersion")
        if schema != BUDGET_SCHEMA:
            raise PermanentError(f"{what}: schemaVersion {schema!r} is not supported "
                                 f"(expected {BUDGET_SCHEMA!r})")
        budget_id = attributes.get("budgetId")
        if not isinstance(budget_id, str) or not BUDGET_ID_RE.match(budget_id):
            raise PermanentError(f"{what}: attribute budgetId {budget_id!r} is not a budget id")
        account = attributes.get("billingAccountId")
        if not isinstance(account, str) or not BILLING_ACCOUNT_RE.match(account):
            raise PermanentError(f"{what}: attribute billingAccountId {account!r} is not a "
                                 "billing account id (XXXXXX-XXXXXX-XXXXXX)")
        obj = load_object(data, what)
        # Fields Cloud Billing adds later are not refused: a kill switch must not go deaf
        # because the notification grew (schemaVersion pins the meaning of those read here).
        currency = _text(obj, "currencyCode", what, 8)
        if not currency or not re.match(r"^[A-Z]{3}$", currency):
            raise PermanentError(f"{what}: currencyCode {currency!r} is not a currency code")
        return cls(
            billing_account_id=account,
            budget_id=budget_id,
            cost_amount=_amount(obj, "costAmount", what) or 0.0,
            budget_amount=_amount(obj, "budgetAmount", what) or 0.0,
            cost_interval_start=parse_time(obj.get("costIntervalStart"),
                                           f"{what}: costIntervalStart"),
            currency_code=currency,
            budget_display_name=_text(obj, "budgetDisplayName", what, 256) or "",
            budget_amount_type=_text(obj, "budgetAmountType", what, 64) or "",
            alert_threshold_exceeded=_amount(obj, "alertThresholdExceeded", what, False),
            forecast_threshold_exceeded=_amount(obj, "forecastThresholdExceeded", what, False),
        )

    def to_message(self) -> tuple[bytes, dict[str, str]]:
        """(data, attributes) as Cloud Billing publishes them (the replica and tests use it)."""
        out: JsonObj = {
            "budgetDisplayName": self.budget_display_name,
            "costAmount": self.cost_amount,
            "costIntervalStart": self.cost_interval_start.astimezone(UTC).isoformat().replace(
                "+00:00", "Z"),
            "budgetAmount": self.budget_amount,
            "budgetAmountType": self.budget_amount_type,
            "currencyCode": self.currency_code,
        }
        if self.alert_threshold_exceeded is not None:
            out["alertThresholdExceeded"] = self.alert_threshold_exceeded
        if self.forecast_threshold_exceeded is not None:
            out["forecastThresholdExceeded"] = self.forecast_threshold_exceeded
        return dump(out), {"billingAccountId": self.billing_account_id,
                           "budgetId": self.budget_id, "schemaVersion": BUDGET_SCHEMA}

    def over(self, threshold: float) -> bool:
        """Whether the actual spend passed `threshold` (a fraction of the budget): costAmount
        at or above that share of budgetAmount, or an actual-spend threshold at or above it
        exceeded. A forecast never trips anything."""
        if self.alert_threshold_exceeded is not None and self.alert_threshold_exceeded >= threshold:
            return True
        return self.budget_amount > 0 and self.cost_amount >= threshold * self.budget_amount

    def check_budget(self, budget_id: str | None, billing_account: str | None) -> None:
        """Refuse a notification of any budget but the stack's own."""
        if budget_id is None:
            raise PermanentError("budget notification for budget "
                                 f"{self.budget_id!r}, but this stack has no budget "
                                 "(set pcp:billing_account and pcp:monthly_budget_usd)")
        if self.budget_id != budget_id:
            raise PermanentError(f"budget notification is from budget {self.budget_id!r}, not "
                                 f"this stack's budget {budget_id!r}: check which topic the "
                                 "budget publishes to")
        if billing_account and self.billing_account_id != billing_account:
            raise PermanentError(f"budget notification is from billing account "
                                 f"{self.billing_account_id!r}, not this stack's "
                                 f"{billing_account!r}")


BUDGET_RESUME_FIELDS = ("op", "requested_by")


@dataclass(frozen=True)
class BudgetResume:
    """`pcp budget resume`: a person lifts the stack's budget hold (on the stop topic)."""

    requested_by: str | None = None

    @classmethod
    @untrusted("budget resume")
    def from_dict(cls, obj: JsonObj) -> BudgetResume:
        what = "budget resume"
        check_fields(obj, BUDGET_RESUME_FIELDS, what)
        if obj.get("op") != "budget_resume":
            raise PermanentError(f"{what}: op must be 'budget_resume', got {obj.get('op')!r}")
        return cls(requested_by=_text(obj, "requested_by", what, 256))

    def to_json(self) -> bytes:
        out: JsonObj = {"op": "budget_resume"}
        if self.requested_by is not None:
            out["requested_by"] = self.requested_by
        return dump(out)


@untrusted("stop request")
def parse_stop_topic(data: bytes | str) -> StopRequest | BudgetResume:
    """What the stop topic carries: a stop request, or (with op budget_resume) a resume."""
    obj = load_object(data, "stop request")
    if "op" in obj:
        return BudgetResume.from_dict(obj)
    return StopRequest.from_json(data)


__all__ = [
    "BudgetNotification",
    "BudgetResume",
    "parse_stop_topic",
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
