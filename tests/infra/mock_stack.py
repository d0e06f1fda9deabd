"""Run the real Pulumi program (infra/__main__.py) for one stack under Pulumi mocks; dump JSON.

    python tests/infra/mock_stack.py STACK OUT.json [--set KEY=VALUE ...]

One process per stack: Pulumi's runtime settings, the root Stack resource and the imported
program modules are process-global, so separate processes are the clean way to get one pass
per stack. Configuration = defaults declared in infra/Pulumi.yaml, overlaid by the real
infra/Pulumi.<stack>.yaml, plus test values for the keys that have no default (and `--set`
overrides, used for variant runs).

Recorded per resource: type, logical name, URN, parent URN, custom or component, inputs (as the
engine sees them: camelCase names, numbers as floats), and the resource options the engine
receives (dependencies, ignoreChanges, protect, ...), captured by wrapping the mock monitor's
RegisterResource. Also: invokes, stack outputs, the config keys the program read, and which
components called register_outputs.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

PROJECT_ID = "pcp-test-project"
PROJECT_NUMBER = "123456789012"

#: Values for keys that have no default (not in any committed file, by design).
TEST_REQUIRED = {
    "gcp:project": PROJECT_ID,
    "pcp:shepherd_host": "shepherd.example.net",
    "pcp:github_repository": "example-org/pcp-example",
}


def _config_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def stack_config(stack: str, overrides: dict[str, str]) -> dict[str, str]:
    project = yaml.safe_load((INFRA / "Pulumi.yaml").read_text())
    config: dict[str, str] = {}
    for key, decl in (project.get("config") or {}).items():
        full = key if ":" in key else f"pcp:{key}"
        if isinstance(decl, dict) and "default" in decl:
            config[full] = _config_string(decl["default"])
    stack_file = yaml.safe_load((INFRA / f"Pulumi.{stack}.yaml").read_text()) or {}
    for key, value in (stack_file.get("config") or {}).items():
        config[key] = _config_string(value)
    for key, value in TEST_REQUIRED.items():
        config.setdefault(key, value)
    config.update(overrides)
    return config


#: How secrets appear in mock inputs (pulumi.runtime.rpc: _special_sig_key, _special_secret_sig).
_SECRET_SIG = "4dabf18193072939515e22adb298388d"
_SECRET_VALUE = "1b47061264138c4ac30d75fd1eb44270"


def _jsonable(value: Any) -> Any:
    import pulumi

    if isinstance(value, dict):
        if value.get(_SECRET_SIG) == _SECRET_VALUE:
            # A secret (e.g. BucketObject.content): record the plain value.
            return _jsonable(value.get("value"))
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pulumi.FileAsset):
        return {"__asset__": "FileAsset", "path": str(value.path)}
    if isinstance(value, pulumi.FileArchive):
        return {"__archive__": "FileArchive", "path": str(value.path)}
    if isinstance(value, pulumi.Resource):
        return {"__resource__": type(value).__name__}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _synthesized_outputs(typ: str, name: str, inputs: dict[str, Any]) -> tuple[str, dict]:
    """Outputs the real provider computes that the program reads (camelCase keys)."""
    p = PROJECT_ID
    out: dict[str, Any] = {}
    rid = f"{name}_id"
    if typ == "gcp:serviceaccount/account:Account":
        email = f"{inputs['accountId']}@{p}.iam.gserviceaccount.com"
        rid = f"projects/{p}/serviceAccounts/{email}"
        out = {"email": email, "name": rid, "member": f"serviceAccount:{email}"}
    elif typ == "gcp:pubsub/topic:Topic":
        rid = f"projects/{p}/topics/{inputs['name']}"
    elif typ == "gcp:pubsub/subscription:Subscription":
        rid = f"projects/{p}/subscriptions/{inputs['name']}"
    elif typ == "gcp:iam/workloadIdentityPool:WorkloadIdentityPool":
        rid = (
            f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
            f"{inputs['workloadIdentityPoolId']}"
        )
        out = {"name": rid, "state": "ACTIVE"}
    elif typ == "gcp:iam/workloadIdentityPoolProvider:WorkloadIdentityPoolProvider":
        rid = (
            f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
            f"{inputs['workloadIdentityPoolId']}/providers/{inputs['workloadIdentityPoolProviderId']}"
        )
        out = {"name": rid}
    elif typ == "gcp:billing/budget:Budget":
        # What Cloud Billing names a budget: billingAccounts/<account>/budgets/<id>.
        rid = f"billingAccounts/{inputs['billingAccount']}/budgets/b{zlib.crc32(name.encode())}"
        out = {"name": rid}
    elif typ == "gcp:monitoring/notificationChannel:NotificationChannel":
        rid = f"projects/{p}/notificationChannels/{zlib.crc32(name.encode())}"
        out = {"name": rid}
    elif typ == "gcp:projects/iAMCustomRole:IAMCustomRole":
        rid = f"projects/{p}/roles/{inputs['roleId']}"
        out = {"name": rid}
    elif typ == "gcp:storage/bucket:Bucket":
        rid = inputs["name"]
        out = {"url": f"gs://{rid}", "selfLink": f"https://www.googleapis.com/storage/v1/b/{rid}"}
    elif typ == "gcp:storage/bucketObject:BucketObject":
        out = {"outputName": inputs.get("name"), "generation": 1.0}
    elif typ == "gcp:compute/network:Network":
        rid = f"projects/{p}/global/networks/{inputs['name']}"
        out = {"selfLink": f"https://www.googleapis.com/compute/v1/{rid}"}
    elif typ == "gcp:compute/subnetwork:Subnetwork":
        rid = f"projects/{p}/regions/{inputs['region']}/subnetworks/{inputs['name']}"
        out = {"selfLink": f"https://www.googleapis.com/compute/v1/{rid}"}
    elif typ == "gcp:compute/instance:Instance":
        rid = f"projects/{p}/zones/{inputs['zone']}/instances/{inputs['name']}"
        out = {
            "selfLink": f"https://www.googleapis.com/compute/v1/{rid}",
            "currentStatus": "RUNNING",
        }
    elif typ == "gcp:cloudfunctionsv2/function:Function":
        rid = f"projects/{p}/locations/{inputs['location']}/functions/{inputs['name']}"
        out = {"url": f"https://{inputs['name']}.example.run.app"}
    elif typ == "gcp:projects/serviceIdentity:ServiceIdentity":
        # The real provider returns the agent's address (service-NUM@gcp-sa-SERVICE...).
        service = inputs["service"].split(".", 1)[0]
        email = f"service-{PROJECT_NUMBER}@gcp-sa-{service}.iam.gserviceaccount.com"
        out = {"email": email, "member": f"serviceAccount:{email}"}
    elif typ == "gcp:cloudscheduler/job:Job":
        rid = f"projects/{p}/locations/{inputs['region']}/jobs/{inputs['name']}"
    return rid, out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stack")
    parser.add_argument("out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = stack_config(args.stack, overrides)

    import pulumi
    from pulumi.runtime import mocks as pmocks
    from pulumi.runtime import settings as psettings
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    resources: dict[tuple[str, str], dict[str, Any]] = {}
    invokes: list[dict[str, Any]] = []
    outputs_registered: list[str] = []

    class Mocks(pmocks.Mocks):
        def new_resource(self, a: pmocks.MockResourceArgs):
            inputs = dict(a.inputs)
            entry = resources.setdefault((a.typ, a.name), {})
            entry.update(type=a.typ, name=a.name, inputs=_jsonable(inputs))
            if not a.custom:
                return f"{a.name}_id", inputs
            rid, extra = _synthesized_outputs(a.typ, a.name, inputs)
            return rid, {**inputs, **extra}

        def call(self, a: pmocks.MockCallArgs):
            invokes.append({"token": a.token, "args": _jsonable(dict(a.args))})
            if a.token == "gcp:storage/getProjectServiceAccount:getProjectServiceAccount":
                email = f"service-{PROJECT_NUMBER}@gs-project-accounts.iam.gserviceaccount.com"
                return {
                    "emailAddress": email,
                    "member": f"serviceAccount:{email}",
                    "project": PROJECT_ID,
                    "id": PROJECT_ID,
                }, []
            if a.token == "gcp:organizations/getProject:getProject":
                return {
                    "number": PROJECT_NUMBER,
                    "projectId": PROJECT_ID,
                    "name": PROJECT_ID,
                    "id": f"projects/{PROJECT_ID}",
                }, []
            return {}, []

    class RecordingMonitor(pmocks.MockMonitor):
        def RegisterResource(self, request):
            response = super().RegisterResource(request)
            if request.type != "pulumi:pulumi:Stack":
                entry = resources.setdefault((request.type, request.name), {})
                entry.update(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent,
                    custom=bool(request.custom),
                    dependencies=sorted(request.dependencies),
                    ignoreChanges=list(request.ignoreChanges),
                    protect=bool(request.protect),
                    deleteBeforeReplace=bool(request.deleteBeforeReplace),
                    retainOnDelete=bool(request.retainOnDelete),
                    replaceOnChanges=list(request.replaceOnChanges),
                )
            return response

        def RegisterResourceOutputs(self, request):
            outputs_registered.append(request.urn)
            return super().RegisterResourceOutputs(request)

    keys_read: set[str] = set()
    original_get = pulumi.Config._get

    def recording_get(self, key, *a, **kw):
        keys_read.add(self.full_key(key))
        return original_get(self, key, *a, **kw)

    pulumi.Config._get = recording_get  # type: ignore[method-assign]

    monitor = RecordingMonitor(Mocks())
    pmocks.set_mocks(monitor.mocks, project="pcp", stack=args.stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(config)

    sys.path.insert(0, str(INFRA))
    from pcp_infra import paths  # the same module object the program imports

    placeholders: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pcp-infra-mock-") as tmp_name:
        tmp = Path(tmp_name)
        paths.BUILD_DIR = tmp / "build"
        if not paths.WORKER_STARTUP_SCRIPT.is_file():
            # infra/bootstrap/worker-startup.sh is written separately; until it exists the
            # program is exercised with a placeholder (a real deploy fails loudly instead).
            placeholder = tmp / "worker-startup.sh"
            placeholder.write_text("#!/bin/bash\n# placeholder used by tests/infra only\n")
            paths.WORKER_STARTUP_SCRIPT = placeholder
            placeholders.append("worker-startup.sh")

        _sync_await(
            run_pulumi_func(lambda: runpy.run_path(str(INFRA / "__main__.py"), run_name="__main__"))
        )
        root = psettings.get_root_resource()
        stack_outputs = _sync_await(pulumi.Output.from_input(root.outputs).future())

    result = {
        "stack": args.stack,
        "config": config,
        "placeholders": placeholders,
        "resources": sorted(resources.values(), key=lambda r: (r["type"], r["name"])),
        "invokes": invokes,
        "outputs": _jsonable(stack_outputs),
        "config_keys_read": sorted(keys_read),
        "outputs_registered": outputs_registered,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
