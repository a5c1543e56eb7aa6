"""`python -m glm5_ascend.server [MODEL] [flags]`: the same as `glm5-ascend serve`."""
import sys

from glm5_ascend.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
