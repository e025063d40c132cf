"""Runs a container of a rendered pod on this machine, as the kubelet would have set it up:
every volume it mounts is materialised under a temporary root (ConfigMap and Secret keys
become files, a projected service-account token is written where the pod would find it,
claims, emptyDirs and hostPaths become directories), every absolute path of the pod is
mapped into that root (in the command line, the environment and the mounted files), and
the environment is resolved (secretKeyRef from the rendered Secrets, fieldRef
spec.nodeName). The command line is the container's own `command` + `args`, found on the
PATH of this virtual environment, so it runs the real CLIs exactly as the chart calls them.

What cannot be reproduced here is said where it happens: processes run as the test's own
user (the venv is not readable by the pod's uid), and the root filesystem is not read-only.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helm.chart import Manifest, find

VENV_BIN = Path(sys.executable).parent


@dataclass
class Container:
    """One container of a rendered pod, materialised under `root`."""

    docs: list[Manifest]
    pod: dict[str, Any]
    spec: dict[str, Any]
    root: Path
    node_name: str = "node-1"
    token: str = ""  # the projected service-account token, when the pod mounts one
    mounts: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        docs: list[Manifest],
        kind: str,
        name: str,
        container: str,
        root: Path,
        **kw: Any,
    ) -> Container:
        pod = find(docs, kind, name)["spec"]["template"]["spec"]
        found = [c for c in (*pod.get("initContainers", []), *pod["containers"])]
        spec = next(c for c in found if c["name"] == container)
        return cls(docs, pod, spec, root, **kw)

    # -- paths -------------------------------------------------------------------------

    def path(self, pod_path: str) -> Path:
        assert pod_path.startswith("/"), pod_path
        return self.root / pod_path.lstrip("/")

    def map_text(self, text: str) -> str:
        """Every mounted path (longest first) -> its place under the root."""
        if not self.mounts:
            return text
        alternatives = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
        pattern = re.compile(f"(?<![\\w/.-])({alternatives})(?=[/\\s\"',\\]]|$)", re.M)
        return pattern.sub(lambda match: str(self.path(match.group(1))), text)

    # -- volumes -----------------------------------------------------------------------

    def materialise(self) -> None:
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        self.mounts = [m["mountPath"] for m in self.spec.get("volumeMounts", [])]
        for mount in self.spec.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            target = self.path(mount["mountPath"])
            files = self._files_of(volume)
            if files is None:  # a directory: claim, emptyDir, hostPath
                target.mkdir(parents=True, exist_ok=True)
            elif "subPath" in mount:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(self.map_text(files[mount["subPath"]]))
            else:
                target.mkdir(parents=True, exist_ok=True)
                for key, text in files.items():
                    (target / key).write_text(self.map_text(text))

    def _files_of(self, volume: dict[str, Any]) -> dict[str, str] | None:
        if "configMap" in volume:
            data = find(self.docs, "ConfigMap", volume["configMap"]["name"])["data"]
            return _items(data, volume["configMap"].get("items"))
        if "secret" in volume:
            secret = find(self.docs, "Secret", volume["secret"]["secretName"])
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            return _items(data, volume["secret"].get("items"))
        if "projected" in volume:
            out: dict[str, str] = {}
            for source in volume["projected"]["sources"]:
                token = source["serviceAccountToken"]
                assert self.token, "the pod mounts a service-account token: give one"
                out[token["path"]] = self.token
            return out
        return None

    # -- the process -------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        for item in self.spec.get("env", []):
            env[item["name"]] = self.map_text(self._env_value(item))
        env.update(extra or {})
        return env

    def _env_value(self, item: dict[str, Any]) -> str:
        if "value" in item:
            return str(item["value"])
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = find(self.docs, "Secret", ref["name"])
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        if source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            return self.node_name
        raise AssertionError(f"no way to resolve env {item}")

    def argv(self) -> list[str]:
        command = [*self.spec.get("command", []), *self.spec.get("args", [])]
        assert command, f"container {self.spec['name']} names no command"
        mapped = [self.map_text(str(a)) for a in command]
        executable = shutil.which(mapped[0], path=self.env()["PATH"])
        assert executable, f"{mapped[0]} is not on the PATH: the chart calls a missing command"
        return [executable, *mapped[1:]]

    def run_to_completion(self, extra_env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            self.argv(), env=self.env(extra_env), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{self.argv()} failed: {done.stderr}"
        return done.stdout

    def port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        ports = {p["name"]: p["containerPort"] for p in self.spec.get("ports", [])}
        return int(ports[name_or_number])

    def probe_url(self, probe: str) -> str:
        """`http://host:port/path` for an httpGet probe, `grpc://127.0.0.1:port/service`
        for a grpc probe (the pod's address: here, this machine's)."""
        spec = self.spec[probe]
        if "grpc" in spec:
            grpc_probe = spec["grpc"]
            return f"grpc://127.0.0.1:{int(grpc_probe['port'])}/{grpc_probe.get('service', '')}"
        get = spec["httpGet"]
        host = get.get("host", "127.0.0.1")
        return f"http://{host}:{self.port(get['port'])}{get['path']}"


def _items(data: dict[str, str], items: list[dict[str, str]] | None) -> dict[str, str]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items}
