"""The ``hap`` command line. User mistakes end in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import HapError
from .models.loading import DEFAULT_MODEL, load_model


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    report = verify_model(model, random_tokens=args.random_tokens, seed=args.seed)
    print(json.dumps(report))
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hap", description="Find circuits in transformer language models.")
    parser.add_argument("--version", action="version", version=f"hap-circuits {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="check the adapter and the ablation primitive against the Hugging Face model",
        description="Print one JSON line of invariants; exit 0 only if every *_max_abs_diff is within tolerance "
        "(1e-4 in float32).",
    )
    verify.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    verify.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    verify.add_argument("--dtype", default=None, help="float32 (default), float64, float16, bfloat16")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--random-tokens", action="store_true", help="stress test on random token ids")
    verify.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hap`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except HapError as error:
        print(f"hap: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
