"""``python -m project fit|validate|test|predict -c experiments/<name>.yaml`` runs the CLI;
``python -m project sweep|compare|summary|curves|convert ...`` runs a tool. ``imgcls`` (setup.cfg's
entry point) is the same command."""

import importlib
import sys

#: command -> the module whose ``main(argv)`` runs it
TOOLS = {
    "sweep": "project.tools.sweep",
    "compare": "project.tools.compare",
    "summary": "project.tools.summary",
    "curves": "project.tools.curves",
    "convert": "project.tools.convert",
}


def run() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        # Importing torch and Lightning takes seconds: Ctrl-C then is not a traceback either.
        if command in TOOLS:
            main = importlib.import_module(TOOLS[command]).main
        else:
            from project.run.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    if command in TOOLS:
        main(sys.argv[2:])
    else:
        main()


if __name__ == "__main__":
    run()
