"""`python -m glm5_ascend.server [MODEL] [flags]`: the same as `glm5-ascend serve`.

It builds only the serve parser, so it starts even when another subcommand's module is broken.
"""
import logging
import sys

from glm5_ascend.cli import _Parser
from glm5_ascend.server import cli_args


def run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = _Parser(prog="glm5-ascend serve", description="serve the OpenAI-compatible HTTP API")
    cli_args.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(cli_args.main(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-caused: one line, no traceback
        print(f"glm5-ascend: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
