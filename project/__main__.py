"""``python -m project fit|validate|test|predict -c experiments/<name>.yaml``, and the same as the
``imgcls`` console command (setup.cfg's entry point): the CLI, nothing else."""

import sys


def run() -> None:
    try:
        # Importing torch and Lightning takes seconds: Ctrl-C then is not a traceback either.
        from project.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
