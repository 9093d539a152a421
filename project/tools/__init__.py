"""Commands that start or read runs: ``python -m project sweep|compare|summary|curves|convert ...``
(``imgcls <command>`` once installed). Each is one module with a ``main(argv)``."""
