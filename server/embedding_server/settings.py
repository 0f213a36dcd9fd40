"""Command-line flags, each also an environment variable ``EMBEDDING_<FLAG>``.

One name per setting: ``--rest-port`` is ``EMBEDDING_REST_PORT``. A flag on
the command line wins over the environment. Repeatable flags (``--model``,
``--api-key``) take a comma-separated list from the environment.

One source per default: the engine's knobs are declared once, in
``engine/tuning.py`` (name, type, default, help), and their flags and
``Settings.tuning`` derive from there; ``Settings`` holds the rest. The
flags read their defaults from ``DEFAULTS`` and ``--help`` prints them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from embedding_client.envflags import OneLineParser, apply_environment, port_number

from .engine.memory import parse_size
from .engine.tuning import BatchSettings, EngineSettings, knob_fields, knob_of
from .models.engines import ENGINES, PRECISIONS
from .selection.rule import DEFAULT_FLOOR
from .streaming import DEFAULT_STREAM_WINDOW

ENV_PREFIX = "EMBEDDING_"
LOG_LEVELS = ["debug", "info", "warning", "error"]

#: Flags that must be at least 1 (0 would refuse every request, or hang a stream), besides the knobs
#: that say so in engine/tuning.py.
AT_LEAST_ONE = ("sessions", "stream_window", "max_message_mb")


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50051
    rest_port: int = 8000
    rest_max_body_mb: float = 64.0
    models: list[str] = field(default_factory=list)
    model_aliases: list[str] = field(default_factory=list)
    auto_truncate: bool = False
    sessions: int | None = None  # None: one per CPU, at most 4 (cpus.ThreadBudget)
    threads_per_session: int = 0  # 0: cores / sessions
    session_layout: str = "shared"
    tuning: EngineSettings = field(default_factory=EngineSettings)  # every engine knob (engine/tuning.py)
    memory_limit: int = 0  # bytes; 0: the cgroup memory limit, else 1 GiB (engine/memory.py)
    stream_window: int = DEFAULT_STREAM_WINDOW
    max_message_mb: int = 64
    grace_period: float = 30.0
    api_keys: list[str] = field(default_factory=list, repr=False)  # never in a log line
    api_key_file: str | None = None
    auth_reflection: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_port: int = 0
    log_level: str = "info"
    log_json: bool = False
    event_loop: str = "auto"  # auto: uvloop where it is installed (cli.py)
    quantize: str = "none"
    engine: str = "auto"  # auto: measured at first start (selection/measure.py)
    precision: str = "auto"
    fidelity_floor: float = DEFAULT_FLOOR
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/embedding-service
    otlp_endpoint: str | None = None  # None: tracing only if the standard OTEL_* variables ask for it


DEFAULTS = Settings()


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_size.__name__ = "size"


class _AppendOverridingDefault(argparse._AppendAction):
    """A repeatable flag whose first use replaces the default (e.g. from the environment), not extends it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


