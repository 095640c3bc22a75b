"""`python -m lora_rl` and the `lora-rl` command (pyproject's entry point). Ctrl-C while the program loads (before
the command's own handling starts) ends with one line and exit code 130, not a traceback."""

import sys


def main() -> None:
    try:
        from lora_rl.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("warning: interrupted (Ctrl-C)\n")  # the modules that print it nicely were not loaded
        sys.exit(130)
    app(prog_name="lora-rl")


if __name__ == "__main__":
    main()
