"""kolm: the composition root — the one package that imports kolm_ledger, kolm_compile
and kolm_infer together: the ``kolm`` command (:mod:`kolm.cli`), the demo and ``kolm up``.
Library code never imports it."""

__all__: list[str] = []
