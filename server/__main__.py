"""python -m server [--model PATH] [--backend ...] [--device] [--providers] [--host] [--port]
[--max-batch-size] [--max-delay-ms] [--workers] [--no-winograd]. Options override FRCNN_* environment variables; everything else comes from them."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from runtime.backends import BACKENDS
from server.settings import Settings

_OPTIONS = (
    ("--model", str, "checkpoint dir, .onnx or .engine (default: the bundled demo checkpoint)"),
    ("--host", str, "bind address"),
    ("--port", int, "bind port"),
    ("--max-batch-size", int, "images per backend call"),
    ("--max-delay-ms", float, "longest wait for a batch to fill"),
    ("--workers", int, "decode/preprocess threads"),
    ("--queue-size", int, "images waiting before 503"),
    ("--threads", int, "backend intra-op threads"),
    ("--device", str, "torch backend: cpu, cuda or cuda:N"),
    ("--providers", str, "onnxruntime execution providers, comma-separated in order (cpu, cuda, tensorrt)"),
    ("--log-level", str, "critical|error|warning|info|debug"),
)


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    for flag, typ, help_ in _OPTIONS:
        parser.add_argument(flag, type=typ, default=None, help=help_)
    parser.add_argument("--intra-op-threads", type=int, default=None, dest="deprecated_threads",
                        help="deprecated spelling of --threads")
    parser.add_argument("--backend", choices=list(BACKENDS), default=None)
    parser.add_argument("--winograd", action=argparse.BooleanOptionalAction, default=None,
                        help="onnxruntime on CPU: large 3x3 convolutions by Winograd F(4x4, 3x3) (default: on)")
    args = parser.parse_args(argv)
    if args.deprecated_threads is not None:
        print("python -m server: --intra-op-threads is deprecated; use --threads", file=sys.stderr)
        if args.threads is None:
            args.threads = args.deprecated_threads
    del args.deprecated_threads
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from server.app import create_app
    from server.guard import uvicorn_options

    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 5, access_log=False,
                **uvicorn_options(settings))  # header deadline, header size, connection cap
    return 0


if __name__ == "__main__":
    sys.exit(main())
