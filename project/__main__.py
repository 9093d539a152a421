"""``python -m project fit|validate|test|predict -c experiments/<name>.yaml``."""

from project.cli import main

if __name__ == "__main__":
    main()
