"""The ``kolm`` command: the root parser (:mod:`kolm.cli.main`) and one module of
subcommands per package (compile, recall, infer). Imports stay lazy: ``kolm verify``
never loads torch."""

__all__: list[str] = []