class DefaultsShown(argparse.HelpFormatter):
    """Every flag's help ends with its default unless the text already says it: an operator reading
    ``--help`` should not have to open the source to learn that a batch holds 16384 tokens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or default == []:
            return action.help
        return f"{text} (default: {shown_default(default)})"


def shown_default(value: object) -> str:
    """A default as an operator would type it (``64``, not ``64.0``; ``off`` for a false switch),
    escaped for argparse's %-formatting."""
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="embedding-server",
        formatter_class=DefaultsShown,
        description="gRPC embedding server (and OpenAI-compatible REST shim) on ONNX Runtime or OpenVINO. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>, e.g. EMBEDDING_PORT.",
    )
    p.register("action", "append", _AppendOverridingDefault)
    add = p.add_argument

    def number(flag: str, kind: type[int] | type[float], help: str) -> None:
        """A number flag (>= 0) whose default is the ``DEFAULTS`` field of its name."""
        add(flag, type=_positive(kind), default=getattr(DEFAULTS, flag[2:].replace("-", "_")), help=help)

    def knobs(defaults: BatchSettings | EngineSettings) -> None:
        """A flag per knob of ``defaults``' class, declared in engine/tuning.py (default, help, type)."""
        for declared in knob_fields(type(defaults)):
            default = getattr(defaults, declared.name)
            kind = float if isinstance(default, float) else int
            flag = "--" + declared.name.replace("_", "-")
            add(flag, type=_positive(kind), default=default, help=knob_of(declared).help)

    add("--host", default=DEFAULTS.host, help="address to listen on")
    add("--port", type=port_number, default=DEFAULTS.port, help="gRPC port")
    add(
        "--rest-port",
        type=port_number,
        default=DEFAULTS.rest_port,
        help="REST shim port; 0 turns the shim off",
    )
    number("--rest-max-body-mb", float, "largest REST request body in MiB; more is HTTP 413")
    add(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="[NAME=]SOURCE",
        help="a model to serve under NAME, repeatable; the first is the default. SOURCE: a model directory "
        "(NAME defaults to its name), all-minilm-l6-v2 (the built-in model) or hf:ORG/REPO[@REVISION] "
        "(fetched from the Hugging Face hub into --cache-dir on first start). "
        "Default: the built-in all-minilm-l6-v2",
    )
    add(
        "--model-alias",
        dest="model_aliases",
        action="append",
        default=[],
        metavar="ALIAS=NAME",
        help="serve the model named NAME under ALIAS too (one model, loaded once), repeatable, "
        "e.g. text-embedding-3-small=all-minilm-l6-v2 for tools that hard-code OpenAI's names "
        "(default: none)",
    )
    add(
        "--auto-truncate",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.auto_truncate,
        help="REST requests without a truncate field cut over-long inputs to the model's max tokens instead "
        "of answering 400 (for OpenAI tools, which cannot send truncate). gRPC is unchanged: its truncate "
        "has no presence, false is a request for the error",
    )
    knobs(DEFAULTS.tuning)
    add(
        "--sessions",
        type=_positive(int),
        default=None,
        help="concurrent ONNX session runs per model (default: one per CPU, at most 4)",
    )
    number("--threads-per-session", int, "intra-op threads per session; 0: cores / sessions")
    add(
        "--session-layout",
        choices=["shared", "separate"],
        default=DEFAULTS.session_layout,
        help="shared: one ONNX session runs the --sessions concurrent batches (weights once); "
        "separate: one session each",
    )
    knobs(DEFAULTS.tuning.batch)
    add(
        "--memory-limit",
        type=_size,
        default=DEFAULTS.memory_limit,
        help="memory the server plans for, e.g. 1GiB, 768MiB (default: the container's cgroup memory limit, "
        "else 1GiB). Batches are cut and long inputs refused (RESOURCE_EXHAUSTED) to stay under it. "
        "Measured peak RSS at default flags under a 1GiB limit: all-minilm-l6-v2 (default) 0.35GiB idle, "
        "up to 0.8GiB after the longest inputs (README, Memory); give bge-m3 / jina-embeddings-v3 "
        "(fp32, 568M params, 2.2GB of weights) at least 4GiB",
    )
    number("--stream-window", int, "requests of one StreamEmbed call in flight")
    number("--max-message-mb", int, "largest request message in MiB")
    number("--grace-period", float, "seconds for work in flight at shutdown")
    add(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        help="turn auth on with this key, repeatable",
    )
    add("--api-key-file", default=None, help="file with API keys, one per line")
    add(
        "--auth-reflection",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.auth_reflection,
        help="require the API key for reflection too (default: reflection is open)",
    )
    add("--tls-cert", default=None, help="PEM certificate chain: serve gRPC and REST over TLS")
    add("--tls-key", default=None, help="PEM private key for --tls-cert")
    add("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mTLS)")
    add(
        "--metrics-port",
        type=port_number,
        default=DEFAULTS.metrics_port,
        help="Prometheus /metrics on a port of its own, without auth (for a scraper-only network, or "
        "when the REST shim is off; 0: none)",
    )
    add(
        "--quantize",
        choices=["none", "int8"],
        default=DEFAULTS.quantize,
        help="int8: serve an int8 copy of every model that is not int8 yet, made at start (checked against "
        "fp32 on a calibration set, refused below min cosine 0.99 / mean 0.995) and cached in --cache-dir "
        "(none: as stored; the built-in model is exact fp32)",
    )
    add(
        "--engine",
        choices=["auto", *ENGINES],
        default=DEFAULTS.engine,
        help="what runs the models: ONNX Runtime or OpenVINO (the same ONNX files). auto: at a model's first "
        "start, measure each engine and precision this CPU runs natively and serve the fastest one that "
        "keeps --fidelity-floor; the table is cached in --cache-dir and logged",
    )
    add(
        "--precision",
        choices=["auto", *PRECISIONS],
        default=DEFAULTS.precision,
        help="fp32 (exact), bf16 (OpenVINO, on CPUs with AMX or AVX-512 BF16; refused on others), int8 "
        "(ONNX Runtime, the same as --quantize int8), or auto: fp32 or bf16, by measurement (never int8)",
    )
    add(
        "--fidelity-floor",
        type=float,
        default=DEFAULTS.fidelity_floor,
        help="--engine/--precision auto: the lowest cosine to ONNX Runtime fp32 a candidate may have on "
        "the calibration texts (its worst output and task)",
    )
    add(
        "--cache-dir",
        default=None,
        help="where built, quantized and hub (hf:) models are cached "
        "(default $XDG_CACHE_HOME/embedding-service, else ~/.cache/embedding-service)",
    )
    add(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="send OpenTelemetry traces over OTLP/gRPC to this collector, e.g. http://otel-collector:4317 "
        "(https:// for TLS). Default: off, unless the standard variables OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_TRACES_EXPORTER ask for it; OTEL_SDK_DISABLED=true keeps it off",
    )
    add(
        "--event-loop",
        default=DEFAULTS.event_loop,
        choices=["auto", "uvloop", "asyncio"],
        help="the event loop: uvloop (libuv; measured 10-25%% less server CPU per call, "
        "bench/serving_path.py) or the standard library's; auto: uvloop where it is installed",
    )
    add("--log-level", default=DEFAULTS.log_level, choices=LOG_LEVELS, help="log level")
    add("--log-json", action=argparse.BooleanOptionalAction, default=DEFAULTS.log_json, help="JSON log lines")
    return p


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    parser = build_parser()
    apply_environment(parser, os.environ if environ is None else environ, ENV_PREFIX)
    args = parser.parse_args(argv)
    declared = [f for cls in (EngineSettings, BatchSettings) for f in knob_fields(cls)]
    for name in (*AT_LEAST_ONE, *(f.name for f in declared if knob_of(f).at_least >= 1)):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # 0 refuses all, or hangs a stream
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.quantize == "int8":  # the older spelling of --precision int8
        if args.precision not in ("auto", "int8"):
            parser.error(f"--quantize int8 and --precision {args.precision} disagree")
        args.precision = "int8"
    if not 0.0 < args.fidelity_floor <= 1.0:
        parser.error(f"--fidelity-floor: must be in (0, 1], got {args.fidelity_floor}")
    values = vars(args)
    batch = BatchSettings(**{f.name: values.pop(f.name) for f in knob_fields(BatchSettings)})
    tuning = EngineSettings(**{f.name: values.pop(f.name) for f in knob_fields(EngineSettings)}, batch=batch)
    return Settings(**values, tuning=tuning)
