"""OCI image references: the strict parser, and which image and binary a run's nodes get.

A reference is `REGISTRY/REPOSITORY[:TAG][@sha256:<64 hex>]`, the grammar of the OCI
distribution reference (github.com/distribution/reference), with two rules stricter than a
`docker pull`: the registry must be named (no implicit Docker Hub, no short-name lookup), and
the only digest algorithm is sha256. A reference with a digest is pinned by itself; one with a
tag only is resolved to a digest once, by the function that accepts the run (docs/trainers.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pcp.core.errors import PermanentError

MAX_NAME = 255  # the distribution reference's limit on REGISTRY/REPOSITORY
_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN_RE = re.compile(
    rf"^(?:{_COMPONENT}(?:\.{_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?$")
PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: Registries whose credentials are the node's (or the function's) own Google identity:
#: Artifact Registry (`LOCATION-docker.pkg.dev`) and Container Registry (`gcr.io`, `*.gcr.io`).
GOOGLE_REGISTRY_RE = re.compile(r"^(?:[a-z0-9-]+-docker\.pkg\.dev|(?:[a-z0-9-]+\.)?gcr\.io)$")


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]
    repository: str  # path under the registry, e.g. my-project/pcp-tiny/trainer
    tag: str | None = None
    digest: str | None = None  # sha256:<64 hex>

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def host(self) -> str:
        """The registry's host without its port ([::1] stays bracketed)."""
        if self.registry.startswith("["):
            return self.registry[: self.registry.index("]") + 1]
        return self.registry.split(":", 1)[0]

    @property
    def loopback(self) -> bool:
        """A registry on this machine: the only one spoken to over plain HTTP."""
        return self.host in LOOPBACK_HOSTS

    @property
    def google(self) -> bool:
        """Artifact Registry or Container Registry: authenticate as the node's account."""
        return bool(GOOGLE_REGISTRY_RE.match(self.host))

    @property
    def pinned(self) -> bool:
        return self.digest is not None

    def with_digest(self, digest: str) -> ImageRef:
        if not DIGEST_RE.match(digest):
            raise PermanentError(f"image {self}: {digest!r} is not a sha256 digest")
        return ImageRef(self.registry, self.repository, self.tag, digest)

    @property
    def by_digest(self) -> str:
        """What the nodes pull: REGISTRY/REPOSITORY@sha256:... (the tag cannot move it)."""
        if self.digest is None:
            raise PermanentError(f"image {self} is not pinned to a digest")
        return f"{self.name}@{self.digest}"

    def __str__(self) -> str:
        return (self.name + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


def parse_image(value: object, what: str = "image") -> ImageRef:
    """A reference `REGISTRY/REPOSITORY[:TAG][@sha256:HEX]`, or a PermanentError saying why not."""
    form = "REGISTRY/REPOSITORY[:TAG][@sha256:<64 hex digits>]"
    if not isinstance(value, str):
        raise PermanentError(f"{what} must be a string {form}, got {type(value).__name__}")
    ref = value
    if not ref or len(ref) > 1024 or any(c.isspace() or not c.isprintable() for c in ref):
        raise PermanentError(f"{what} {ref[:80]!r} must be one reference {form}, "
                             "without spaces")
    digest = None
    if "@" in ref:
        ref, _, digest = ref.partition("@")
        if not DIGEST_RE.match(digest):
            raise PermanentError(f"{what} {value!r}: the digest must be sha256: followed by "
                                 "64 lowercase hex digits")
    tag = None
    slash = ref.find("/")
    last = ref.rfind(":")
    if last > slash:  # a colon after the last slash's start: the tag (a port comes before "/")
        ref, tag = ref[:last], ref[last + 1:]
        if not TAG_RE.match(tag):
            raise PermanentError(f"{what} {value!r}: tag {tag!r} must be 1-128 characters of "
                                 "letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    if slash < 0:
        raise PermanentError(f"{what} {value!r} names no registry: write it in full, "
                             f"{form} (e.g. us-docker.pkg.dev/PROJECT/REPO/trainer:v1)")
    registry, repository = ref[:slash], ref[slash + 1:]
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise PermanentError(f"{what} {value!r}: {registry!r} is not a registry host (it needs "
                             "a '.', a port or to be localhost); name the registry in full, "
                             "e.g. docker.io/library/NAME for Docker Hub")
    if not DOMAIN_RE.match(registry):
        raise PermanentError(f"{what} {value!r}: {registry!r} is not a valid registry host")
    parts = repository.split("/")
    bad = next((p for p in parts if not PATH_COMPONENT_RE.match(p)), None)
    if bad is not None:
        raise PermanentError(f"{what} {value!r}: repository part {bad!r} must be lowercase "
                             "letters and digits, joined by '.', '_', '__' or '-'")
    if len(ref) > MAX_NAME:
        raise PermanentError(f"{what} {value!r}: the name is longer than {MAX_NAME} characters")
    return ImageRef(registry, repository, tag, digest)


def pinned_image(value: object, what: str) -> str:
    """A stored pinned reference REGISTRY/REPO@sha256:HEX; "" when there is none."""
    if value is None or value == "":
        return ""
    ref = parse_image(value, f"{what}: image")
    if not ref.pinned:
        raise PermanentError(f"{what}: image {value!r} is not pinned to a sha256 digest")
    return ref.by_digest


@dataclass(frozen=True)
class Program:
    """What a run's nodes execute: the shepherd's and the workers' (binary, image) pairs."""

    binary: str | dict[str, str] | None
    image: str | None

    def for_role(self, role: str) -> tuple[str | dict[str, str] | None, str | None]:
        """(binary, image) for one node. The image wins everywhere, except on the shepherd
        when a binary is named too: the Mac keeps a native binary while workers run the image."""
        if self.image is not None and (role == "worker" or self.binary is None):
            return None, self.image
        return self.binary, None


def program_of(binary: str | dict[str, str] | None, image: str | None,
               default_binary: str | None, default_image: str | None) -> Program:
    """The run's program. A request that names a binary or an image replaces the stack's
    defaults for both; one that names neither takes both defaults."""
    if binary is None and image is None:
        return Program(default_binary, default_image)
    return Program(binary, image)
